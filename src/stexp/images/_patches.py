"""The one patch reader: square patches of a physical size (µm) around spot centres, resampled to N px.

:func:`plan_patches` works out, once per library, where each spot's patch lies on the library's image
(:func:`stexp.images.slide_view`) and how large it is in image pixels; :func:`read_patches`,
``stexp.pp.embed_images`` and the :class:`PatchSource` that fine-tuning models read all cut their
patches from such a plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stexp._docs import doc_params
from stexp._layout import (
    LIBRARY_KEY,
    PLATFORMS,
    library_labels,
    library_mask,
    spot_coords,
    spot_diameter_um,
    um_per_px,
)

from ._extent import check_spots_in_image
from ._slide import SlideView, slide_view

#: Default patch side as a multiple of the spot diameter, per platform. Legacy ST (spots of at least
#: :data:`ST_MIN_DIAMETER_UM`, 100 µm): 0.75 -> 75 µm, the spot's own area, the best of 75 / 100 / 150 µm measured
#: on HER2+ (``docs/benchmarks.md``). Smaller spots (Visium, 55 µm; not measured here): 1.5 -> 82.5 µm, the spot
#: and a ring of context.
PATCH_DIAMETERS = {"st": 0.75, "small_spots": 1.5}
#: Spots at least this wide (µm) are legacy ST spots for :func:`default_patch_um`.
ST_MIN_DIAMETER_UM = 0.9 * PLATFORMS["st"]["spot_diameter_um"]
#: Side (level px) of the regions a lazily read slide is read in (see :meth:`PatchPlan.stream`).
BLOCK_PX = 2048
#: Fill colour of the parts of a patch that lie outside the image (white, like glass on an H&E slide).
PAD_RGB = (255, 255, 255)


def default_patch_um(adata, library_id: str) -> float:
    """Default patch side in µm of a library: :func:`patch_um_for_spots` of its spot diameter."""
    return patch_um_for_spots(spot_diameter_um(adata, library_id))


def patch_um_for_spots(diameter_um: float) -> float:
    """Default patch side in µm for spots of ``diameter_um``: legacy ST 100 µm -> 75 µm, Visium 55 µm -> 82.5 µm.

    See :data:`PATCH_DIAMETERS`: 0.75 x the diameter for ST spots (measured best on HER2+), 1.5 x for
    smaller spots (unmeasured; the spot and its surroundings).
    """
    platform = "st" if float(diameter_um) >= ST_MIN_DIAMETER_UM else "small_spots"
    return PATCH_DIAMETERS[platform] * float(diameter_um)


def resolve_patch_um(adata, libs: Sequence[str], patch_um: float | Mapping[str, float] | None) -> dict[str, float]:
    """Patch side in µm per library: one number, a mapping library -> µm, or ``None`` (each library's default).

    Raises
    ------
    KeyError
        If a mapping lacks a library.
    ValueError
        If a value is not a positive number.
    """
    if patch_um is None:
        return {lib: float(default_patch_um(adata, lib)) for lib in libs}
    if isinstance(patch_um, Mapping):
        missing = [lib for lib in libs if lib not in patch_um]
        if missing:
            raise KeyError(f"patch_um has no value for library(ies) {missing} (it has {list(patch_um)}).")
        out = {lib: float(patch_um[lib]) for lib in libs}
    else:
        out = dict.fromkeys(libs, float(patch_um))
    bad = {lib: v for lib, v in out.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"patch_um must be a positive number of µm, got {bad}.")
    return out


def patch_side_px(adata, view: SlideView, patch_um: float) -> float:
    """Side of a ``patch_um`` patch in pixels of the view's image (``patch_um / µm-per-full-res-px * scale``).

    Raises
    ------
    ValueError
        If the patch is smaller than one image pixel or larger than the image.
    """
    library_id = view.library_id
    patch_um = float(patch_um)
    if not math.isfinite(patch_um) or patch_um <= 0:
        raise ValueError(f"patch_um must be a positive number of µm, got {patch_um!r}.")
    upp = um_per_px(adata, library_id)
    side = patch_um / upp * float(view.scale)
    if side < 1.0:
        raise ValueError(
            f"library {library_id!r}: patch_um={patch_um:g} µm is {side:.3g} px on its image "
            f"({upp / view.scale:.3g} µm per image px): smaller than one pixel."
        )
    w, h = view.size
    if side > min(w, h):
        raise ValueError(
            f"library {library_id!r}: patch_um={patch_um:g} µm is {side:.0f} px, larger than its image "
            f"({w} x {h} px, {upp / view.scale:.3g} µm per image px, i.e. "
            f"{w * upp / view.scale:.0f} x {h * upp / view.scale:.0f} µm)."
        )
    return side


def cut_patches(image, centres: np.ndarray, side: float, out_px: int) -> np.ndarray:
    """Cut square patches from a PIL image and resample them (anti-aliased bilinear) to ``out_px``.

    Parameters
    ----------
    image
        PIL RGB image.
    centres
        ``(n, 2)`` patch centres (x, y) in image pixels (sub-pixel positions are honoured).
    side
        Patch side in image pixels.
    out_px
        Output side in pixels.

    Returns
    -------
    uint8 ``(n, out_px, out_px, 3)``. Parts of a patch outside the image are white (:data:`PAD_RGB`).
    """
    from PIL import Image

    out = np.empty((len(centres), out_px, out_px, 3), dtype=np.uint8)
    w, h = image.size
    half = side / 2.0
    for i, (cx, cy) in enumerate(np.asarray(centres, dtype=np.float64)):
        box = (cx - half, cy - half, cx + half, cy + half)
        if box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h:
            patch = image.resize((out_px, out_px), Image.Resampling.BILINEAR, box=box)
        else:
            x0, y0 = math.floor(box[0]), math.floor(box[1])
            x1, y1 = math.ceil(box[2]), math.ceil(box[3])
            canvas = Image.new("RGB", (x1 - x0, y1 - y0), PAD_RGB)
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if cx1 > cx0 and cy1 > cy0:
                canvas.paste(image.crop((cx0, cy0, cx1, cy1)), (cx0 - x0, cy0 - y0))
            patch = canvas.resize(
                (out_px, out_px), Image.Resampling.BILINEAR, box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
            )
        out[i] = np.asarray(patch)
    return out


@dataclass
class PatchPlan:
    """Where the patches of some spots of one library lie on its image.

    Attributes
    ----------
    view
        The library's image (not decoded).
    centres
        ``(n, 2)`` spot centres (x, y) in the view's image pixels.
    inside
        ``(n,)`` whether each centre lies inside the image (spots outside get white patches).
    side
        Patch side in image pixels.
    patch_um
        Patch side in µm.
    """

    view: SlideView
    centres: np.ndarray
    inside: np.ndarray
    side: float
    patch_um: float

    def __len__(self) -> int:
        return len(self.centres)

    def cut(self, image, out_px: int, sel: slice | np.ndarray = slice(None)) -> np.ndarray:
        """uint8 ``(n, out_px, out_px, 3)`` patches of the selected spots from the decoded ``image``."""
        centres, inside = self.centres[sel], self.inside[sel]
        out = np.full((len(centres), out_px, out_px, 3), 255, dtype=np.uint8)
        if inside.any():
            out[inside] = cut_patches(image, centres[inside], self.side, int(out_px))
        return out

    def subset(self, sel: slice | np.ndarray) -> PatchPlan:
        """The plan of the selected spots (same image and patch size)."""
        return PatchPlan(self.view, self.centres[sel], self.inside[sel], self.side, self.patch_um)

    def read(self, out_px: int, sel: slice | np.ndarray = slice(None)) -> np.ndarray:
        """uint8 ``(n, out_px, out_px, 3)`` patches of the selected spots, read as :meth:`stream` reads them."""
        sub = self.subset(sel)
        out = np.empty((len(sub), out_px, out_px, 3), dtype=np.uint8)
        for idx, patches in sub.stream(out_px, max(len(sub), 1)):
            out[idx] = patches
        return out

    def stream(
        self, out_px: int, batch_size: int, *, block_px: int = BLOCK_PX
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, patches)`` batches of every spot of the plan (``rows``: positions in the plan).

        Batches are made ahead in a background thread while the consumer uses the previous one.

        A JPEG / PNG slide (or an in-memory image) is decoded once and patches are cut in plan order. A
        lazily read slide (:attr:`SlideView.lazy`: a slide file, a lazy multiscale image) is read at the
        coarsest pyramid level that still has at least ``out_px`` pixels across a patch, in regions of about
        ``block_px`` level pixels: spots are visited block by block (serpentine), so each tile of the file
        is decoded about once, and only one region is held at a time. Spots outside the image get white
        patches. Memory: two batches and one region, whatever the slide's size.
        """
        out_px, batch_size = int(out_px), int(batch_size)
        if not len(self):
            return
        if not self.view.lazy:
            image = self.view.decode()
            for start, patches in self.batches(image, out_px, batch_size):
                yield np.arange(start, start + len(patches)), patches
            return
        yield from _prefetch(lambda: self._region_batches(out_px, batch_size, block_px))

    def _region_batches(self, out_px: int, batch_size: int, block_px: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from PIL import Image

        pending_idx: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        n_pending = 0

        def flush(force: bool):
            nonlocal pending_idx, pending, n_pending
            while n_pending >= batch_size or (force and n_pending):
                idx, patches = np.concatenate(pending_idx), np.concatenate(pending)
                take = min(batch_size, len(idx))
                yield idx[:take], patches[:take]
                pending_idx, pending = [idx[take:]], [patches[take:]]
                n_pending = len(idx) - take

        outside = np.flatnonzero(~self.inside)
        if len(outside):
            pending_idx.append(outside)
            pending.append(np.full((len(outside), out_px, out_px, 3), 255, dtype=np.uint8))
            n_pending += len(outside)
        inside = np.flatnonzero(self.inside)
        with self.view.reader() as reader:
            level = reader.best_level(self.side / out_px)
            ds = reader.level_downsamples[level]
            xy = self.centres[inside] / ds
            side = self.side / ds
            half, margin = side / 2.0, math.ceil(side / out_px) + 2  # margin: the resampling filter's support
            order = _block_order(xy, block_px)
            inside, xy = inside[order], xy[order]
            bx = np.floor(xy[:, 0] / block_px).astype(np.int64)
            by = np.floor(xy[:, 1] / block_px).astype(np.int64)
            cuts = np.flatnonzero((np.diff(bx) != 0) | (np.diff(by) != 0)) + 1
            for group in np.split(np.arange(len(inside)), cuts):
                if not len(group):
                    continue
                g = xy[group]
                x0 = math.floor(g[:, 0].min() - half) - margin
                y0 = math.floor(g[:, 1].min() - half) - margin
                x1 = math.ceil(g[:, 0].max() + half) + margin
                y1 = math.ceil(g[:, 1].max() + half) + margin
                region = Image.fromarray(reader.read(level, x0, y0, x1 - x0, y1 - y0))
                pending_idx.append(inside[group])
                pending.append(cut_patches(region, g - (x0, y0), side, out_px))
                n_pending += len(group)
                del region
                yield from flush(False)
        yield from flush(True)

    def batches(self, image, out_px: int, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, patches)`` of consecutive batches; batch i+1 is cut in a background thread while i is used."""
        from concurrent.futures import ThreadPoolExecutor

        starts = list(range(0, len(self), batch_size))
        if not starts:
            return
        cut = lambda s: self.cut(image, out_px, slice(s, s + batch_size))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stexp-patches") as pool:
            future = pool.submit(cut, starts[0])
            for j, s in enumerate(starts):
                patches = future.result()
                if j + 1 < len(starts):
                    future = pool.submit(cut, starts[j + 1])
                yield s, patches


def _prefetch(produce: Callable[[], Iterator], depth: int = 2) -> Iterator:
    """The items of ``produce()``, made in a background thread up to ``depth`` items ahead of the consumer.

    Errors of the producer are raised in the consumer; when the consumer stops early the thread stops too.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce():
                if not put((None, item)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((err, None))
            return
        put((None, done))

    thread = threading.Thread(target=run, name="stexp-regions", daemon=True)
    thread.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _block_order(xy: np.ndarray, block: float) -> np.ndarray:
    """Order of points by ``block`` x ``block`` cell, rows top to bottom, serpentine columns (tile locality)."""
    bx = np.floor(xy[:, 0] / block).astype(np.int64)
    by = np.floor(xy[:, 1] / block).astype(np.int64)
    bx -= bx.min(initial=0)
    nbx = int(bx.max(initial=0)) + 1
    col = np.where(by % 2 == 0, bx, nbx - 1 - bx)
    return np.lexsort((xy[:, 0], col, by))


def plan_patches(
    adata,
    library_id: str,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    patch_um: float | None = None,
    on_outside: Literal["raise", "drop"] = "raise",
    library_key: str = LIBRARY_KEY,
    view: SlideView | None = None,
) -> PatchPlan:
    """Plan the patches of spots of one library (see :func:`read_patches` for the parameters).

    Raises
    ------
    ValueError
        If an index is not a spot of the library, the patch size does not fit the image, or spots lie
        outside the image with ``on_outside="raise"``.
    """
    lib_rows = np.flatnonzero(library_mask(adata, library_id, library_key))
    indices = lib_rows if indices is None else np.asarray(indices, dtype=np.int64).ravel()
    not_in_lib = ~np.isin(indices, lib_rows)
    if not_in_lib.any():
        raise ValueError(
            f"{int(not_in_lib.sum())} of {len(indices)} spot indices (e.g. {indices[not_in_lib][:5].tolist()}) "
            f"are not spots of library {library_id!r}."
        )
    view = view or slide_view(adata, library_id)
    inside_lib = check_spots_in_image(adata, library_id, on_outside=on_outside, library_key=library_key, view=view)
    inside = np.zeros(adata.n_obs, dtype=bool)
    inside[lib_rows] = inside_lib
    patch_um = default_patch_um(adata, library_id) if patch_um is None else float(patch_um)
    side = patch_side_px(adata, view, patch_um)
    return PatchPlan(view, spot_coords(adata)[indices] * view.scale, inside[indices], side, patch_um)


@doc_params
def read_patches(
    adata,
    library_id: str,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    patch_um: float | None = None,
    out_px: int = 224,
    image=None,
    on_outside: Literal["raise", "drop"] = "raise",
    library_key: str = LIBRARY_KEY,
) -> np.ndarray:
    """Patches of ``patch_um`` µm around spot centres of one library, resampled to ``out_px`` px.

    The image is the one :func:`stexp.images.slide_view` chooses (the full-resolution file, else the
    in-memory image with the largest scale factor). Centres are ``obsm["spatial"]`` (full-res px) times
    the image's scale factor; the µm per pixel come from :func:`stexp._layout.um_per_px`. Parts of a
    patch beyond the image border are padded with **white** (glass).

    Parameters
    ----------
    adata
        AnnData in stexp's layout.
    library_id
        The library.
    indices
        Integer positions (rows of ``adata``) of spots of ``library_id``; ``None``: all its spots.
    patch_um
        Patch side in µm; ``None``: :func:`default_patch_um` (ST 75 µm, Visium 82.5 µm).
    out_px
        Output side in pixels.
    image
        The library's image already decoded (``stexp.images.slide_view(adata, lib).decode()``), to avoid
        decoding it again. By default a JPEG / PNG is decoded once; a whole-slide file (pyramidal TIFF,
        SVS, ...) is read region by region at the pyramid level the patches need (never decoded whole).
    on_outside
        Spots whose centre lies outside the image: ``"raise"`` a ValueError, or ``"drop"``: warn and
        return white patches for them (see :func:`stexp.images._extent.check_spots_in_image`).
    {library_key}

    Returns
    -------
    uint8 array ``(n, out_px, out_px, 3)``.
    """
    plan = plan_patches(adata, library_id, indices, patch_um=patch_um, on_outside=on_outside, library_key=library_key)
    if image is None:
        return plan.read(int(out_px))
    if tuple(image.size) != tuple(plan.view.size):
        raise ValueError(
            f"image= is {image.size[0]} x {image.size[1]} px, but the image of library {library_id!r} is "
            f"{plan.view.size[0]} x {plan.view.size[1]} px ({plan.view.source})."
        )
    return plan.cut(image, int(out_px))


class PatchSource:
    """Spot patches on demand, for models that embed patches themselves (a fine-tuned image encoder).

    Built by ``stexp.tl`` from an AnnData (:meth:`from_adata`), it holds per spot its library and patch
    centre, and per library the image view and patch side: models read patches through it without
    seeing the AnnData. Each read decodes one slide at a time (whole-slide files: one region at a time).

    Parameters
    ----------
    plans
        One :class:`PatchPlan` per library (its rows: the spots of that library, in plan order).
    library
        ``(n,)`` library of each spot of the source.
    local
        ``(n,)`` row of each spot in its library's plan.
    """

    def __init__(self, plans: Mapping[str, PatchPlan], library: np.ndarray, local: np.ndarray) -> None:
        self.plans = dict(plans)
        self.library = np.asarray(library, dtype=object)
        self.local = np.asarray(local, dtype=np.int64)

    @classmethod
    def from_adata(
        cls,
        adata,
        *,
        patch_um: float | Mapping[str, float] | None = None,
        library_key: str = LIBRARY_KEY,
        rows: np.ndarray | None = None,
        on_outside: Literal["raise", "drop"] = "raise",
    ) -> PatchSource:
        """The patches of the spots ``rows`` of ``adata`` (default all).

        Spots outside their image raise a ValueError, or with ``on_outside="drop"`` are flagged in
        :attr:`inside` (their patches are white).
        """
        labels = library_labels(adata, library_key)
        rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
        libs = list(dict.fromkeys(labels[rows].tolist()))
        per_lib_um = resolve_patch_um(adata, libs, patch_um)
        plans, local = {}, np.empty(len(rows), dtype=np.int64)
        for lib in libs:
            sel = np.flatnonzero(labels[rows] == lib)
            plans[lib] = plan_patches(
                adata, lib, rows[sel], patch_um=per_lib_um[lib], on_outside=on_outside, library_key=library_key
            )
            local[sel] = np.arange(len(sel))
        return cls(plans, labels[rows], local)

    def __len__(self) -> int:
        return len(self.library)

    @property
    def inside(self) -> np.ndarray:
        """``(n,)`` whether each spot's centre lies inside its image."""
        out = np.ones(len(self), dtype=bool)
        for lib in self.libraries:
            sel = np.flatnonzero(self.library == lib)
            out[sel] = self.plans[lib].inside[self.local[sel]]
        return out

    @property
    def libraries(self) -> list[str]:
        return list(dict.fromkeys(self.library.tolist()))

    def subset(self, index: np.ndarray) -> PatchSource:
        """The spots selected by a boolean mask or integer index."""
        return PatchSource(self.plans, self.library[index], self.local[index])

    def read(self, out_px: int) -> np.ndarray:
        """uint8 ``(n, out_px, out_px, 3)`` patches of every spot, one slide decoded at a time."""
        out = np.empty((len(self), out_px, out_px, 3), dtype=np.uint8)
        for lib in self.libraries:
            sel = np.flatnonzero(self.library == lib)
            out[sel] = self.plans[lib].read(out_px, self.local[sel])
        return out

    def batches(self, out_px: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(spots, patches)`` batches, library by library (memory: at most one decoded JPEG slide).

        Each library's patches come from :meth:`PatchPlan.stream`: a JPEG is decoded once, a whole-slide file
        read region by region.
        """
        for lib in self.libraries:
            sel = np.flatnonzero(self.library == lib)
            for idx, patches in self.plans[lib].subset(self.local[sel]).stream(out_px, batch_size):
                yield sel[idx], patches

    def __repr__(self) -> str:
        return f"PatchSource({len(self)} spots of {len(self.libraries)} librar{'y' if len(self.libraries) == 1 else 'ies'})"
