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
        raise ValueError(f"cannot decode image {str(path)!r}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    try:
        yield image
    finally:
        image.close()


def decode_image(
    path: str | Path, *, max_px: int | None = None, what: str = "", resample: str = "LANCZOS"
) -> tuple[Any, tuple[int, int]]:
    """Decode an image file as an RGB PIL image, at most ``max_px`` on its longest side, and its full size.

    With ``max_px`` a JPEG is decoded directly at the smallest DCT scale that is still large enough
    (``draft``), then resampled. 16- and 32-bit images are scaled by their range (Pillow's
    ``convert("RGB")`` would clip them to 255). ``what`` prefixes error messages (e.g. the library).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file cannot be decoded (not an image, truncated, unknown codec); the message names it.
    """
    from PIL import Image

    from ._pixels import pil_to_uint8_rgb

    with open_image(path) as im:
        width, height = im.size
        scale = 1.0 if max_px is None else min(1.0, max_px / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        try:
            if scale < 1.0:
                im.draft("RGB", size)
            if im.mode == "RGB":
                im.load()
                rgb = im.copy()
            else:
                rgb = Image.fromarray(pil_to_uint8_rgb(im, what=f"{what}image {str(path)!r}"))
        except OSError as err:  # truncated, unknown codec
            raise ValueError(f"{what}cannot decode image {str(path)!r}: {err}") from err
    if rgb.size != size:
        rgb = rgb.resize(size, getattr(Image.Resampling, resample))
    return rgb, (int(width), int(height))


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

        from ._pixels import as_uint8_rgb

        if self.path is not None:
            return decode_image(self.path, what=f"library {self.library_id!r}: ")[0]
        return Image.fromarray(as_uint8_rgb(self.array, what=f"library {self.library_id!r}: image {self.source!r}"))

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
            h.update(memoryview(a).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
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
