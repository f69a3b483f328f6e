"""One view per slide image: which image of a library is read, its scale, µm/px and extent, and how to open it.

Every part of stexp that needs a library's image (the patch reader, ``embed_images``, the fine-tuning
dataset, ``stexp.io.validate``) asks :func:`slide_view`, so one rule decides which image is used:
the full-resolution file ``metadata["source_image_path"]`` when it exists, else the in-memory image
with the largest ``tissue_<res>_scalef``. :func:`open_image` is the one place image files are opened
with Pillow (JPEG, PNG: decoded whole); :class:`RegionReader` the one place whole-slide files (pyramidal
and plain TIFF, SVS, NDPI, SCN, OME-TIFF; MRXS and other non-TIFF formats through OpenSlide when it is
installed) are opened: they are read region by region at a pyramid level and never decoded whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
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


#: File suffixes read region by region through :class:`RegionReader` (never decoded whole).
REGION_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf", ".qptiff", ".bif", ".mrxs", ".vms", ".vmu")
#: Formats that only OpenSlide reads (not TIFF containers).
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu")


def is_region_file(path: str | Path) -> bool:
    """Whether an image is read region by region (:class:`RegionReader`) rather than decoded whole.

    True for the whole-slide suffixes (:data:`REGION_SUFFIXES`) and for an OME-Zarr image folder (e.g. an
    image element of a SpatialData zarr store, ``sdata.zarr/images/<key>``).
    """
    path = Path(path)
    return path.suffix.lower() in REGION_SUFFIXES or _is_ome_zarr(path)


def _is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zattrs", ".zgroup"))


def _ome_zarr_levels(path: Path) -> list:
    """The arrays of an OME-Zarr multiscale image folder, finest first (zarr arrays: read chunk by chunk)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs: dict[str, Any] = dict(group.attrs)
    multiscales: Any = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        raise ValueError(f"{str(path)!r} is a zarr folder without OME 'multiscales' metadata; not an image.")
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", ["c", "y", "x"])]
    if axes != ["c", "y", "x"]:
        raise ValueError(f"OME-Zarr image {str(path)!r} has axes {axes}; stexp reads (c, y, x) images.")
    return [group[d["path"]] for d in multiscales[0]["datasets"]]


def _white_rgb(arr: np.ndarray, *, what: str) -> np.ndarray:
    from ._pixels import as_uint8_rgb

    if arr.ndim == 3 and arr.shape[-1] == 4 and arr.dtype == np.uint8:  # OpenSlide RGBA: transparent = no data
        rgb = np.array(arr[..., :3])
        rgb[arr[..., 3] == 0] = 255
        return rgb
    return as_uint8_rgb(arr, what=what)


class RegionReader:
    """Regions of a slide file at any pyramid level; the rest of the file is never decoded.

    The reader is **tiffslide** (pure Python over tifffile + zarr, which stexp already depends on): it
    reads every TIFF-based format (SVS, NDPI, SCN, Philips, generic tiled or stripped TIFF such as Space
    Ranger's full-resolution images, and OME-TIFF pyramids in SubIFDs, which OpenSlide does not read),
    installs everywhere from a wheel without a C library, decodes tiles with imagecodecs outside the GIL
    (so a background thread overlaps reading with the encoder) and speaks OpenSlide's API. Formats that
    are not TIFF containers (MRXS, VMS) are opened with **OpenSlide** (``pip install openslide-python
    openslide-bin``) when it is installed. wsidata was not chosen: it adds a SpatialData-based object
    model on top of these same readers, which stexp does not need.

    Parameters
    ----------
    path
        The slide file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If no reader can open it; the message names the file.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path.is_file() or _is_ome_zarr(path)):
            raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
        self.path = path
        self.kind = "tiffslide"
        self._slide: Any  # tiffslide.TiffSlide, openslide.OpenSlide or ArrayPyramid
        if _is_ome_zarr(path):
            self.kind = "ome-zarr"
            self._slide = ArrayPyramid(_ome_zarr_levels(path), channels_first=True, what=f"image {str(path)!r}")
        elif path.suffix.lower() in OPENSLIDE_ONLY:
            self._slide = self._open_openslide(path, None)
        else:
            try:
                import tiffslide

                self._slide = tiffslide.TiffSlide(path)
                self._slide.level_dimensions  # noqa: B018 - parse the pyramid now, so bad files fail here
            except Exception as err:  # noqa: BLE001 - tiffslide raises many types for unreadable files
                self._slide = self._open_openslide(path, err)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in self._slide.level_dimensions
        )
        w0 = self.level_dimensions[0][0]
        self.level_downsamples: tuple[float, ...] = tuple(w0 / max(w, 1) for w, _ in self.level_dimensions)

    def _open_openslide(self, path: Path, first_error: Exception | None):
        try:
            import openslide
        except ImportError:
            why = f" ({type(first_error).__name__}: {first_error})" if first_error is not None else ""
            raise ValueError(
                f"cannot read slide {str(path)!r}{why}; formats that are not TIFF (e.g. MRXS) need OpenSlide: "
                "pip install openslide-python openslide-bin"
            ) from first_error
        try:
            slide = openslide.OpenSlide(str(path))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"cannot read slide {str(path)!r}: {err}") from (first_error or err)
        self.kind = "openslide"
        return slide

    @property
    def properties(self) -> dict[str, Any]:
        return dict(getattr(self._slide, "properties", {}))

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (no upsampling), 0 at worst."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-3)]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB ``(h, w, 3)`` of the region at ``(x, y)`` (level pixels); outside the slide is white."""
        out, (x0, y0, x1, y1) = _blank_region(self.level_dimensions[level], x, y, w, h)
        if x1 <= x0 or y1 <= y0:
            return out
        ds = self.level_downsamples[level]
        loc = (math.ceil(x0 * ds), math.ceil(y0 * ds)) if level else (x0, y0)  # level-0 px that map back to x0, y0
        try:
            if self.kind == "ome-zarr":
                return self._slide.read(level, x, y, w, h)
            if self.kind == "tiffslide":
                arr = self._slide.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True, padding=False)
            else:
                arr = np.asarray(self._slide.read_region(loc, level, (x1 - x0, y1 - y0)))
        except MemoryError:
            raise
        except Exception as err:  # tifffile, imagecodecs, zarr and OpenSlide raise many types
            if str(self.path) in str(err):  # already names the file
                raise
            raise ValueError(
                f"cannot read slide {str(self.path)!r} (level {level}, region at {x0}, {y0} of {x1 - x0} x "
                f"{y1 - y0} px): {type(err).__name__}: {err}. The file may be truncated or damaged; check it "
                "opens in a slide viewer, or copy it again."
            ) from err
        arr = _white_rgb(np.asarray(arr), what=f"slide {str(self.path)!r}")
        out[y0 - y : y0 - y + arr.shape[0], x0 - x : x0 - x + arr.shape[1]] = arr
        return out

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """RGB of the whole slide with its longest side about ``max_px`` and its scale (px per level-0 px).

        Read from the smallest level that is still at least ``max_px`` on its longest side, then resampled.
        """
        from PIL import Image

        full = max(self.dimensions)
        level = self.best_level(max(1.0, full / max_px))
        lw, lh = self.level_dimensions[level]
        if lw * lh > 400_000_000:
            raise ValueError(
                f"slide {str(self.path)!r} has no pyramid level small enough for a thumbnail (smallest "
                f"{lw} x {lh} px); write it as a pyramidal TIFF (e.g. vips tiffsave --pyramid --tile)."
            )
        arr = self.read(level, 0, 0, lw, lh)
        scale = min(1.0, max_px / full)
        size = (max(1, round(self.dimensions[0] * scale)), max(1, round(self.dimensions[1] * scale)))
        if (lw, lh) != size:
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR))
        return arr, size[0] / self.dimensions[0]

    def um_per_px(self) -> float | None:
        """µm per level-0 pixel from the file (OME ``PhysicalSizeX/Y``, vendor mpp, TIFF resolution tags).

        ``None`` when the file does not say. Raises ValueError when x and y disagree or the value is not
        a plausible pixel size (e.g. TIFF's default 72 dpi).
        """
        from stexp._layout import check_um_per_px

        mx: Any = None
        my: Any = None
        source = ""
        ome = self._ome_physical_size()
        if ome is not None:
            (mx, my), source = ome, "OME PhysicalSizeX/Y"
        else:
            props = self.properties
            prefix = "tiffslide" if self.kind == "tiffslide" else "openslide"
            mx, my = props.get(f"{prefix}.mpp-x"), props.get(f"{prefix}.mpp-y")
            source = f"{prefix}.mpp-x/y"
        if mx in (None, "") and my in (None, ""):
            return None
        try:
            mx = float(mx if mx not in (None, "") else my)
            my = float(my if my not in (None, "") else mx)
        except (TypeError, ValueError) as err:
            raise ValueError(f"slide {str(self.path)!r}: unreadable pixel size in {source}: {err}") from err
        if not np.isclose(mx, my, rtol=0.02):
            raise ValueError(
                f"slide {str(self.path)!r}: pixel size differs in x and y ({mx:g} vs {my:g} µm/px, {source}); "
                "pass mpp= (µm per pixel) to say which is right."
            )
        try:
            return check_um_per_px((mx + my) / 2, what=f"pixel size of slide {str(self.path)!r} ({source})")
        except ValueError as err:
            raise ValueError(f"{err} Pass mpp= (µm per pixel) to override it.") from err

    def _ome_physical_size(self) -> tuple[float | None, float | None] | None:
        if self.kind != "tiffslide":
            return None
        tf = self._slide.ts_tifffile
        if not getattr(tf, "is_ome", False) or not tf.ome_metadata:
            return None
        import re

        xml = tf.ome_metadata
        pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
        if pixels is None:
            return None
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', pixels.group(0)))
        if "PhysicalSizeX" not in attrs and "PhysicalSizeY" not in attrs:
            return None
        units = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}
        sizes = []
        for axis in ("X", "Y"):
            value = attrs.get(f"PhysicalSize{axis}")
            unit = attrs.get(f"PhysicalSize{axis}Unit", "µm")
            if unit not in units:
                raise ValueError(f"slide {str(self.path)!r}: unknown OME unit {unit!r}; pass mpp=.")
            sizes.append(None if value is None else float(value) * units[unit])
        return sizes[0], sizes[1]

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayPyramid:
    """Regions of in-memory or lazy (dask / xarray) image levels, with the interface of :class:`RegionReader`.

    Parameters
    ----------
    levels
        Arrays ``(H, W, C)`` (or ``(C, H, W)`` with ``channels_first``), finest first; only the regions
        read are computed.
    """

    def __init__(self, levels: Sequence[Any], *, channels_first: bool = False, what: str = "image") -> None:
        self.levels = list(levels)
        self.channels_first = channels_first
        self.what = what
        dims = []
        for a in self.levels:
            shape = np.shape(a)
            h, w = (shape[-2], shape[-1]) if channels_first else (shape[0], shape[1])
            dims.append((int(w), int(h)))
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dims[0][0] / max(w, 1) for w, _ in dims)

    best_level = RegionReader.best_level
    dimensions = RegionReader.dimensions  # the same property on the same attributes
    thumbnail = RegionReader.thumbnail

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out, (x0, y0, x1, y1) = _blank_region(self.level_dimensions[level], x, y, w, h)
        if x1 <= x0 or y1 <= y0:
            return out
        a = self.levels[level]
        region = a[:, y0:y1, x0:x1] if self.channels_first else a[y0:y1, x0:x1]
        region = np.asarray(getattr(region, "values", region))  # xarray / dask compute only this region
        if self.channels_first:
            region = np.moveaxis(region, 0, -1)
        arr = _white_rgb(region, what=self.what)
        out[y0 - y : y0 - y + arr.shape[0], x0 - x : x0 - x + arr.shape[1]] = arr
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> ArrayPyramid:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _source_path(entry: dict) -> Path | None:
    source = (entry.get("metadata") or {}).get("source_image_path")
    if source is None or str(source) in ("", "None"):
        return None
    return Path(str(source))


def _blank_region(level_size: tuple[int, int], x: int, y: int, w: int, h: int):
    """A white ``(h, w, 3)`` region and the part ``(x0, y0, x1, y1)`` of it that lies on a level of ``level_size``."""
    lw, lh = level_size
    return np.full((h, w, 3), 255, dtype=np.uint8), (max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh))


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
    pyramid
        A lazy multiscale image (:class:`ArrayPyramid`, e.g. the levels of a SpatialData image), read
        region by region instead of ``array``.
    """

    library_id: str
    source: str
    scale: float
    size: tuple[int, int]
    path: Path | None = None
    array: Any = field(default=None, repr=False, compare=False)
    pyramid: Any = field(default=None, repr=False, compare=False)

    @property
    def lazy(self) -> bool:
        """Whether the image is read region by region (a slide file or a lazy multiscale image), never whole."""
        return self.pyramid is not None or (self.path is not None and is_region_file(self.path))

    def reader(self):
        """A region reader of the image (:class:`RegionReader` or :class:`ArrayPyramid`); use it as a context manager.

        For a lazy view nothing is decoded until regions are read; a JPEG / PNG file is decoded whole here.
        """
        if self.pyramid is not None:
            return self.pyramid
        if self.path is not None and is_region_file(self.path):
            return RegionReader(self.path)
        return ArrayPyramid([np.asarray(self.decode())], what=f"library {self.library_id!r}: image {self.source!r}")

    @property
    def extent(self) -> tuple[float, float]:
        """``(width, height)`` of the image in full-resolution pixels."""
        return self.size[0] / self.scale, self.size[1] / self.scale

    def decode(self):
        """The image as an RGB PIL image (decoded now: keep one slide decoded at a time)."""
        from PIL import Image

        from ._pixels import as_uint8_rgb

        if self.lazy:  # the whole level 0, read through the region reader (memory: the whole image)
            with self.reader() as r:
                w, h = r.dimensions
                return Image.fromarray(r.read(0, 0, 0, w, h))
        if self.path is not None:
            return decode_image(self.path, what=f"library {self.library_id!r}: ")[0]
        return Image.fromarray(as_uint8_rgb(self.array, what=f"library {self.library_id!r}: image {self.source!r}"))

    def fingerprint(self) -> str:
        """A content hash of the image (file bytes, or array bytes and shape) and of its scale."""
        h = hashlib.sha256()
        h.update(f"{self.source}:{self.scale!r}".encode())
        if self.pyramid is not None:  # a lazy image: its coarsest level's pixels and every level's shape
            p = self.pyramid
            h.update(repr(p.level_dimensions).encode())
            w_, h_ = p.level_dimensions[-1]
            coarsest = np.ascontiguousarray(p.read(len(p.level_dimensions) - 1, 0, 0, w_, h_))
            h.update(memoryview(coarsest).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
        elif self.path is not None and self.path.is_dir():  # OME-Zarr: its coarsest level and level shapes
            with RegionReader(self.path) as r:
                h.update(f"{self.path.resolve()}{r.level_dimensions}".encode())
                w_, h_ = r.level_dimensions[-1]
                coarsest = np.ascontiguousarray(r.read(len(r.level_dimensions) - 1, 0, 0, w_, h_))
                h.update(memoryview(coarsest).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
        elif self.path is not None:
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
    if path is not None and (path.is_file() or _is_ome_zarr(path)):
        if is_region_file(path):
            with RegionReader(path) as r:
                size = r.dimensions
        else:
            size = image_size(path)
        return SlideView(str(library_id), SOURCE_FILE, 1.0, size, path=path)
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
        if isinstance(array, ArrayPyramid):  # a lazy multiscale image (stexp.io.from_spatialdata)
            return SlideView(str(library_id), best[0], best[1], array.dimensions, pyramid=array)  # type: ignore[misc]
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
    return bool(entry.get("images")) or (path is not None and (path.is_file() or _is_ome_zarr(path)))


def image_um_per_px(adata, view: SlideView) -> float:
    """µm per pixel of the view's image (µm per full-resolution px divided by its scale)."""
    return um_per_px(adata, view.library_id) / view.scale


def readable_views(adata, libraries: Any) -> dict[str, SlideView]:
    """:func:`slide_view` of each distinct library of ``libraries`` (ids, or one per spot) that has an image.

    Libraries without a readable image are left out (for checks that say nothing where they cannot look).
    """
    views = {}
    for lib in np.unique(np.asarray(libraries).astype(str)):
        try:
            views[str(lib)] = slide_view(adata, str(lib))
        except (KeyError, ValueError, FileNotFoundError, OSError):
            continue
    return views


def detail_um_per_px(adata, view: SlideView, spec: Any = None) -> float | None:
    """The finest detail, in µm per pixel, that a library's image features can see; ``None`` when unknown.

    The coarsest of: the pixel of the library's image ``view`` (:func:`slide_view`), the resampling of
    ``spec.mpp``, and the encoder's input pixel (``spec.patch_um / spec.patch_px``), where ``spec`` is the
    features' :class:`~stexp.images.EncoderSpec` (or ``None``: the image's pixel only). ``None`` when the
    library's pixel size is not recorded.
    """
    try:
        detail = image_um_per_px(adata, view)
    except (KeyError, ValueError):
        return None
    if spec is not None:
        if spec.mpp:
            detail = max(detail, float(spec.mpp))
        lib = view.library_id
        patch_um = spec.patch_um.get(lib) if isinstance(spec.patch_um, dict) else spec.patch_um
        if patch_um and spec.patch_px:
            detail = max(detail, float(patch_um) / float(spec.patch_px))
    return float(detail)
