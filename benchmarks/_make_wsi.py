"""Build a large tiled pyramidal TIFF from the six HER2+ JPEGs, for ``benchmarks/wsi.py``.

A ``cells x cells`` mosaic of ``cell_px`` squares; cell ``k`` holds HER2+ image ``k % 6`` (B4, C2-C6),
mirrored left-right on its second pass, on white. JPEG-compressed 256 px tiles, pyramid levels in
SubIFDs (downsample 2 each), TIFF resolution tags in pixels per cm (µm/px of the HER2+ JPEGs). Written
tile row by tile row, so building it needs one row of cells in memory, not the whole mosaic.

Never commit the output: write it under /tmp.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]
TILE = 256


def her2st_jpegs(data_dir: Path) -> list[Path]:
    root = data_dir / "her2st" / "ST-imgs"
    return [next((root / s[0] / s).glob("*.jpg")) for s in SECTIONS]


def _cell(path: Path, k: int, side: int, ds: int) -> np.ndarray:
    """Image ``path`` at 1/ds scale, mirrored when ``k >= 6``, placed top-left on a white ``side`` square."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        w, h = im.size
        size = (w // ds, h // ds)
        if ds > 1:
            im.draft("RGB", size)
        im = im.convert("RGB").resize(size, Image.Resampling.BILINEAR) if im.size != size else im.convert("RGB")
        arr = np.asarray(im)
    if (k // 6) % 2 == 1:
        arr = arr[:, ::-1]
    out = np.full((side, side, 3), 255, dtype=np.uint8)
    hh, ww = min(side, arr.shape[0]), min(side, arr.shape[1])
    out[:hh, :ww] = arr[:hh, :ww]
    return out


def _row(jpegs, r: int, cells: int, side: int, ds: int) -> np.ndarray:
    return np.concatenate([_cell(jpegs[(r * cells + c) % 6], r * cells + c, side, ds) for c in range(cells)], axis=1)


def _tiles(jpegs, cells: int, side: int, ds: int):
    for r in range(cells):
        strip = _row(jpegs, r, cells, side, ds)
        for ty in range(0, side, TILE):
            for tx in range(0, strip.shape[1], TILE):
                yield strip[ty : ty + TILE, tx : tx + TILE]


def make_slide(
    out: Path, data_dir: Path, *, cells: int = 4, cell_px: int = 10240, um_per_px: float, n_levels: int = 6
) -> Path:
    """Write the mosaic to ``out`` (a pyramidal, tiled, JPEG-compressed TIFF) and return it."""
    import tifffile

    assert cell_px % (TILE * 4) == 0
    jpegs = her2st_jpegs(data_dir)
    res = (1e4 / um_per_px, 1e4 / um_per_px)
    kw = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}, "resolutionunit": "CENTIMETER"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level in range(n_levels):
            ds = 2**level
            side = cell_px // ds
            shape = (side * cells, side * cells, 3)
            extra = {"subifds": n_levels - 1} if level == 0 else {"subfiletype": 1}
            res_l = (res[0] / ds, res[1] / ds)
            if side % TILE == 0:
                tw.write(_tiles(jpegs, cells, side, ds), shape=shape, dtype=np.uint8, tile=(TILE, TILE),
                         resolution=res_l, **kw, **extra)  # fmt: skip
            else:  # small levels: the whole level in memory
                data = np.concatenate([_row(jpegs, r, cells, side, ds) for r in range(cells)], axis=0)
                tw.write(data, tile=(TILE, TILE), resolution=res_l, **kw, **extra)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cells", type=int, default=4)
    p.add_argument("--cell-px", type=int, default=10240)
    p.add_argument("--um-per-px", type=float, required=True)
    a = p.parse_args()
    t = time.perf_counter()
    make_slide(a.out, Path(os.environ["STEXP_DATA_DIR"]), cells=a.cells, cell_px=a.cell_px, um_per_px=a.um_per_px)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
