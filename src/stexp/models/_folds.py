"""Inner folds: the one rule by which every choice made on training slides holds spots out.

The smoothing σ, the retrieval temperature, ridge's penalty and the calibration all score a choice on
training spots that an inner model did not see. They share one rule (:func:`inner_folds`), so that a
choice is made on the same kind of split everywhere, and the rule is recorded in the model's history:

1. **patients**, when the training spots come from two or more patients (``SpotData.patient``);
2. else **slides**, when they come from two or more slides;
3. else **spatial blocks** of the single slide: contiguous stripes along its longer axis (optimistic,
   since the blocks share the slide's staining; a warning says so where it matters).

Groups are assigned to at most ``n_folds`` folds, largest first, each to the fold holding the fewest
spots so far (deterministic, balanced). Plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._data import SpotData

#: Inner folds of every choice made on training slides, unless a caller asks for another number.
INNER_FOLDS = 3
#: ``InnerFolds.unit`` of a single training slide (the optimistic case).
SINGLE_SLIDE = "spatial blocks"


@dataclass(frozen=True)
class InnerFolds:
    """Inner (fit, held-out) splits of training spots.

    Attributes
    ----------
    splits
        ``(fit_index, held_out_index)`` pairs, one per fold; every spot is held out exactly once.
    fold
        ``(n_spots,)``: the fold in which each spot is held out.
    groups
        ``(n_spots,)``: each spot's group (patient, slide or ``"block_<i>"``).
    unit
        ``"patients"``, ``"slides"`` or :data:`SINGLE_SLIDE`.
    """

    splits: list[tuple[np.ndarray, np.ndarray]]
    fold: np.ndarray
    groups: np.ndarray
    unit: str

    @property
    def n_folds(self) -> int:
        """Number of folds."""
        return len(self.splits)

    @property
    def how(self) -> str:
        """What the folds are, for logs and histories (e.g. ``"3 folds by slides"``)."""
        return f"{self.n_folds} folds by {self.unit}"

    @property
    def single_slide(self) -> bool:
        """Whether the folds are blocks of one slide (optimistic for other slides)."""
        return self.unit == SINGLE_SLIDE

    def scoring_library(self, library: np.ndarray) -> np.ndarray:
        """Each spot's slide, split by block when the folds are blocks of one slide (each block scored as a slide)."""
        library = np.asarray(library).astype(str)
        if not self.single_slide:
            return library
        return np.char.add(np.char.add(library, "|"), np.asarray(self.groups).astype(str))


def _group_labels(data: SpotData, n_folds: int) -> tuple[np.ndarray, str]:
    if data.patient is not None and len(set(np.asarray(data.patient).astype(str))) >= 2:
        return np.asarray(data.patient).astype(str), "patients"
    libs = np.asarray(data.library).astype(str)
    if len(set(libs)) >= 2:
        return libs, "slides"
    xy = np.asarray(data.coords_um, dtype=np.float64)
    n = xy.shape[0]
    axis = int(np.argmax(xy.max(axis=0) - xy.min(axis=0))) if n else 0
    ranks = np.argsort(np.argsort(xy[:, axis], kind="stable"), kind="stable") if n else np.zeros(0, int)
    blocks = (ranks * n_folds // max(n, 1)).astype(int)
    return np.asarray([f"block_{b}" for b in blocks], dtype=object).astype(str), SINGLE_SLIDE


def inner_folds(data: SpotData, n_folds: int = INNER_FOLDS) -> InnerFolds:
    """Inner folds of training spots by patients, else slides, else spatial blocks (see the module doc).

    Parameters
    ----------
    data
        The training spots (their ``patient``, ``library`` and ``coords_um`` are read).
    n_folds
        Folds at most (fewer when there are fewer groups); at least 2.

    Raises
    ------
    ValueError
        If ``n_folds < 2`` or there are fewer than 2 spots.
    """
    if int(n_folds) != n_folds or n_folds < 2:
        raise ValueError(f"inner folds: n_folds must be an integer >= 2, got {n_folds!r}.")
    if data.n_spots < 2:
        raise ValueError(f"inner folds need at least 2 training spots, got {data.n_spots}.")
    groups, unit = _group_labels(data, int(n_folds))
    names = list(dict.fromkeys(groups.tolist()))
    k = min(int(n_folds), len(names))
    sizes = {g: int((groups == g).sum()) for g in names}
    load = [0] * k
    fold_of: dict[str, int] = {}
    for g in sorted(names, key=lambda g: (-sizes[g], g)):
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    fold = np.asarray([fold_of[g] for g in groups], dtype=np.int64)
    splits = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]
    return InnerFolds(splits=splits, fold=fold, groups=groups, unit=unit)
