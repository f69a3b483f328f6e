"""The HER2-positive breast tumour legacy ST data (Andersson et al., Nat. Commun. 12, 6012, 2021).

Public repository almaan/her2st (also Zenodo record 3957257). Read from a local folder with the
repository's ``data/`` layout, or downloaded into ``stexp.settings.cachedir / "her2st"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stexp._settings import logger, settings

if TYPE_CHECKING:
    from anndata import AnnData

#: Raw files of the public repository; every download URL is built from this base.
BASE_URL = "https://raw.githubusercontent.com/almaan/her2st/master/data/"

#: All sections with counts (patients B-H).
SECTIONS: tuple[str, ...] = tuple(
    [f"{p}{i}" for p in "BCD" for i in range(1, 7)] + [f"{p}{i}" for p in "EFGH" for i in range(1, 4)]
)
#: Sections with a full-resolution H&E in the repository, and the file name of that image.
IMAGE_FILES: dict[str, str] = {
    "B4": "BT10737_D2_HE.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}
#: Sections with pathologist annotations.
LABELLED: tuple[str, ...] = ("B1", "C1", "D1", "E1", "F1", "G2", "H1")

#: Known sha256 of files (path relative to ``data/``); others are recorded in ``sha256.json`` after download.
SHA256: dict[str, str] = {
    "ST-cnts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
    "ST-spotfiles/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
    "ST-imgs/B/B4/BT10737_D2_HE.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
    "ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "ST-imgs/C/C2/5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "ST-imgs/C/C3/5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "ST-imgs/C/C4/5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "ST-cnts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "ST-spotfiles/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "ST-imgs/C/C5/5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "ST-cnts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "ST-spotfiles/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    "ST-imgs/C/C6/5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
}


#: Extra download attempts after a failed one (pooch waits 1 s, 2 s, ... between attempts).
RETRIES = 2
#: Seconds to wait for the server to answer before an attempt counts as failed.
TIMEOUT = 60


def _download(rel: str, root: Path) -> Path:
    """Download ``BASE_URL + rel`` into ``root / rel`` with pooch, verifying or recording its sha256.

    Files with a known hash (:data:`SHA256`) are checked before they are kept; pooch downloads to a
    temporary file and removes it on a mismatch. Other files get their hash recorded in
    ``root / "sha256.json"``.
    """
    import pooch
    import requests

    url = BASE_URL + rel
    known = SHA256.get(rel)
    fetcher = pooch.create(
        path=root,
        base_url=BASE_URL,
        registry={rel: None if known is None else f"sha256:{known}"},
        retry_if_failed=RETRIES,
    )
    downloader = pooch.HTTPDownloader(timeout=TIMEOUT, progressbar=settings.show_progress)
    logger.info(f"downloading {url}")
    try:
        dest = Path(fetcher.fetch(rel, downloader=downloader))
    except requests.exceptions.RequestException as err:
        raise ConnectionError(
            f"could not download the HER2+ ST file {url} ({type(err).__name__}: {err}). Without internet, "
            "download the her2st data folder (almaan/her2st, data/ or Zenodo 3957257) and pass "
            "her2st(path=...) or set STEXP_DATA_DIR to the folder holding her2st/."
        ) from err
    except ValueError as err:  # pooch's hash check; the temporary file is already gone
        raise ValueError(f"checksum mismatch for {url}: {err} The file was not kept.") from err
    if known is None:
        digest = pooch.file_hash(str(dest), alg="sha256")
        registry = root / "sha256.json"
        hashes = json.loads(registry.read_text()) if registry.is_file() else {}
        hashes[rel] = digest
        registry.write_text(json.dumps(hashes, indent=1, sort_keys=True))
        logger.info(f"recorded sha256 {digest} of {rel} in {registry}")
    return dest


def _roots(path: str | os.PathLike | None) -> tuple[list[Path], Path]:
    """Folders searched for files, and the folder downloads go to."""
    if path is not None:
        root = Path(path).expanduser()
        return [root], root
    roots = []
    env = os.environ.get("STEXP_DATA_DIR")
    if env:
        roots.append(Path(env).expanduser() / "her2st")
    cache = Path(settings.cachedir) / "her2st"
    roots.append(cache)
    return roots, cache


def _locate(rel: str, roots: list[Path], target: Path, download: bool) -> Path:
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    if not download:
        raise FileNotFoundError(
            f"HER2+ ST file {rel!r} not found in {[str(r) for r in roots]} and download=False; pass path= "
            "(the folder with ST-cnts/, ST-spotfiles/, ST-imgs/) or set STEXP_DATA_DIR."
        )
    return _download(rel, target)


def _find_image(section: str, roots: list[Path], target: Path, download: bool) -> Path | None:
    folder = f"ST-imgs/{section[0]}/{section}"
    for root in roots:
        found = sorted((root / folder).glob("*.jpg")) if (root / folder).is_dir() else []
        if found:
            return found[0]
    if section not in IMAGE_FILES:
        return None
    return _locate(f"{folder}/{IMAGE_FILES[section]}", roots, target, download)


def her2st(
    sections: str | Sequence[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    download: bool | None = None,
    image_res: Literal["hires", "lowres"] | None = "hires",
) -> AnnData:
    """The HER2+ breast cancer legacy ST sections (Andersson et al. 2021) as one AnnData.

    Each section is read with :func:`stexp.io.read_st` (100 µm spots at 200 µm pitch, µm per pixel from
    the pitch). Sections are concatenated with an **inner join on genes**: only the genes measured in
    every chosen section are kept (``uns["stexp"]["her2st"]["n_genes_per_section"]`` records how many each
    had).

    Parameters
    ----------
    sections
        Section names (``"B1"`` ... ``"H3"``), or ``None`` for the six sections with an H&E image
        (B4, C2-C6).
    path
        Folder with the repository's data layout (``ST-cnts/``, ``ST-spotfiles/``, ``ST-imgs/``,
        ``ST-pat/lbl/``). Default: ``$STEXP_DATA_DIR/her2st``, then ``stexp.settings.cachedir / "her2st"``.
    download
        Download missing files from :data:`BASE_URL` (the almaan/her2st repository) into ``path`` or the
        cache, with :mod:`pooch` (sha256 checked against :data:`SHA256` where known, else recorded in
        ``sha256.json``; :data:`RETRIES` further attempts). ``None``: download only when ``path`` is
        not given; ``False``: never. Files already in a searched folder are never downloaded again.
    image_res
        In-memory images kept per section: ``"hires"`` (~2000 px, plus ``"lowres"``), ``"lowres"`` (~600 px
        only), or ``None`` to skip the images (counts only). The full-resolution image path is kept in
        ``metadata["source_image_path"]`` whenever the image is read.

    Returns
    -------
    AnnData with raw counts in ``X`` (sparse), ``obs["library_id"]`` (section), ``obs["patient"]`` (first
    letter), ``obs["label"]`` (pathologist annotation where a label file exists, else NaN),
    ``obs["has_image"]``, ``obsm["spatial"]`` and ``uns["spatial"][section]``. Sections without an image
    have ``metadata["has_image"] = False`` and no images.
    """
    import anndata as ad
    import pandas as pd

    from stexp._layout import as_list, record
    from stexp.io._st import read_st

    chosen = list(IMAGE_FILES) if sections is None else (as_list(sections) or [])
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise ValueError(f"unknown HER2+ section(s) {unknown or chosen}; valid sections are {list(SECTIONS)}.")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"sections are repeated: {chosen}.")
    if image_res not in ("hires", "lowres", None):
        raise ValueError(f"image_res must be 'hires', 'lowres' or None, got {image_res!r}.")
    roots, target = _roots(path)
    allow = (path is None) if download is None else bool(download)

    from tqdm.auto import tqdm

    adatas = []
    n_genes = {}
    for sec in tqdm(chosen, desc="her2st sections", disable=not settings.show_progress or len(chosen) < 2):
        counts = _locate(f"ST-cnts/{sec}.tsv.gz", roots, target, allow)
        spots = _locate(f"ST-spotfiles/{sec}_selection.tsv", roots, target, allow)
        labels = _locate(f"ST-pat/lbl/{sec}_labeled_coordinates.tsv", roots, target, allow) if sec in LABELLED else None
        image = _find_image(sec, roots, target, allow) if image_res is not None else None
        a = read_st(counts, spots, image, library_id=sec, labels=labels)
        entry = a.uns["spatial"][sec]
        if image_res == "lowres" and "hires" in entry["images"]:
            del entry["images"]["hires"]
            del entry["scalefactors"]["tissue_hires_scalef"]
        a.obs["patient"] = sec[0]
        a.obs["has_image"] = bool(entry["metadata"]["has_image"])
        n_genes[sec] = a.n_vars
        adatas.append(a)

    if any("label" in a.obs for a in adatas):
        for a in adatas:
            a.obs["label"] = a.obs["label"].astype(object) if "label" in a.obs else None
    spatial = {a.obs["library_id"].iloc[0]: a.uns["spatial"][a.obs["library_id"].iloc[0]] for a in adatas}
    adata = ad.concat(adatas, join="inner", merge="same")
    adata.uns["spatial"] = spatial
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"].astype(str), categories=chosen)
    adata.obs["patient"] = pd.Categorical(adata.obs["patient"].astype(str))
    if "label" in adata.obs:
        adata.obs["label"] = pd.Categorical(adata.obs["label"].astype(object))
    adata.obs["has_image"] = adata.obs["has_image"].astype(bool)
    record(
        adata,
        "her2st",
        {
            "sections": chosen,
            "image_res": image_res,
            "gene_join": "inner",
            "n_genes_per_section": n_genes,
            "source": "Andersson et al. 2021, almaan/her2st",
        },
    )
    logger.info(
        f"HER2+ ST: {adata.n_obs} spots in {len(chosen)} sections, {adata.n_vars} genes common to all "
        f"(sections had {min(n_genes.values())}-{max(n_genes.values())})"
    )
    return adata
