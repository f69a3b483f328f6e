"""The scverse template files exist, parse, and say what they should (pre-commit, Read the Docs, CFF, changelog)."""

from __future__ import annotations

import re
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _yaml(name: str):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pre_commit_runs_the_template_hooks_at_pinned_releases():
    config = _yaml(".pre-commit-config.yaml")
    hooks = {hook["id"]: repo for repo in config["repos"] for hook in repo["hooks"]}
    expected = {
        "ruff-check",
        "ruff-format",
        "end-of-file-fixer",
        "trailing-whitespace",
        "check-yaml",
        "check-toml",
        "check-added-large-files",
        "check-ast",
        "check-merge-conflict",
        "detect-private-key",
        "mixed-line-ending",
    }
    assert expected <= set(hooks), f"missing hooks: {sorted(expected - set(hooks))}"
    for repo in config["repos"]:
        assert re.fullmatch(r"v\d+\.\d+\.\d+", repo["rev"]), f"{repo['repo']} is not pinned to a release: {repo['rev']}"
    ruff_fix = next(h for h in hooks["ruff-check"]["hooks"] if h["id"] == "ruff-check")
    assert "--fix" in ruff_fix["args"]


def test_read_the_docs_builds_the_docs_extra_strictly(pyproject):
    config = _yaml(".readthedocs.yaml")
    assert config["version"] == 2
    assert str(config["build"]["tools"]["python"]) == "3.11"
    assert config["sphinx"]["configuration"] == "docs/conf.py" and (ROOT / "docs" / "conf.py").is_file()
    assert config["sphinx"]["fail_on_warning"] is True
    (install,) = config["python"]["install"]
    assert install["path"] == "." and install["extra_requirements"] == ["docs"]
    assert "docs" in pyproject["project"]["optional-dependencies"]


def test_citation_cff_cites_stexp_the_methods_and_the_data(pyproject):
    cff = _yaml("CITATION.cff")
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software" and cff["authors"] and cff["message"]
    assert cff["version"] == pyproject["project"]["version"]
    refs = cff["references"]
    assert len(refs) == 3
    by_doi = {r.get("doi"): r for r in refs}
    assert "Briefings in Bioinformatics" == by_doi["10.1093/bib/bbae551"]["journal"]  # mclSTExp
    assert by_doi["10.1093/bib/bbae551"]["authors"][0]["family-names"] == "Min"
    her2 = by_doi["10.1038/s41467-021-26271-2"]  # the HER2+ data
    assert (her2["journal"], her2["volume"], her2["start"], her2["year"]) == ("Nature Communications", 12, 6012, 2021)
    (nh2st,) = [r for r in refs if "MICCAI" in r.get("conference", {}).get("name", "")]
    assert nh2st["authors"][0]["family-names"] == "Qu" and nh2st["year"] == 2025


def test_changelog_keeps_a_changelog(pyproject):
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "keepachangelog.com" in text
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert headings[0] == "Unreleased"
    assert pyproject["project"]["version"] in headings
    for section in re.findall(r"^### (\w+)", text, flags=re.M):
        assert section in {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, section


def test_package_is_typed_and_has_no_placeholder_urls(pyproject):
    import stexp

    assert (files(stexp) / "py.typed").is_file()
    assert "Typing :: Typed" in pyproject["project"]["classifiers"]
    urls = pyproject["project"].get("urls", {})
    assert "https://stexp.readthedocs.io" not in urls.values()  # a placeholder, never published
