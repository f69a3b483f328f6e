"""A torch Dataset of spot patches for end-to-end fine-tuning of an image encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from stexp._layout import LIBRARY_KEY
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from stexp.images._encoders import Encoder

from stexp.images._encoders import IMAGENET_MEAN, IMAGENET_STD


def _positions(adata, obs_index) -> np.ndarray:
    """Integer rows of ``adata`` from obs names, integer positions or a boolean mask (``None``: all)."""
    n = adata.n_obs
    if obs_index is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(obs_index, str):
        obs_index = [obs_index]
    idx = np.asarray(obs_index)
    if idx.ndim != 1:
        raise ValueError(f"obs_index must be one-dimensional, got shape {idx.shape}.")
    if idx.dtype == bool:
        if len(idx) != n:
            raise ValueError(f"boolean obs_index has {len(idx)} entries, adata has {n} spots.")
        return np.flatnonzero(idx).astype(np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(idx.dtype, np.integer):
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            raise IndexError(
                f"{int(bad.sum())} integer positions in obs_index are outside [0, {n}) (e.g. {idx[bad][:5].tolist()})."
            )
        return idx.astype(np.int64)
    names = idx.astype(str)
    pos = adata.obs_names.get_indexer(names)
    if (pos < 0).any():
        missing = names[pos < 0]
        raise KeyError(
            f"{len(missing)} of {len(names)} obs names are not in adata.obs_names (e.g. {missing[:5].tolist()})."
        )
    return pos.astype(np.int64)


class PatchDataset(torch.utils.data.Dataset):
    """Spot patches as a :class:`torch.utils.data.Dataset`, with optional augmentation.

    All patches are cut once at construction (each slide decoded once, one slide in memory at a time)
    from a :class:`stexp.images.PatchSource` and held in memory as uint8: ``out_px² x 3`` bytes per spot
    (150 KB at 224 px, i.e. ~1.5 GB for 10,000 spots). Items are augmented on the fly. Build one from an
    AnnData with :meth:`from_adata`.

    Parameters
    ----------
    source
        The spots' patches.
    encoder
        Gives the normalisation (mean/std) and the default ``out_px``; ``None``: ImageNet mean/std, 224 px.
    out_px
        Patch side in pixels; ``None``: ``encoder.input_px`` (224 without an encoder).
    augment
        Random horizontal/vertical flips, 90° rotations and colour jitter per item. ``False``: items are
        deterministic.
    color_jitter
        Strength of brightness/contrast/saturation jitter (factors drawn in ``[1 - s, 1 + s]``); 0 disables it.
    hed_jitter
        Strength ``s`` of HED stain augmentation (Tellez et al., Med. Image Anal. 58, 2019): each item's
        haematoxylin, eosin and DAB optical densities (:func:`skimage.color.rgb2hed`) are scaled by factors
        drawn in ``[1 - s, 1 + s]`` and shifted by offsets drawn in ``[-s, s]``, per channel
        (``0.05``: their "HED-light", ``0.2``: "HED-strong"); 0 (default) disables it. Applied with
        ``augment`` only, before the colour jitter.
    positions
        What ``dataset[i]`` returns as the spot's position (default ``0..n-1``).

    Attributes
    ----------
    positions
        ``int64`` position of each item (rows of the AnnData for :meth:`from_adata`).
    patches
        uint8 ``(n, out_px, out_px, 3)`` unaugmented patches.

    Notes
    -----
    ``dataset[i]`` returns ``(x, position)``: ``x`` float32 ``(3, out_px, out_px)`` normalised with the
    encoder's mean/std and ``position`` an integer (index targets with it, e.g. ``Y[position]``).
    Randomness comes from torch's generator, so DataLoader workers are seeded by torch.
    """

    def __init__(
        self,
        source,
        *,
        encoder: Encoder | None = None,
        out_px: int | None = None,
        augment: bool = True,
        color_jitter: float = 0.1,
        hed_jitter: float = 0.0,
        positions: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        color_jitter, hed_jitter = float(color_jitter), float(hed_jitter)
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}.")
        if not 0.0 <= hed_jitter < 1.0:
            raise ValueError(f"hed_jitter must be in [0, 1), got {hed_jitter}.")
        if out_px is None:
            out_px = encoder.input_px if encoder is not None else 224
        out_px = int(out_px)
        if out_px < 1:
            raise ValueError(f"out_px must be a positive number of pixels, got {out_px}.")
        if len(source) == 0:
            raise ValueError("the PatchDataset would be empty: no spots selected.")
        self.patches = source.read(out_px)
        self.positions = np.arange(len(source), dtype=np.int64) if positions is None else np.asarray(positions)
        self.out_px = out_px
        self.augment = bool(augment)
        self.color_jitter = color_jitter
        self.hed_jitter = hed_jitter
        self.mean = tuple(encoder.mean) if encoder is not None else IMAGENET_MEAN
        self.std = tuple(encoder.std) if encoder is not None else IMAGENET_STD
        self._jitter = None
        n_libs = len(source.libraries)
        logger.info(
            f"PatchDataset: {len(self.positions)} patches of {out_px} px from {n_libs} librar"
            f"{'y' if n_libs == 1 else 'ies'} in memory ({self.patches.nbytes / 2**20:.0f} MiB)."
        )

    @classmethod
    def from_adata(
        cls,
        adata,
        obs_index: Sequence[str] | Sequence[int] | np.ndarray | None = None,
        *,
        patch_um: float | None = None,
        library_key: str = LIBRARY_KEY,
        on_outside: Literal["raise", "drop"] = "raise",
        **kwargs,
    ) -> PatchDataset:
        """The patches of spots of an AnnData.

        Parameters
        ----------
        adata
            AnnData in stexp's layout.
        obs_index
            The spots: obs names (strings), integer row positions, a boolean mask over ``adata.obs``, or
            ``None`` for all spots. Order is kept; duplicates are allowed.
        patch_um
            Patch side in µm; ``None``: :func:`stexp.images.default_patch_um` of each library.
        library_key
            Column of ``adata.obs`` with the library ids.
        on_outside
            Spots whose centre lies outside their image: ``"raise"`` a ValueError, or ``"drop"`` them from
            the dataset with a warning (see :attr:`positions`).
        **kwargs
            ``encoder``, ``out_px``, ``augment``, ``color_jitter``, ``hed_jitter`` of :class:`PatchDataset`.
        """
        from stexp.images._patches import PatchSource

        if on_outside not in ("raise", "drop"):
            raise ValueError(f"on_outside must be 'raise' or 'drop', got {on_outside!r}.")
        positions = _positions(adata, obs_index)
        if len(positions) == 0:
            raise ValueError("obs_index selects no spots: the PatchDataset would be empty.")
        source = PatchSource.from_adata(
            adata, patch_um=patch_um, library_key=library_key, rows=positions, on_outside=on_outside
        )
        keep = source.inside
        if not keep.all():
            logger.warning(f"PatchDataset: dropped {int((~keep).sum())} of {len(keep)} spots outside their image.")
            if not keep.any():
                raise ValueError("every selected spot lies outside its image: the PatchDataset would be empty.")
            positions, source = positions[keep], source.subset(keep)
        return cls(source, positions=positions, **kwargs)

    def __len__(self) -> int:
        return len(self.positions)

    def _augment(self, x):
        """Random dihedral transform (flips, 90° rotations), HED and colour jitter of a uint8 (3, H, W) tensor."""
        k = int(torch.randint(4, ()).item())
        if k:
            x = torch.rot90(x, k, dims=(1, 2))
        if torch.rand(()) < 0.5:
            x = torch.flip(x, dims=(2,))
        if torch.rand(()) < 0.5:
            x = torch.flip(x, dims=(1,))
        if self.hed_jitter > 0:
            from stexp.images._stain import hed_shift

            s = self.hed_jitter
            scale = (1.0 - s + 2.0 * s * torch.rand(3, dtype=torch.float64)).tolist()
            offset = (s * (2.0 * torch.rand(3, dtype=torch.float64) - 1.0)).tolist()
            rgb = hed_shift(x.permute(1, 2, 0).numpy(), scale=tuple(scale), offset=tuple(offset))
            x = torch.from_numpy(rgb).permute(2, 0, 1)
        if self.color_jitter > 0:
            if self._jitter is None:
                from torchvision.transforms import v2

                s = self.color_jitter
                self._jitter = v2.ColorJitter(brightness=s, contrast=s, saturation=s)
            x = self._jitter(x)
        return x

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"PatchDataset index {i} out of range for {len(self)} patches.")
        x = torch.from_numpy(self.patches[i]).permute(2, 0, 1)
        if self.augment:
            x = self._augment(x)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return x.sub_(mean).div_(std).contiguous(), int(self.positions[i])

    def __repr__(self) -> str:
        return (
            f"PatchDataset({len(self)} spots, {self.out_px} px, augment={self.augment}, hed_jitter={self.hed_jitter})"
        )
