"""One view per slide image: which image of a library is read, its scale, µm/px and extent, and how to open it.

Every part of stexp that needs a library's image (the patch reader, ``embed_images``, the fine-tuning
dataset, ``stexp.io.validate``) asks :func:`slide_view`, so one rule decides which image is used:
the full-resolution file ``metadata["source_image_path"]`` when it exists, else the in-memory image
with the largest ``tissue_<res>_scalef``. :func:`open_image` is the one place image files are opened.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stexp._layout import scalefactors, spatial_entry, um_per_px

#: ``SlideView.source`` of a slide read from ``metadata["source_image_path"]``.
SOURCE_FILE = "source_image_path"


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Any]:
    """Open an image file with Pillow without decoding it, with Pillow's decompression-bomb limit lifted.

    Whole-slide H&E images are larger than Pillow's default limit (89 M px); they are the data here,
    not an attack. The limit is restored as soon as the header is read.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If Pillow cannot read it; the message names the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image file {str(path)!r}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    try:
        yield image
    finally:
        image.close()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    with open_image(path) as im:
        return int(im.size[0]), int(im.size[1])


def _source_path(entry: dict) -> Path | None:
    source = (entry.get("metadata") or {}).get("source_image_path")
    if source is None or str(source) in ("", "None"):
        return None
    return Path(str(source))


@dataclass(frozen=True)
class SlideView:
    """The image stexp reads for one library, without decoding it.

    Attributes
    ----------
    library_id
        The library.
    source
        ``"source_image_path"`` (the full-resolution file) or the in-memory resolution (``"hires"``...).
    scale
        Image px per full-resolution px (1.0 for the full-resolution file, ``tissue_<res>_scalef`` otherwise).
    size
        ``(width, height)`` of the image in its own pixels.
    path
        The file, for ``source="source_image_path"``.
    array
        The in-memory image, otherwise.
    """

    library_id: str
    source: str
    scale: float
    size: tuple[int, int]
    path: Path | None = None
    array: Any = field(default=None, repr=False, compare=False)

    @property
    def extent(self) -> tuple[float, float]:
        """``(width, height)`` of the image in full-resolution pixels."""
        return self.size[0] / self.scale, self.size[1] / self.scale

    def decode(self):
        """The image as an RGB PIL image (decoded now: keep one slide decoded at a time)."""
        from PIL import Image

        if self.path is not None:
            with open_image(self.path) as im:
                im.load()
                return im.convert("RGB") if im.mode != "RGB" else im.copy()
        return Image.fromarray(_as_uint8_rgb(self.array, self.library_id, self.source))

    def fingerprint(self) -> str:
        """A content hash of the image (file bytes, or array bytes and shape) and of its scale."""
        h = hashlib.sha256()
        h.update(f"{self.source}:{self.scale!r}".encode())
        if self.path is not None:
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        else:
            a = np.ascontiguousarray(np.asarray(self.array))
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()


def slide_view(adata, library_id: str) -> SlideView:
    """The image of a library that stexp reads: the full-resolution file when it exists, else the largest in memory.

    "Largest" means the largest ``tissue_<res>_scalef`` (the finest resolution).

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
        return SlideView(str(library_id), SOURCE_FILE, 1.0, image_size(path), path=path)
    images = entry.get("images") or {}
    if images:
        sf = scalefactors(adata, library_id)
        best: tuple[str, float] | None = None
        for res in images:
            key = f"tissue_{res}_scalef"
            if key not in sf:
                raise KeyError(
                    f"library {library_id!r}: image {res!r} has no scale factor {key!r} in "
                    f"adata.uns['spatial'][{library_id!r}]['scalefactors'] (it has {sorted(sf)})."
                )
            if best is None or float(sf[key]) > best[1]:
                best = (str(res), float(sf[key]))
        assert best is not None
        array = images[best[0]]
        h, w = np.shape(array)[:2]
        return SlideView(str(library_id), best[0], best[1], (int(w), int(h)), array=array)
    if path is not None:
        raise FileNotFoundError(
            f"library {library_id!r}: source_image_path {str(path)!r} does not exist and there is no in-memory image."
        )
    raise ValueError(
        f"library {library_id!r} has no image: neither adata.uns['spatial'][{library_id!r}]['images'] nor "
        "metadata['source_image_path']; image features cannot be computed for it."
    )


def has_image(adata, library_id: str) -> bool:
    """Whether :func:`slide_view` finds an image for the library."""
    entry = spatial_entry(adata, library_id)
    path = _source_path(entry)
    return bool(entry.get("images")) or (path is not None and path.is_file())


def image_um_per_px(adata, view: SlideView) -> float:
    """µm per pixel of the view's image (µm per full-resolution px divided by its scale)."""
    return um_per_px(adata, view.library_id) / view.scale


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
