"""Pretrained models: a registry of named, versioned models that predict without paired data of one's own.

A registered model is either *shipped* (its folder lies inside the package, under
``stexp/models/pretrained/<name>/``, so a fresh install loads it without the network) or *downloaded*: a
``.tar.gz`` of its folder at a URL, fetched once with :mod:`pooch` (SHA-256 checked) into
``stexp.settings.cachedir / "models"``. Where there is no network, download the archive elsewhere and
pass it as ``archive=``. Every name carries its version (``her2st-breast-v1``); an alias without the
version (``her2st-breast``) names the newest. Loading checks that this stexp is recent enough.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stexp._settings import logger, settings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from stexp.images._spec import EncoderSpec

    from ._base import ExpressionModel

#: The sub-folder of ``stexp.settings.cachedir`` that downloaded models are kept in.
CACHE_SUBDIR = "models"


@dataclass(frozen=True)
class PretrainedModel:
    """A registered pretrained model.

    Attributes
    ----------
    name
        Name with version, e.g. ``"her2st-breast-v1"``.
    aliases
        Other names that resolve to it (the name without version names the newest version).
    summary
        One line: what it predicts from what.
    training_data
        One line: the slides, patients, platform it was trained on.
    requires
        The stexp versions that can load it, as a :pep:`440` specifier (e.g. ``">=0.1"``).
    url
        Where its ``.tar.gz`` archive is downloaded from; ``None`` for a model shipped in the package.
    sha256
        SHA-256 of the archive (required with ``url``).
    size_mb
        Size of the archive (download) when known.
    n_genes
        Genes it predicts, when known without loading it.
    """

    name: str
    aliases: tuple[str, ...] = ()
    summary: str = ""
    training_data: str = ""
    requires: str = ">=0.1"
    url: str | None = None
    sha256: str | None = None
    size_mb: float | None = None
    n_genes: int | None = None

    def __post_init__(self) -> None:
        if self.url is not None and not (isinstance(self.sha256, str) and len(self.sha256) == 64):
            raise ValueError(f"pretrained model {self.name!r}: a url needs the archive's SHA-256 (64 hex digits).")

    @property
    def shipped_dir(self) -> Path:
        """Where a shipped model's folder lies in the package."""
        return Path(str(files("stexp.models"))) / "pretrained" / self.name

    @property
    def source(self) -> str:
        """``"shipped"`` or the URL."""
        return "shipped" if self.url is None else self.url


_REGISTRY: dict[str, PretrainedModel] = {}


def register_pretrained(entry: PretrainedModel, *, overwrite: bool = False) -> PretrainedModel:
    """Add a pretrained model to the registry (its name and aliases then work in :func:`load`).

    Raises
    ------
    ValueError
        If the name or an alias is taken by another model and ``overwrite`` is False.
    """
    taken = [n for n in (entry.name, *entry.aliases) if n in _names() and _names()[n].name != entry.name]
    if taken and not overwrite:
        raise ValueError(f"pretrained model name(s) {taken} are taken; pass overwrite=True to replace.")
    if entry.name in _REGISTRY and not overwrite:
        raise ValueError(f"pretrained model {entry.name!r} is registered already; pass overwrite=True to replace.")
    for old in [k for k, v in _REGISTRY.items() if k in taken or v.name == entry.name]:
        del _REGISTRY[old]
    _REGISTRY[entry.name] = entry
    return entry


def _names() -> dict[str, PretrainedModel]:
    """Every name and alias to its entry (later registrations win an alias)."""
    out: dict[str, PretrainedModel] = {}
    for entry in _REGISTRY.values():
        for n in (*entry.aliases, entry.name):
            out[n] = entry
    return out


register_pretrained(
    PretrainedModel(
        "her2st-breast-v1",
        aliases=("her2st-breast",),
        summary="HER2+ breast cancer, legacy ST (100 µm spots): the default pipeline (kNN on EfficientNet-Lite0 "
        "multi-level features, smoothing, calibration) on the 785-gene panel",
        training_data="6 H&E sections (B4, C2-C6) of 2 patients, Andersson et al. 2021 (her2st)",
        requires=">=0.1",
        n_genes=785,
    )
)


def resolve(name: str) -> PretrainedModel:
    """The registered model named ``name`` (a name with version, or an alias).

    Raises
    ------
    KeyError
        If no model is registered under ``name`` (the message lists them).
    """
    names = _names()
    if name not in names:
        raise KeyError(
            f"no pretrained model named {name!r}; registered: {sorted(names)} (stexp.models.pretrained() lists them), "
            "or pass the folder of a saved model."
        )
    return names[name]


def pretrained() -> pd.DataFrame:
    """The registered pretrained models, one row each.

    Returns
    -------
    A DataFrame indexed by name (with version), with ``aliases``, ``summary``, ``training_data``,
    ``genes``, ``size_mb`` (of the shipped folder, or of the download), ``source`` (``"shipped"`` or the
    URL), ``available`` (loads without the network: shipped, or downloaded into the cache) and ``requires``
    (the stexp versions that load it).
    """
    import pandas as pd

    rows = []
    for entry in _REGISTRY.values():
        folder = _local_dir(entry)
        size = entry.size_mb
        if entry.url is None and folder is not None:
            size = round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20, 2)
        rows.append(
            {
                "name": entry.name,
                "aliases": ", ".join(entry.aliases),
                "summary": entry.summary,
                "training_data": entry.training_data,
                "genes": entry.n_genes,
                "size_mb": size,
                "source": entry.source,
                "available": folder is not None,
                "requires": f"stexp{entry.requires}",
            }
        )
    return pd.DataFrame(rows).set_index("name")


def _local_dir(entry: PretrainedModel) -> Path | None:
    """The model's folder on this machine (shipped, or downloaded and unpacked), or ``None``."""
    folder = entry.shipped_dir if entry.url is None else _cache_dir() / entry.name
    return folder if (folder / "model.json").is_file() else None


def _cache_dir() -> Path:
    return Path(settings.cachedir) / CACHE_SUBDIR


def check_version(entry: PretrainedModel, version: str | None = None) -> None:
    """Raise a RuntimeError when this stexp (or ``version``) is not one that ``entry`` needs."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    import stexp

    version = stexp.__version__ if version is None else version
    try:
        ok = Version(version) in SpecifierSet(entry.requires, prereleases=True)
    except (InvalidSpecifier, InvalidVersion) as err:
        raise RuntimeError(f"pretrained model {entry.name!r}: cannot compare versions ({err}).") from err
    if not ok:
        raise RuntimeError(
            f"pretrained model {entry.name!r} needs stexp{entry.requires}, this is stexp {version}: "
            "install a stexp that loads it (pip install -U stexp), or choose another model (stexp.models.pretrained())."
        )


def model_dir(name: str, *, archive: str | Path | None = None) -> Path:
    """The folder of the registered model ``name`` on this machine, downloading it when needed.

    Parameters
    ----------
    name
        A name or alias of :func:`pretrained`.
    archive
        A local copy of the model's ``.tar.gz`` (downloaded elsewhere): checked against the registered
        SHA-256 and unpacked into the cache instead of downloading.

    Raises
    ------
    KeyError
        Unknown name.
    RuntimeError
        This stexp cannot load the model (its version); the download failed (offline: the message names
        the URL, the SHA-256 and ``archive=``).
    FileNotFoundError
        A shipped model whose folder is missing from this installation, or an ``archive`` that does not exist.
    ValueError
        An ``archive`` whose SHA-256 differs from the registered one.
    """
    entry = resolve(name)
    check_version(entry)
    if entry.url is None:
        if archive is not None:
            raise ValueError(f"pretrained model {entry.name!r} ships with stexp; archive= is for downloaded models.")
        folder = _local_dir(entry)
        if folder is None:
            raise FileNotFoundError(
                f"pretrained model {entry.name!r} should ship with stexp but its folder {entry.shipped_dir} is missing "
                "from this installation: reinstall stexp, or rebuild it (python benchmarks/build_pretrained.py)."
            )
        return folder
    dest = _cache_dir() / entry.name
    if archive is None and _local_dir(entry) is not None:
        return dest
    file = Path(archive) if archive is not None else _download(entry)
    if not file.is_file():
        raise FileNotFoundError(f"archive {str(file)!r} of pretrained model {entry.name!r} does not exist.")
    digest = _sha256(file)
    if digest != entry.sha256:
        raise ValueError(
            f"archive {str(file)!r} is not the registered {entry.name!r}: its SHA-256 is {digest[:16]}..., the "
            f"registered one {str(entry.sha256)[:16]}...; download it again from {entry.url}."
        )
    _unpack(file, dest)
    return dest


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(entry: PretrainedModel) -> Path:
    """Fetch the archive with pooch (SHA-256 checked) into the cache; a clear error offline."""
    import pooch

    cache = _cache_dir()
    fname = f"{entry.name}.tar.gz"
    try:
        path = pooch.retrieve(
            entry.url, known_hash=f"sha256:{entry.sha256}", fname=fname, path=cache, progressbar=settings.verbosity >= 2
        )
    except Exception as err:  # requests/urllib/socket errors differ by transport; pooch's hash ValueError too
        raise RuntimeError(
            f"could not download pretrained model {entry.name!r} from {entry.url} ({type(err).__name__}: {err}). "
            f"Offline? Download that file on a machine with network access (SHA-256 {entry.sha256}) and pass it: "
            f"stexp.models.load({entry.name!r}, archive='/path/to/{fname}'), or put it at {cache / fname}."
        ) from err
    return Path(path)


def _unpack(file: Path, dest: Path) -> None:
    """Unpack a model archive (its files at the top, or in one folder) into ``dest``, replacing it when complete."""
    from stexp._files import hidden_sibling, move_into_place

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(dest, "tmp")
    try:
        with tarfile.open(file, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        inner = list(tmp.iterdir())
        root = inner[0] if len(inner) == 1 and inner[0].is_dir() else tmp
        if not (root / "model.json").is_file():
            raise ValueError(
                f"archive {str(file)!r} holds no model folder (no model.json at its top or in one folder)."
            )
        if root is not tmp:
            staged = hidden_sibling(dest, "staged")
            root.rename(staged)
            shutil.rmtree(tmp)
            tmp = staged
        move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"unpacked {file.name} into {dest}")


def load(
    path: str | Path,
    *,
    genes: list[str] | None = None,
    encoder_spec: EncoderSpec | dict[str, Any] | None = None,
    device: str = "auto",
    archive: str | Path | None = None,
) -> ExpressionModel:
    """Load a saved model: a model folder, or a pretrained model by name (:func:`stexp.models.pretrained`).

    Parameters
    ----------
    path
        A model folder (saved with :meth:`~stexp.models.ExpressionModel.save`; an existing path is always
        taken as one), or the name of a registered pretrained model (``"her2st-breast"``,
        ``"her2st-breast-v1"``): a shipped one loads from the package, a downloaded one from the cache
        (fetched on first use, SHA-256 checked).
    genes, encoder_spec, device
        See :func:`stexp.models._base.load`: the panel and feature spec the caller expects, and where to predict.
    archive
        For a downloaded pretrained model: a local copy of its archive, used instead of the network.

    Raises
    ------
    FileNotFoundError
        Neither a model folder nor a registered name (the message lists the names).
    RuntimeError
        A pretrained model this stexp cannot load (its version), or a download that failed (offline).
    ValueError
        See :func:`stexp.models._base.load`.
    """
    from ._base import load as load_dir

    p = Path(path)
    if archive is None and (p.exists() or str(path) not in _names()):
        try:
            return load_dir(p, genes=genes, encoder_spec=encoder_spec, device=device)
        except FileNotFoundError as err:
            if p.exists():
                raise
            raise FileNotFoundError(
                f"{err} Nor is {str(path)!r} a pretrained model name: {sorted(_names())} (stexp.models.pretrained())."
            ) from err
    folder = model_dir(str(path), archive=archive)
    model = load_dir(folder, genes=genes, encoder_spec=encoder_spec, device=device)
    if model.card.name is None:
        model.card.name = resolve(str(path)).name
    return model
