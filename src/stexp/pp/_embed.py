"""``stexp.pp.embed_images``: one image feature vector per spot from a pretrained encoder, cached."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np

from stexp._layout import (
    LIBRARY_KEY,
    UNS_KEY,
    _jsonable,
    library_ids,
    library_mask,
    spot_coords,
    um_per_px,
)
from stexp._settings import logger, settings

#: Spec fields compared to decide whether stored features are up to date (the model's fields + out_dim).
SPEC_FIELDS = ("encoder", "weights", "patch_um", "patch_px", "normalization", "out_dim")


def _is_encoder(obj) -> bool:
    """An already built :class:`stexp.images.Encoder` (duck-typed)."""
    return all(hasattr(obj, a) for a in ("module", "preprocess", "input_px", "out_dim", "weights_id", "weights_arg"))


def _build_encoder(encoder, weights):
    """An :class:`stexp.images.Encoder` from the user's ``encoder`` / ``weights`` (a built one passes through)."""
    if _is_encoder(encoder):
        return encoder
    from stexp.images._encoders import build_encoder

    return build_encoder(encoder, weights)


def default_key(name: str) -> str:
    """``"X_stexp_<encoder>"`` with characters other than letters, digits, ``_.-`` replaced by ``_``."""
    return "X_stexp_" + re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name))


def _is_path(weights) -> bool:
    return isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and weights not in ("imagenet", "None") and not weights.startswith("timm:")
    )


def _resolve_patch_um(adata, libs: list[str], patch_um) -> dict[str, float]:
    from stexp.images._patches import default_patch_um

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


def _recorded_patch_um(per_lib: dict[str, float]) -> float | dict[str, float]:
    values = set(per_lib.values())
    return next(iter(values)) if len(values) == 1 else dict(per_lib)


def _same(a, b) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or set(map(str, a)) != set(map(str, b)):
            return False
        bb = {str(k): v for k, v in b.items()}
        return all(_same(v, bb[str(k)]) for k, v in a.items())
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _diffs(recorded: Mapping, spec: Mapping, fields=SPEC_FIELDS) -> list[str]:
    return [
        f"{k}: stored {recorded.get(k)!r} vs requested {spec.get(k)!r}"
        for k in fields
        if not _same(recorded.get(k), spec.get(k))
    ]


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _embed_slide(enc, slide, centres: np.ndarray, side: float, *, batch_size: int, device: str, pbar) -> np.ndarray:
    """Features of the patches around ``centres`` (image px) of one decoded slide.

    Patches of batch i+1 are cut in a background thread while batch i runs through the encoder.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from stexp.images._patches import cut_patches

    n = len(centres)
    out = np.empty((n, enc.out_dim), dtype=np.float32)
    if n == 0:
        return out
    cuda = device.startswith("cuda")
    module = enc.module.to(device)
    if cuda:
        module = module.to(memory_format=torch.channels_last)
    starts = list(range(0, n, batch_size))

    def cut(s: int) -> np.ndarray:
        return cut_patches(slide.image, centres[s : s + batch_size], side, int(enc.input_px))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stexp-patches") as pool, torch.inference_mode():
        future = pool.submit(cut, starts[0])
        for j, s in enumerate(starts):
            patches = future.result()
            if j + 1 < len(starts):
                future = pool.submit(cut, starts[j + 1])
            x = enc.preprocess(patches, device=device)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                y = module(x)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(patches), enc.out_dim):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"encoder {enc.name!r} returned {shape} for a batch of {len(patches)} patches; "
                    f"expected ({len(patches)}, {enc.out_dim})."
                )
            out[s : s + len(patches)] = y.float().cpu().numpy()
            if pbar is not None:
                pbar.update(len(patches))
    return out


def embed_images(
    adata,
    *,
    encoder: str | Callable = "densenet121",
    weights: str | os.PathLike | None = "imagenet",
    patch_um: float | Mapping[str, float] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    library_key: str = LIBRARY_KEY,
    key_added: str | None = None,
    overwrite: bool = False,
    on_outside: Literal["raise", "drop"] = "raise",
    cache: bool = True,
    copy: bool = False,
):
    """Embed the H&E patch around every spot with an image encoder.

    Each library's slide is decoded once (the full-resolution file when available, see
    :func:`stexp.images.read_patches`); a square patch of ``patch_um`` µm around each spot centre is
    resampled to the encoder's input size (parts beyond the image border are white), normalised as the
    encoder declares and embedded in batches under ``torch.inference_mode`` (patches of the next batch are
    cut in a background thread; on CUDA with channels-last and bf16/fp16 autocast).

    Work is skipped when it is already done: if ``adata.obsm[key]`` holds features recorded with the same
    spec (encoder, weights, patch µm/px, normalisation, output dim), nothing is computed. Features are also
    cached on disk (``stexp.settings.cachedir / "features"``, one ``.npy`` per library keyed by the slide's
    content, its spot centres and the spec), so a new session loads them instead of recomputing. Callable /
    module encoders cannot be identified across calls: they are always recomputed and never cached on disk.

    Parameters
    ----------
    adata
        AnnData in stexp's layout (spot centres in ``obsm["spatial"]``, images in ``uns["spatial"]``).
    encoder
        A registry name (:func:`stexp.images.list_encoders`), ``"timm:<model>"`` / ``"hf-hub:<org>/<model>"``,
        a ``torch.nn.Module`` / callable mapping ``(B, 3, H, W)`` to ``(B, D)`` (224 px, ImageNet
        normalisation), or an :class:`stexp.images.Encoder` from :func:`stexp.images.build_encoder` (to
        choose another input size or normalisation for a callable).
    weights
        ``"imagenet"``, ``None`` (explicit random init) or a local state-dict file; ignored for a built Encoder.
    patch_um
        Patch side in µm: one number, a mapping library -> µm, or ``None``: 1.5 x each library's spot
        diameter (ST 100 µm spots -> 150 µm; Visium -> 82.5 µm). The spec records one number when all
        libraries share it, else the per-library mapping.
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
    library_key
        Column of ``adata.obs`` with the library ids.
    key_added
        ``obsm`` key; default ``"X_stexp_<encoder>"``.
    overwrite
        Replace features stored under ``key_added`` that were computed with **another** spec (or not by
        this function). Without it such a call raises a ValueError naming the differing fields, so features
        a model was trained on are never replaced silently; use another ``key_added`` to keep both.
    on_outside
        Spots whose centre lies outside their image: ``"raise"`` a ValueError, or ``"drop"``: warn and give
        them **NaN** features (no spot is removed from ``adata``; models refuse NaN features, so subset
        the AnnData to finite rows before fitting).
    cache
        Read and write the disk cache.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None`` (or the copy when ``copy=True``). Writes ``adata.obsm[key]`` (float32, ``n_obs x out_dim``) and
    ``adata.uns["stexp"]["features"][key]``: ``encoder``, ``weights`` (the weights identity: ``"imagenet"``,
    ``"random"``, ``"sha256:..."`` of a file...), ``weights_arg`` (what rebuilds the encoder), ``patch_um``,
    ``patch_px``, ``normalization``, ``out_dim``, ``library_key``, ``n_outside`` per library and ``versions``.
    """
    from stexp._versions import versions
    from stexp.images._cache import cache_key, load_features, save_features
    from stexp.images._patches import patch_side_px
    from stexp.images._source import load_slide, slide_fingerprint
    from stexp.io._validate import check_spots_in_image

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if on_outside not in ("raise", "drop"):
        raise ValueError(f"on_outside must be 'raise' or 'drop', got {on_outside!r}.")
    if adata.n_obs == 0:
        raise ValueError("the AnnData has no spots.")
    if copy:
        adata = adata.copy()
    libs = library_ids(adata, library_key)
    per_lib_um = _resolve_patch_um(adata, libs, patch_um)
    stored = adata.uns.get(UNS_KEY, {}).get("features", {})

    # cheap check before building the encoder (a build may need a download): same name, weights, patch size
    if isinstance(encoder, str) and not _is_path(weights) and not overwrite:
        key = key_added or default_key(encoder)
        rec = stored.get(key)
        if key in adata.obsm and rec and np.shape(adata.obsm[key])[0] == adata.n_obs:
            wanted = {"encoder": encoder, "weights_arg": weights, "patch_um": _recorded_patch_um(per_lib_um)}
            if not _diffs(rec, wanted, ("encoder", "weights_arg", "patch_um")):
                logger.info(f"features adata.obsm[{key!r}] are up to date ({encoder}); nothing computed.")
                return adata if copy else None

    enc = _build_encoder(encoder, weights)
    key = key_added or default_key(enc.name)
    is_callable = str(enc.name).startswith("callable:")
    spec = {
        "encoder": enc.name,
        "weights": enc.weights_id,
        "weights_arg": None if enc.weights_arg is None else str(enc.weights_arg),
        "patch_um": _recorded_patch_um(per_lib_um),
        "patch_px": int(enc.input_px),
        "normalization": enc.normalization,
        "out_dim": int(enc.out_dim),
        "library_key": library_key,
    }
    if key in adata.obsm and not overwrite:
        rec = stored.get(key)
        if not rec:
            raise ValueError(
                f"adata.obsm[{key!r}] exists but was not written by embed_images (no spec in "
                f"adata.uns['stexp']['features']); pass overwrite=True to replace it or key_added= to keep it."
            )
        diffs = _diffs(rec, spec)
        if diffs:
            raise ValueError(
                f"adata.obsm[{key!r}] holds features of another spec ({'; '.join(diffs)}). Pass overwrite=True "
                "to replace them (models trained on them will no longer match) or key_added= to keep both."
            )
        if not is_callable:
            logger.info(f"features adata.obsm[{key!r}] are up to date ({enc.name}); nothing computed.")
            return adata if copy else None

    use_disk = cache and not is_callable
    device = settings.resolve_device(device)
    feats = np.full((adata.n_obs, enc.out_dim), np.nan, dtype=np.float32)
    xy = spot_coords(adata)
    n_outside: dict[str, int] = {}
    n_loaded = 0

    import torch

    pbar = None
    if settings.show_progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=adata.n_obs, desc=f"embed {enc.name}", unit="spot", leave=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(settings.num_workers)))
    try:
        for lib in libs:
            rows = np.flatnonzero(library_mask(adata, lib, library_key))
            inside = check_spots_in_image(adata, lib, on_outside=on_outside, library_key=library_key)
            n_outside[lib] = int((~inside).sum())
            centres = xy[rows]
            ckey = None
            if use_disk:
                lib_spec = {k: spec[k] for k in SPEC_FIELDS} | {
                    "patch_um": per_lib_um[lib],
                    "um_per_px": um_per_px(adata, lib),
                }
                ckey = cache_key(slide_fingerprint(adata, lib), centres, lib_spec)
                hit = load_features(ckey, (len(rows), enc.out_dim))
                if hit is not None:
                    feats[rows] = hit
                    n_loaded += len(rows)
                    if pbar is not None:
                        pbar.update(len(rows))
                    continue
            slide = load_slide(adata, lib)
            side = patch_side_px(adata, lib, per_lib_um[lib], slide.scale, slide.size)
            lib_feats = np.full((len(rows), enc.out_dim), np.nan, dtype=np.float32)
            lib_feats[inside] = _embed_slide(
                enc, slide, centres[inside] * slide.scale, side, batch_size=int(batch_size), device=device, pbar=pbar
            )
            if pbar is not None and n_outside[lib]:
                pbar.update(n_outside[lib])
            del slide  # at most one decoded slide at a time
            feats[rows] = lib_feats
            if ckey is not None:
                save_features(ckey, lib_feats)
    finally:
        torch.set_num_threads(threads)
        if pbar is not None:
            pbar.close()

    adata.obsm[key] = feats
    adata.uns.setdefault(UNS_KEY, {}).setdefault("features", {})[key] = {
        **_jsonable({**spec, "n_outside": n_outside}),
        "versions": versions(),
    }
    total_out = sum(n_outside.values())
    extra = f"; {total_out} spots outside their image got NaN features" if total_out else ""
    cached = f"; {n_loaded} spots loaded from the disk cache" if n_loaded else ""
    logger.info(
        f"added adata.obsm[{key!r}] ({adata.n_obs} x {enc.out_dim} float32, {enc.name}, "
        f"patch {spec['patch_um']} µm -> {spec['patch_px']} px{cached}{extra}) and "
        f"adata.uns['stexp']['features'][{key!r}]"
    )
    return adata if copy else None
