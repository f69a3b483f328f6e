"""What a model sees of an AnnData: features, targets and spot geometry as plain arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SpotData:
    """Spots of one or more slides, as the arrays a model trains or predicts on.

    Attributes
    ----------
    features
        Frozen image features ``(n_spots, D)``, float32.
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
    adata, obs_index
        The source AnnData and the integer rows of the spots in it: models that fine-tune the
        image encoder read patches through them.
    library_key
        The ``obs`` column of ``adata`` that names the slides.
    """

    features: np.ndarray
    library: np.ndarray
    array_rc: np.ndarray
    coords_um: np.ndarray
    target: np.ndarray | None = None
    patient: np.ndarray | None = None
    obs_names: np.ndarray | None = None
    adata: object | None = field(default=None, repr=False)
    obs_index: np.ndarray | None = None
    library_key: str = "library_id"

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("library", "array_rc", "coords_um", "target", "patient"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"SpotData.{name} has {value.shape[0]} rows, features have {n}.")

    @property
    def n_spots(self) -> int:
        return int(self.features.shape[0])

    @property
    def libraries(self) -> list[str]:
        """Library ids in order of appearance."""
        return list(dict.fromkeys(self.library.tolist()))

    def subset(self, mask: np.ndarray) -> SpotData:
        """The spots selected by a boolean mask or integer index."""
        take = lambda a: None if a is None else a[mask]
        return SpotData(
            features=self.features[mask],
            library=self.library[mask],
            array_rc=self.array_rc[mask],
            coords_um=self.coords_um[mask],
            target=take(self.target),
            patient=take(self.patient),
            obs_names=take(self.obs_names),
            adata=self.adata,
            obs_index=take(self.obs_index),
            library_key=self.library_key,
        )
