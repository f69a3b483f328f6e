"""What a model sees of an AnnData: features, targets and spot geometry as plain arrays (never the AnnData)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: Held-out spots that a choice made on inner folds (retrieval temperature, smoothing σ, calibration) scores at
#: most: above it, a slide-stratified sample of spatial windows (:func:`inner_query_sample`), so that the
#: choice costs (queries x bank) grow linearly with the training spots instead of with their square.
MAX_INNER_QUERIES = 20_000


@dataclass
class SpotData:
    """Spots of one or more slides, as the arrays a model trains or predicts on.

    Attributes
    ----------
    features
        Frozen image features ``(n_spots, D)``, float32; may be a read-only memory map (features on disk,
        read by rows where a model allows).
    library
        Slide of each spot ``(n_spots,)``, strings.
    array_rc
        Integer array coordinates ``(n_spots, 2)`` as (row, col); used for position embeddings.
    coords_um
        Spot centres in µm ``(n_spots, 2)`` as (x, y), within each slide; used for neighbourhoods.
    target
        Expression target ``(n_spots, n_genes)`` (log1p of counts per 10k), or ``None`` at
        prediction time when nothing was measured.
    patient
        Patient of each spot, when known.
    obs_names
        Spot ids, for messages.
    depth
        Total counts of each spot over every measured gene (its sequencing depth), when measured; the
        calibration's ``"depth"`` difficulty score learns to predict it from the image.
    patches
        The spots' image patches (a :class:`stexp.images.PatchSource`, rows -> uint8 patches), for
        models that fine-tune the image encoder; ``None`` on frozen features.
    """

    features: np.ndarray
    library: np.ndarray
    array_rc: np.ndarray
    coords_um: np.ndarray
    target: np.ndarray | None = None
    patient: np.ndarray | None = None
    obs_names: np.ndarray | None = None
    depth: np.ndarray | None = None
    patches: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("library", "array_rc", "coords_um", "target", "patient", "obs_names", "depth"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"SpotData.{name} has {value.shape[0]} rows, features have {n}.")
        if self.patches is not None and len(self.patches) != n:
            raise ValueError(f"SpotData.patches has {len(self.patches)} spots, features have {n}.")

    @property
    def n_spots(self) -> int:
        return int(self.features.shape[0])

    @property
    def libraries(self) -> list[str]:
        """Library ids in order of appearance."""
        return list(dict.fromkeys(self.library.tolist()))

    def subset(self, mask: np.ndarray) -> SpotData:
        """The spots selected by a boolean mask or integer index.

        A boolean mask that keeps every spot returns a shallow copy that shares the arrays (features on disk,
        e.g. a memory map, stay on disk).
        """
        mask = np.asarray(mask)
        if mask.dtype == bool and mask.shape == (self.n_spots,) and mask.all():
            return replace(self)
        take = lambda a: None if a is None else a[mask]
        return SpotData(
            features=self.features[mask],
            library=self.library[mask],
            array_rc=self.array_rc[mask],
            coords_um=self.coords_um[mask],
            target=take(self.target),
            patient=take(self.patient),
            obs_names=take(self.obs_names),
            depth=take(self.depth),
            patches=None if self.patches is None else self.patches.subset(mask),
        )

    def with_genes(self, columns: np.ndarray) -> SpotData:
        """The same spots with the target restricted to ``columns`` (a gene panel of a wider target)."""
        return replace(self, target=None if self.target is None else self.target[:, columns])


def inner_query_sample(data: SpotData, rows: np.ndarray, max_rows: int | None, *, seed: int = 0) -> np.ndarray:
    """At most ``max_rows`` of ``rows`` (sorted), stratified by slide, each slide's share a spatial window.

    Every slide of ``rows`` keeps a share proportional to its spots (at least one spot); within a slide the
    share is the spots nearest (in µm) to one seeded spot of it, a contiguous window, so that smoothing a
    prediction over the sample still finds each spot's neighbours. All of ``rows`` when they are few enough
    (``max_rows=None``: always).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if max_rows is None or rows.size <= max_rows:
        return np.sort(rows)
    if int(max_rows) < 1:
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}.")
    rng = np.random.default_rng(seed)
    library = np.asarray(data.library).astype(str)[rows]
    coords = np.asarray(data.coords_um, dtype=np.float64)[rows]
    keep = []
    for lib in dict.fromkeys(library.tolist()):
        members = np.flatnonzero(library == lib)
        share = max(1, int(round(max_rows * members.size / rows.size)))
        if share >= members.size:
            keep.append(members)
            continue
        centre = coords[members[rng.integers(members.size)]]
        d2 = ((coords[members] - centre) ** 2).sum(axis=1)
        keep.append(members[np.argsort(d2, kind="stable")[:share]])
    return np.sort(rows[np.concatenate(keep)])
