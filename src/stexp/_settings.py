"""Global settings: verbosity, seed, device and cache directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("stexp")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False

_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


class _Settings:
    """Package-wide settings, available as ``stexp.settings``.

    Attributes
    ----------
    verbosity
        0 errors, 1 warnings, 2 info (default: what was added to the AnnData), 3 debug.
        Progress bars show at verbosity >= 2.
    seed
        Default random seed used when a function's ``seed`` is not given.
    device
        What ``device="auto"`` means: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``; checked where a ``device="auto"`` enters stexp.
    cachedir
        Where image features and downloaded data are cached. Defaults to
        ``$STEXP_CACHE_DIR`` or ``~/.cache/stexp``.
    n_jobs
        CPU threads stexp's torch work uses (training, encoders); default: all cores. Set for the duration
        of each stexp call and restored afterwards, so the caller's ``torch.get_num_threads()`` is kept.
    """

    def __init__(self) -> None:
        self._verbosity = 2
        self.seed = 0
        self.device = "auto"
        self._cachedir = Path(os.environ.get("STEXP_CACHE_DIR", Path.home() / ".cache" / "stexp"))
        self._n_jobs = os.cpu_count() or 1
        logger.setLevel(_LEVELS[self._verbosity])

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if value not in _LEVELS:
            raise ValueError(f"verbosity must be one of {sorted(_LEVELS)}, got {value!r}")
        self._verbosity = value
        logger.setLevel(_LEVELS[value])

    @property
    def n_jobs(self) -> int:
        return self._n_jobs

    @n_jobs.setter
    def n_jobs(self, value: int) -> None:
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"n_jobs must be a positive integer, got {value!r}")
        self._n_jobs = int(value)

    @property
    def num_workers(self) -> int:
        """Deprecated name of :attr:`n_jobs`."""
        return self._n_jobs

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        import warnings

        warnings.warn("stexp.settings.num_workers is now stexp.settings.n_jobs", FutureWarning, stacklevel=2)
        self.n_jobs = value

    @property
    def cachedir(self) -> Path:
        return self._cachedir

    @cachedir.setter
    def cachedir(self, value: str | os.PathLike) -> None:
        self._cachedir = Path(value).expanduser()

    @property
    def show_progress(self) -> bool:
        """Whether progress bars are shown (``verbosity >= 2``)."""
        return self._verbosity >= 2

    def resolve_device(self, device: str | None = "auto") -> str:
        """Turn ``"auto"`` (or ``None``) into ``"cuda"`` or ``"cpu"``."""
        device = self.device if device in (None, "auto") else device
        if device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return str(device)

    def __repr__(self) -> str:
        return (
            f"stexp.settings(verbosity={self.verbosity}, seed={self.seed}, device={self.device!r}, "
            f"cachedir={str(self.cachedir)!r}, n_jobs={self.n_jobs})"
        )


settings = _Settings()
