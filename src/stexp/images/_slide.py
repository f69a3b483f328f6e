"""Image sources: the best resolution available for a library, decoded once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stexp._layout import scalefactors, spatial_entry


@dataclass
class Slide:
    """One decoded slide image.

    Attributes
    ----------
    library_id
        The library it belongs to.
    image
        The decoded image as a PIL RGB image.
    scale
        Image px per full-resolution px (1.0 for the full-resolution file, ``tissue_<res>_scalef`` otherwise).
    source
        ``"source_image_path"`` or the in-memory resolution name (``"hires"``...).
    """

    library_id: str
    image: Any
    scale: float
    source: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in image pixels."""
        return self.image.size


def _source_path(entry: dict) -> Path | None:
    source = (entry.get("metadata") or {}).get("source_image_path")
    if source is None or str(source) in ("", "None"):
        return None
    return Path(str(source))


def best_source(adata, library_id: str) -> tuple[str, float]:
    """Which image of a library :func:`load_slide` decodes, and its scale (image px per full-res px).

    The full-resolution file ``metadata["source_image_path"]`` (scale 1.0) when it exists, else the
    in-memory image with the largest ``tissue_<res>_scalef``.

    Raises
    ------
    ValueError
        If the library has no image at all.
    KeyError
        If an in-memory image has no ``tissue_<res>_scalef``.
    FileNotFoundError
        If the only image is a ``source_image_path`` that does not exist.
    """
    entry = spatial_entry(adata, library_id)
    path = _source_path(entry)
    if path is not None and path.is_file():
        return "source_image_path", 1.0
    images = entry.get("images") or {}
    if images:
        sf = scalefactors(adata, library_id)
        best = None
        for res in images:
            key = f"tissue_{res}_scalef"
            if key not in sf:
                raise KeyError(
                    f"library {library_id!r}: image {res!r} has no scale factor {key!r} in "
                    f"adata.uns['spatial'][{library_id!r}]['scalefactors'] (it has {sorted(sf)})."
                )
            if best is None or float(sf[key]) > best[1]:
                best = (str(res), float(sf[key]))
        return best
    if path is not None:
        raise FileNotFoundError(
            f"library {library_id!r}: source_image_path {str(path)!r} does not exist and there is no in-memory image."
        )
    raise ValueError(
        f"library {library_id!r} has no image: neither adata.uns['spatial'][{library_id!r}]['images'] nor "
        "metadata['source_image_path']; image features cannot be computed for it."
    )


def load_slide(adata, library_id: str) -> Slide:
    """Decode the best image of a library (see :func:`best_source`) as an RGB PIL image."""
    from PIL import Image

    source, scale = best_source(adata, library_id)
    entry = spatial_entry(adata, library_id)
    if source == "source_image_path":
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(_source_path(entry)) as im:
                im.load()
                image = im.convert("RGB")
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    else:
        image = Image.fromarray(_as_uint8_rgb(entry["images"][source], library_id, source))
    return Slide(library_id=str(library_id), image=image, scale=scale, source=source)


def _as_uint8_rgb(arr, library_id: str, res: str) -> np.ndarray:
    """An in-memory image as contiguous uint8 (H, W, 3); floats in [0, 1] are scaled to [0, 255]."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"library {library_id!r}: image {res!r} must be (H, W, 3) RGB, got shape {a.shape}.")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and np.nanmax(a) <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def slide_fingerprint(adata, library_id: str) -> str:
    """A content hash of the image :func:`load_slide` would decode (file bytes, or array bytes + shape)."""
    source, scale = best_source(adata, library_id)
    entry = spatial_entry(adata, library_id)
    h = hashlib.sha256()
    h.update(f"{source}:{scale!r}".encode())
    if source == "source_image_path":
        with open(_source_path(entry), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    else:
        a = np.ascontiguousarray(np.asarray(entry["images"][source]))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
