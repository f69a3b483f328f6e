"""``stexp.pp.embed_images``: one image feature vector per spot from a pretrained encoder, cached."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stexp._devices import check_device
from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, UNS_KEY, library_ids, library_mask, record, spot_coords, um_per_px
from stexp._process import leaves_process_state
from stexp._settings import logger, settings
from stexp.images._encoders import DEFAULT_ENCODER
from stexp.images._views import DEFAULT_STAIN_NORM

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def _is_encoder(obj) -> bool:
    """An already built :class:`stexp.images.Encoder` (duck-typed)."""
    return all(hasattr(obj, a) for a in ("module", "preprocess", "input_px", "out_dim", "weights_id", "weights_arg"))


def _build_encoder(encoder, weights, encoder_kwargs=None, encoder_id=None):
    """An :class:`stexp.images.Encoder` from the user's ``encoder`` / ``weights`` (a built one passes through)."""
    if _is_encoder(encoder):
        if encoder_kwargs or encoder_id is not None:
            raise ValueError(
                "encoder_kwargs / encoder_id cannot change an already built Encoder; pass them to build_encoder."
            )
        return encoder
    from stexp.images._encoders import build_encoder

    return build_encoder(encoder, weights, encoder_id=encoder_id, **dict(encoder_kwargs or {}))


def default_key(name: str) -> str:
    """``"X_stexp_<encoder>"`` with characters other than letters, digits, ``_.-`` replaced by ``_``.

    A local model folder (``"local-dir:<path>"``) is named by the folder's name.
    """
    name = str(name)
    if name.startswith("local-dir:"):
        name = os.path.basename(os.path.normpath(name[len("local-dir:") :]))
    return "X_stexp_" + re.sub(r"[^0-9A-Za-z_.-]+", "_", name)


def _is_path(weights) -> bool:
    return isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and weights != "imagenet" and not weights.startswith("timm:")
    )


def _recorded_patch_um(per_lib: dict[str, float]) -> float | dict[str, float]:
    values = set(per_lib.values())
    return next(iter(values)) if len(values) == 1 else dict(per_lib)


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _embed_plan(
    enc, plan, *, batch_size: int, device: str, pbar, mpp=None, image_um_per_px=None, stain_norm=None, tta=False,
    adapt_bn=False, adapt_plan=None, jpeg_quality=None, deblock=False,
) -> np.ndarray:  # fmt: skip
    """Features of the patches of one library's :class:`~stexp.images._patches.PatchPlan`.

    Patches come from :meth:`~stexp.images._patches.PatchPlan.stream` (a JPEG decoded once, a whole-slide
    file read region by region); with ``deblock`` a decoded slide with heavy JPEG block artefacts is first
    deblocked (a whole-slide file is not), with ``mpp`` it is then resampled to that µm/px, which
    needs the whole image (refused for a slide read by region), and with ``jpeg_quality`` it is then
    re-encoded as JPEG (likewise). ``stain_norm`` is fitted on a thumbnail.

    With ``adapt_bn`` the encoder's BatchNorm statistics are first re-estimated on at most
    :data:`~stexp.images._views.ADAPT_BN_PATCHES` of the library's patches, cut, resampled and normalised as
    the embedded ones, in batches of :data:`~stexp.images._views.ADAPT_BN_BATCH` whatever ``batch_size``
    (:func:`~stexp.images._views.adapted_batchnorm`; restored afterwards). They are drawn
    from ``adapt_plan`` (default ``plan``): the whole library's plan when ``plan`` is one shard of it, so
    that every shard is embedded with the same statistics.

    Patches of batch i+1 are cut in a background thread while batch i runs through the encoder. Spots
    outside the image get NaN features.
    """
    import contextlib

    import torch

    out = np.full((len(plan), enc.out_dim), np.nan, dtype=np.float32)
    if not plan.inside.any():
        return out
    cuda = device.startswith("cuda")
    module = enc.module.to(device)
    if cuda:
        module = module.to(memory_format=torch.channels_last)
    from stexp.images import _views

    sample = None
    if adapt_bn:
        adapt_plan = plan if adapt_plan is None else adapt_plan
        sample = adapt_plan.subset(_views.adapt_sample(adapt_plan.inside))
    px = int(enc.input_px)
    if plan.view.lazy:  # a whole-slide file: read region by region, never decoded whole
        assert mpp is None and jpeg_quality is None  # refused before any work by _check_whole_slide_views
        batches = plan.stream(px, batch_size)
        normalize = None
        if stain_norm is not None:
            from PIL import Image

            thumb = Image.fromarray(plan.view.reader().thumbnail(_views.STAIN_THUMBNAIL_PX)[0])
            normalize = _views.stain_normalizer(thumb, stain_norm, library_id=plan.view.library_id)
        sample_patches = sample.read(px) if sample is not None else None
    else:  # decoded once; resampled to mpp first when asked
        decoded = _views.deblock_slide(plan.view.decode(), deblock, library_id=plan.view.library_id)
        image, plan = _views.resample_slide(decoded, plan, image_um_per_px=image_um_per_px, mpp=mpp)
        image = _views.jpeg_slide(image, jpeg_quality)
        normalize = _views.stain_normalizer(image, stain_norm, library_id=plan.view.library_id)
        batches = ((np.arange(s, s + len(p)), p) for s, p in plan.batches(image, px, batch_size))
        sample_patches = None
        if sample is not None:
            sample_patches = _views.rescale_plan(sample, decoded.size, image.size).cut(image, px)

    def to_input(patches):
        """uint8 patches -> the encoder's input on ``device``: stain normalisation, the encoder's preprocessing."""
        if normalize is not None:
            patches = normalize(patches)
        x = enc.preprocess(patches, device=device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    adapted: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if sample_patches is not None:  # un-augmented patches, also with tta
        adapted = _views.adapted_batchnorm(
            module, sample_patches, to_input, name=enc.name, library_id=plan.view.library_id,
            autocast=lambda: _autocast(device),
        )  # fmt: skip
    # a JPEG is decoded once; a whole-slide file is read region by region
    with adapted, torch.inference_mode():
        for rows, patches in batches:
            x = to_input(patches)
            with _autocast(device):
                y = _views.encode(module, x, tta=tta)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(patches), enc.out_dim):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"encoder {enc.name!r} returned {shape} for a batch of {len(patches)} patches; "
                    f"expected ({len(patches)}, {enc.out_dim})."
                )
            values = y.float().cpu().numpy()
            _check_finite_output(enc, plan, rows, values)
            out[rows] = values
            if pbar is not None:
                pbar.update(len(patches))
    out[~plan.inside] = np.nan
    return out


def _check_finite_output(enc, plan, rows: np.ndarray, values: np.ndarray) -> None:
    """Raise when the encoder gave NaN / inf features for some patches of a batch (checked as they are made).

    Nothing has been written then: features reach ``adata.obsm`` and the disk cache only when every
    library is done.
    """
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ValueError(
            f"encoder {enc.name!r} returned NaN or infinite features for {int(bad.sum())} of the {len(rows)} "
            f"spots of a batch of library {plan.view.library_id!r} (the first batch with any); nothing was "
            "stored in adata.obsm or the cache. Check the encoder (its weights, input normalisation, a "
            "division by zero), or, on a GPU, try device='cpu' (half-precision overflow)."
        )


#: At most this many pixels in a slide resampled by ``mpp=`` (about 3 GB of RGB).
MAX_RESAMPLED_PIXELS = 1_000_000_000


def _check_whole_slide_views(adata, libs: list[str], mpp: float | None, jpeg_quality: int | None = None) -> None:
    """Refuse ``mpp=`` / ``jpeg_quality=`` before any work where they cannot be done.

    Both change the whole decoded slide, which a whole-slide file (read region by region) never is; and a
    much finer ``mpp`` than a slide's own would make an image of billions of pixels.
    """
    if mpp is None and jpeg_quality is None:
        return
    from stexp.images._slide import image_um_per_px, slide_view

    option = "mpp=" if mpp is not None else "jpeg_quality="
    for lib in libs:
        view = slide_view(adata, lib)
        if view.lazy:
            raise ValueError(
                f"library {lib!r}: {option} changes the whole decoded slide, but this slide is read region by "
                f"region (a whole-slide file); embed it without {option} (patches are resampled to the encoder's "
                "input size from the pyramid level nearest the patch's µm/px)."
            )
        if mpp is None:
            continue
        own = image_um_per_px(adata, view)
        factor = own / mpp
        w, h = view.size
        n_px = round(w * factor) * round(h * factor)
        if n_px > MAX_RESAMPLED_PIXELS:
            raise ValueError(
                f"library {lib!r}: mpp={mpp:g} µm/px would resample its {w} x {h} px image at {own:.3g} µm/px to "
                f"{n_px / 1e6:,.0f} million pixels (at most {MAX_RESAMPLED_PIXELS / 1e6:,.0f} million); choose "
                f"an mpp at least {own * (w * h / MAX_RESAMPLED_PIXELS) ** 0.5:.3g} µm/px, or none."
            )


def _check_encoder_kwargs(encoder_kwargs) -> None:
    """``encoder_kwargs`` is None or a mapping with string keys (a TypeError naming the parameter otherwise)."""
    if encoder_kwargs is None:
        return
    if not isinstance(encoder_kwargs, Mapping):
        raise TypeError(
            f"encoder_kwargs must be a mapping of keyword arguments, e.g. encoder_kwargs={{'drop_rate': 0.1}}, "
            f"got {type(encoder_kwargs).__name__} {encoder_kwargs!r}."
        )
    bad = [k for k in encoder_kwargs if not isinstance(k, str)]
    if bad:
        raise TypeError(
            f"encoder_kwargs keys must be argument names (strings), e.g. encoder_kwargs={{'drop_rate': 0.1}}; "
            f"got {bad[:3]}."
        )


#: Where ``uns["stexp"]["features"][key]`` records the content hash of each library's image.
SLIDES_FIELD = "slide_fingerprints"


def _check_same_slides(adata, libs: list[str], key: str, rec: dict) -> None:
    """Raise when the images of ``libs`` are not those ``adata.obsm[key]`` was computed from.

    Records made before fingerprints were stored carry none and are taken as they are.
    """
    from stexp.images._slide import slide_view

    recorded = rec.get(SLIDES_FIELD)
    if not recorded:
        return
    changed = [lib for lib in libs if recorded.get(lib) != slide_view(adata, lib).fingerprint()]
    if changed:
        raise ValueError(
            f"adata.obsm[{key!r}] was computed from other images than the current ones of librar"
            f"{'y' if len(changed) == 1 else 'ies'} {changed[:5]} (an image or its path changed since, or the "
            "library is new). Pass overwrite=True to recompute the features (models trained on the old ones "
            "will no longer match) or key_added= to keep both."
        )


def _check_call(adata, batch_size, on_outside) -> None:
    """Check the arguments that need nothing built: ``batch_size``, ``on_outside`` and spots to embed."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if on_outside not in ("raise", "drop"):
        raise ValueError(f"on_outside must be 'raise' or 'drop', got {on_outside!r}.")
    if adata.n_obs == 0:
        raise ValueError("the AnnData has no spots.")


def _check_devices(devices) -> None:
    """``devices`` is ``None`` or a positive integer (a ValueError naming it otherwise)."""
    if devices is None:
        return
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ValueError(
            f"devices must be None (this process) or a positive number of processes / GPUs, got {devices!r}."
        )


def _named_features_current(
    adata, libs: list[str], stored: dict, *, encoder: str, weights, encoder_kwargs, key_added, per_lib_um, views
) -> str | None:
    """The key of up-to-date features of a registry-named encoder, judged from the arguments alone.

    Compares the recorded name, weights argument, patch size, encoder arguments and view options, so that
    no encoder is built (which may need a download) for features that exist. ``None`` when they are not
    known to be up to date (the full check then runs on the built encoder's spec).

    Raises
    ------
    ValueError
        If the features match but were computed from other images (:func:`_check_same_slides`).
    """
    from stexp.images._encoders import encoder_kwargs_to_json
    from stexp.images._spec import VIEW_FIELDS, EncoderSpec

    key = key_added or default_key(encoder)
    rec = stored.get(key)
    if key not in adata.obsm or not rec or np.shape(adata.obsm[key])[0] != adata.n_obs:
        return None
    wanted = EncoderSpec(
        encoder=encoder,
        weights_arg=None if weights is None else str(weights),
        patch_um=_recorded_patch_um(per_lib_um),
        encoder_kwargs=encoder_kwargs_to_json(dict(encoder_kwargs or {})),
        **views,
    )
    fields = ("encoder", "weights_arg", "patch_um", "encoder_kwargs", *VIEW_FIELDS)
    if EncoderSpec.from_mapping(rec).diff(wanted, fields):
        return None
    _check_same_slides(adata, libs, key, rec)
    return key


def _feature_spec(enc, per_lib_um: dict[str, float], library_key: str, views: dict[str, Any]):
    """The :class:`~stexp.images.EncoderSpec` recorded with the features of the built encoder ``enc``."""
    from stexp.images._spec import EncoderSpec

    return EncoderSpec(
        encoder=enc.name,
        weights=enc.weights_id,
        weights_arg=None if enc.weights_arg is None else str(enc.weights_arg),
        patch_um=_recorded_patch_um(per_lib_um),
        patch_px=int(enc.input_px),
        normalization=enc.normalization,
        out_dim=int(enc.out_dim),
        library_key=library_key,
        encoder_kwargs=getattr(enc, "kwargs_json", None),
        **views,
    )


def _stored_features_current(adata, libs: list[str], stored: dict, key: str, spec, is_callable: bool) -> bool:
    """Whether the features already in ``adata.obsm[key]`` are those ``spec`` asks for (then kept as they are).

    A callable without ``encoder_id`` cannot be recognised: its features are recomputed (``False``).

    Raises
    ------
    ValueError
        If ``adata.obsm[key]`` was not written by ``embed_images``, holds features of another spec, or
        was computed from other images.
    """
    from stexp.images._spec import FEATURE_FIELDS, VIEW_FIELDS, EncoderSpec

    rec = stored.get(key)
    if not rec:
        raise ValueError(
            f"adata.obsm[{key!r}] exists but was not written by embed_images (no spec in "
            f"adata.uns['stexp']['features']); pass overwrite=True to replace it or key_added= to keep it."
        )
    diffs = EncoderSpec.from_mapping(rec).diff(spec, (*FEATURE_FIELDS, *VIEW_FIELDS), names=("stored", "requested"))
    if diffs:
        raise ValueError(
            f"adata.obsm[{key!r}] holds features of another spec ({'; '.join(diffs)}). "
            "Pass overwrite=True to replace them (models trained on them will no longer match) or key_added= "
            "to keep both."
        )
    if is_callable:
        return False
    _check_same_slides(adata, libs, key, rec)
    return True


def _library_cache_key(adata, lib: str, rows: np.ndarray, spec, patch_um: float, views, fingerprint: str) -> str:
    """The disk-cache key of one library's features: its slide's content, its spot centres and the spec."""
    from stexp.images._cache import cache_key
    from stexp.images._spec import FEATURE_FIELDS

    # encoder_kwargs enters the key only when set, so caches made before the field existed stay valid
    lib_spec = {
        k: v for k, v in spec.to_dict().items() if k in FEATURE_FIELDS and (v is not None or k != "encoder_kwargs")
    } | {
        "patch_um": patch_um,
        "um_per_px": um_per_px(adata, lib),
    }
    # the view options enter the key only when set, so features cached before they existed still match
    lib_spec |= {k: v for k, v in views.items() if v}
    return cache_key(fingerprint, spot_coords(adata)[rows], lib_spec)


@dataclass
class _Embedded:
    """What :func:`_embed_libraries` produced: the features and what the record and the log say of them."""

    features: np.ndarray
    n_outside: dict[str, int]
    fingerprints: dict[str, str]
    n_loaded: int


def _embed_libraries(
    adata, enc, spec, libs: list[str], *, per_lib_um, views, on_outside, library_key, batch_size, device, use_disk,
    devices=None,
) -> _Embedded:  # fmt: skip
    """Features of every spot, library by library: from the disk cache when there, else computed (and cached).

    With ``devices`` (more than one process) the libraries not in the cache are embedded together by
    :func:`stexp.pp._embed_parallel.embed_jobs`, then cached one by one as here. Spots outside their image
    get NaN features. Sets torch's thread count (``embed_images`` restores it).
    """
    import torch

    from stexp.images._cache import load_features, save_features
    from stexp.images._patches import plan_patches
    from stexp.images._slide import image_um_per_px

    device = settings.resolve_device(device)
    feats = np.full((adata.n_obs, enc.out_dim), np.nan, dtype=np.float32)
    n_outside: dict[str, int] = {}
    fingerprints: dict[str, str] = {}
    n_loaded = 0
    todo: list[tuple[np.ndarray, Any, str | None]] = []  # (rows, plan, cache key) of the libraries to compute
    for lib in libs:
        rows = np.flatnonzero(library_mask(adata, lib, library_key))
        plan = plan_patches(adata, lib, rows, patch_um=per_lib_um[lib], on_outside=on_outside, library_key=library_key)
        n_outside[lib] = int((~plan.inside).sum())
        fingerprints[lib] = plan.view.fingerprint()
        ckey = None
        if use_disk:
            ckey = _library_cache_key(adata, lib, rows, spec, per_lib_um[lib], views, fingerprints[lib])
            hit = load_features(ckey, (len(rows), enc.out_dim))
            if hit is not None:
                feats[rows] = hit
                n_loaded += len(rows)
                continue
        todo.append((rows, plan, ckey))
    if devices is not None and todo:
        from stexp.pp._embed_parallel import EmbedJob, embed_jobs

        jobs = [EmbedJob(plan, image_um_per_px(adata, plan.view)) for _, plan, _ in todo]
        results = embed_jobs(
            enc, jobs, devices=devices, device=device, batch_size=batch_size, views=views, n_threads=settings.n_jobs,
            progress=settings.show_progress,
        )  # fmt: skip
        for (rows, _, ckey), values in zip(todo, results, strict=True):
            feats[rows] = values
            if ckey is not None:
                save_features(ckey, values)
        return _Embedded(feats, n_outside, fingerprints, n_loaded)
    pbar = None
    if settings.show_progress and todo:
        from tqdm.auto import tqdm

        pbar = tqdm(total=sum(len(r) for r, _, _ in todo), desc=f"embed {enc.name}", unit="spot", leave=False)
    torch.set_num_threads(settings.n_jobs)  # restored by leaves_process_state
    try:
        for rows, plan, ckey in todo:
            feats[rows] = _embed_plan(
                enc,
                plan,
                batch_size=batch_size,
                device=device,
                pbar=pbar,
                image_um_per_px=image_um_per_px(adata, plan.view),
                **views,
            )
            if pbar is not None and (n_out := int((~plan.inside).sum())):
                pbar.update(n_out)
            if ckey is not None:
                save_features(ckey, feats[rows])
    finally:
        if pbar is not None:
            pbar.close()
    return _Embedded(feats, n_outside, fingerprints, n_loaded)


def _write_features(adata, key: str, enc, spec, embedded: _Embedded) -> None:
    """Store the features in ``adata.obsm[key]`` and their spec in ``uns``, and log what was added."""
    adata.obsm[key] = embedded.features
    n_outside = embedded.n_outside
    record(adata, ("features", key), {**spec.to_uns(), "n_outside": n_outside, SLIDES_FIELD: embedded.fingerprints})
    total_out = sum(n_outside.values())
    extra = f"; {total_out} spots outside their image got NaN features" if total_out else ""
    cached = f"; {embedded.n_loaded} spots loaded from the disk cache" if embedded.n_loaded else ""
    views = "".join(
        part
        for part, on in (
            (f", resampled to {spec.mpp} µm/px", spec.mpp is not None),
            (f", {spec.stain_norm} stain normalisation", spec.stain_norm is not None),
            (", 8-view TTA", bool(spec.tta)),
            (", BatchNorm statistics re-estimated per slide (AdaBN)", bool(spec.adapt_bn)),
            (f", re-encoded as JPEG at quality {spec.jpeg_quality}", spec.jpeg_quality is not None),
        )
        if on
    )
    logger.info(
        f"added adata.obsm[{key!r}] ({adata.n_obs} x {enc.out_dim} float32, {enc.name}, "
        f"patch {spec.patch_um} µm -> {spec.patch_px} px{views}{cached}{extra}) and "
        f"adata.uns['stexp']['features'][{key!r}]"
    )


@leaves_process_state
@doc_params
def embed_images(
    adata: AnnData,
    *,
    encoder: str | os.PathLike | Callable = DEFAULT_ENCODER,
    weights: str | os.PathLike | None = "imagenet",
    encoder_kwargs: Mapping[str, object] | None = None,
    encoder_id: str | None = None,
    patch_um: float | Mapping[str, float] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    library_key: str = LIBRARY_KEY,
    key_added: str | None = None,
    overwrite: bool = False,
    on_outside: Literal["raise", "drop"] = "raise",
    cache: bool = True,
    copy: bool = False,
    mpp: float | None = None,
    stain_norm: Literal["reinhard", "macenko", "vahadane", "haematoxylin"] | None = DEFAULT_STAIN_NORM,
    tta: bool = False,
    adapt_bn: bool = False,
    jpeg_quality: int | None = None,
    deblock: bool = True,
    devices: int | None = None,
) -> AnnData | None:
    """Embed the H&E patch around every spot with an image encoder.

    Each library's slide (the image :func:`stexp.images.slide_view` chooses: the full-resolution file when
    available) is decoded once (a whole-slide file: SVS, NDPI, pyramidal TIFF..., is instead read region by
    region at the pyramid level the patch size needs, never whole); a square patch of ``patch_um`` µm
    around each spot centre is resampled to
    the encoder's input size (parts beyond the image border are white), normalised as the encoder
    declares and embedded in batches under ``torch.inference_mode`` (patches of the next batch are cut in
    a background thread; on CUDA with channels-last and bf16/fp16 autocast).

    Work is skipped when it is already done: if ``adata.obsm[key]`` holds features recorded with the same
    spec (encoder, weights, patch µm/px, normalisation, output dim) from the same images (a content hash
    per library is recorded), nothing is computed; if an image changed since, a ValueError asks for
    ``overwrite=True`` or another ``key_added``. Features are also
    cached on disk (``stexp.settings.cachedir / "features"``, one ``.npy`` per library keyed by the slide's
    content, its spot centres and the spec), so a new session loads them instead of recomputing. Callable /
    module encoders cannot be identified across calls unless you name them with ``encoder_id``: without it
    they are always recomputed and never cached on disk.

    Several devices: ``devices=N`` shards the patches of the libraries to embed over N processes (N GPUs,
    or N CPU processes with ``device="cpu"``) through Lightning, the launchers of training (spawned from a
    script, forked in Jupyter, started by torchrun / SLURM ``srun``); every process embeds a part of every
    library and the features come back to this process, the same as on one device. The disk cache also
    shards work: embed subsets of the libraries in separate processes or on separate machines
    (``embed_images(adata[adata.obs.library_id.isin(part)].copy(), device="cuda:1")``), then one call on
    the whole AnnData loads every library from the cache (see the distributed-training docs).

    Parameters
    ----------
    {adata}
    encoder
        A registry name (:func:`stexp.images.list_encoders`; default ``"efficientnet_lite0_ml"``:
        EfficientNet-Lite0 pooled at four depths, 1704-d, the best measured on HER2+ (``docs/benchmarks.md``);
        its ImageNet weights install offline), ``"timm:<model>"`` / ``"hf-hub:<org>/<model>"``, a
        ``torch.nn.Module`` / callable mapping ``(B, 3, H, W)`` to ``(B, D)`` (224 px, ImageNet normalisation), or an
        :class:`stexp.images.Encoder` from :func:`stexp.images.build_encoder` (to choose another input size
        or normalisation for a callable), or a local model folder (``config.json`` + ``model.safetensors`` /
        ``pytorch_model.bin`` as timm and the Hugging Face hub save them: UNI, H-optimus-0, Virchow2... you
        downloaded; its own mean/std and input size are used).
    weights
        ``"imagenet"`` (pretrained; a local folder's own weights), ``None`` (explicit random init) or a local
        state-dict file; ignored for a built Encoder.
    encoder_kwargs
        Extra arguments of ``timm.create_model`` for timm, hub and local-folder encoders (e.g. UNI:
        ``{"init_values": 1e-5, "dynamic_img_size": True}``). Recorded in the spec (as JSON) and part of the
        features' identity: features made with other arguments are neither reused nor loaded from the cache.
    encoder_id
        A name for a callable / module encoder (e.g. ``"my-uni-v1"``): its features are then cached on disk
        and recognised as up to date. Change it when the callable changes.
    patch_um
        Patch side in µm: one number, a mapping library -> µm, or ``None``: each library's default
        (:func:`stexp.images.default_patch_um`: ST 100 µm spots -> 75 µm, the best measured on HER2+
        (``docs/benchmarks.md``); Visium 55 µm spots -> 82.5 µm). The spec records one number when all
        libraries share it, else the per-library mapping.
    batch_size
        Patches per forward pass.
    {device}
    {library_key}
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
    {copy}
    mpp
        Resample every slide to this many µm per pixel before cutting patches (``None``: each slide's own
        resolution). Scans of different resolution then reach the encoder alike; a value at least as
        coarse as the coarsest scan expected makes finer scans look like it. A plausible pixel size
        (``stexp._layout.UM_PER_PX_RANGE``, 0.05-50 µm/px, as everywhere in stexp); not for whole-slide
        files read region by region.
    stain_norm
        ``"reinhard"``: map each slide's colour statistics (CIELAB, tissue pixels of a thumbnail) onto a
        fixed H&E target before embedding (:class:`stexp.images._stain.ReinhardNormalizer`); ``"macenko"``:
        estimate each slide's haematoxylin and eosin vectors and concentration range on a thumbnail and
        re-render every pixel's stain concentrations with a fixed reference H&E
        (:class:`stexp.images._stain.MacenkoNormalizer`; a slide whose thumbnail shows no tissue raises a
        ``ValueError``); ``"vahadane"``: as ``"macenko"``, with the stain vectors of a sparse non-negative
        factorisation of the thumbnail's optical density (Vahadane et al. 2016;
        :class:`stexp.images._stain.VahadaneNormalizer`); ``"haematoxylin"``: as ``"macenko"``, with the
        haematoxylin alone re-rendered (eosin left out: haematoxylin-channel features;
        :class:`stexp.images._stain.HaematoxylinNormalizer`); neither helped on the shift protocol
        (``docs/shift.md``);
        ``None``: none. Default ``"macenko"``: on the benchmark's shift protocol it cost clean
        leave-one-patient-out 0.002 PCC and kept the most when slides came from another lab's staining and
        scanner (``docs/shift.md``). Models record it; predicting with a model embeds new
        slides as its training slides were.
    tta
        Test-time augmentation: average the features of the 8 flips/rotations of each patch (8x the
        encoder's work); the features are then invariant to the patch's orientation.
    adapt_bn
        Test-time BatchNorm re-estimation per slide ("AdaBN", Li et al. 2016, "Revisiting batch normalization
        for practical domain adaptation"): before a library's patches are embedded, the running mean and
        variance of every BatchNorm layer of the encoder are re-estimated on at most
        :data:`stexp.images._views.ADAPT_BN_PATCHES` (512) of that library's patches (evenly spaced over its
        spots inside the image; deterministic, no random generator is touched), prepared exactly as the
        embedded ones (``mpp`` resampling, ``stain_norm``, the encoder's input normalisation; without the
        ``tta`` flips), by forward passes with only the BatchNorm layers in train mode; the library is then
        embedded in eval mode with these statistics, and the encoder's own statistics are restored
        afterwards (also on an error), so each slide starts from the pretrained ones and the encoder is
        left as it was. Removes per-slide shifts of the activations' mean and scale (colour, brightness,
        staining) at their source. Cost: about one extra forward pass over at most 512 patches per library
        (with ``devices=N``, in each process). Needs an encoder with BatchNorm layers (the default
        EfficientNet-Lite0 encoders, ResNet-50, DenseNet-121; not the ViT foundation models, which use
        LayerNorm: a ``ValueError``). Recorded and part of the features' identity like the other view
        options; its effect on the shift protocol is measured in ``docs/shift.md``.
    jpeg_quality
        Re-encode every slide (after the ``mpp`` resampling) as JPEG at this quality (1-95) before cutting
        patches: training slides then look like another lab's compressed export (e.g. ``mpp=3.6,
        jpeg_quality=8`` for a strongly compressed ~2000-px export). ``tl.predict`` reports new slides with
        heavy JPEG artefacts; training on slides seen this way is what to try for them (measured in
        ``docs/shift.md``). Decoded slides only (a ``ValueError`` for a whole-slide file read region by
        region). Recorded and part of the features' identity like the other view options.
    deblock
        Remove heavy JPEG block artefacts from a decoded slide before its patches are cut (default ``True``).
        Only a slide whose blockiness (:func:`stexp.images._quality.jpeg_blockiness`) exceeds 1.5 (about JPEG
        quality 30 or lower) is changed, so slides scanned or saved with ordinary quality get exactly the
        features they get without it; such a slide's JPEG quality is estimated and it is deblocked by
        re-application of JPEG (:func:`stexp.images._quality.deblock_jpeg`; logged). A ~2000-px export at quality 8
        otherwise reaches the encoder as a mosaic of flat 8-px blocks, each magnified to ~60 px; measured on the
        shift protocol in ``docs/shift.md``. Whole-slide files read region by region are not deblocked. Applied
        before ``mpp`` and ``jpeg_quality``; recorded and part of the features' identity like the other view
        options (records older than the option read ``False``).
    devices
        ``None`` (default): embed in this process. ``N``: shard the patches over N processes through Lightning
        (N GPUs with ``device="cuda"``, N CPU processes with ``device="cpu"``; under torchrun / SLURM ``srun``,
        N per node of the launcher's layout, every rank calling ``embed_images``). A script needs an
        ``if __name__ == "__main__":`` guard (the processes are spawned), and the encoder must be picklable
        (a module or a top-level class, not a lambda). A runtime choice: the features and their record are
        those of one process. Libraries in the disk cache are loaded, not embedded.

    Returns
    -------
    ``None`` (or the copy when ``copy=True``). Writes ``adata.obsm[key]`` (float32, ``n_obs x out_dim``) and
    ``adata.uns["stexp"]["features"][key]``: the :class:`~stexp.images.EncoderSpec` fields (``encoder``,
    ``weights`` (the weights identity: ``"imagenet"``, ``"random"``, ``"sha256:..."`` of a file...),
    ``weights_arg`` (what rebuilds the encoder; absent for random weights and callables), ``patch_um``,
    ``patch_px``, ``normalization``, ``out_dim``, ``library_key``, and the view options ``mpp``,
    ``stain_norm``, ``tta``, ``adapt_bn``, ``jpeg_quality``, ``deblock``), ``n_outside`` per library,
    ``slide_fingerprints`` (a content hash of each library's image) and ``versions``.

    Raises
    ------
    TypeError
        If ``encoder_kwargs`` is not a mapping, or ``mpp`` is not a number.
    ValueError
        If an option is out of range (``mpp`` outside 0.05-50 µm/px, ``mpp`` or ``jpeg_quality`` given for a
        whole-slide file, ``jpeg_quality`` outside 1-95, or
        resampling a slide to more than :data:`MAX_RESAMPLED_PIXELS`), stored features would be replaced
        (see ``overwrite``), ``adapt_bn=True`` is given for an encoder without BatchNorm layers, or the
        encoder returns NaN / infinite features (raised at the first such batch; nothing is written to
        ``adata.obsm`` or the cache).
    """
    from stexp.images._patches import resolve_patch_um
    from stexp.images._views import check_options

    _check_call(adata, batch_size, on_outside)
    _check_devices(devices)
    device = check_device(device)  # also when the features are cached and no device is used
    _check_encoder_kwargs(encoder_kwargs)
    checked_mpp, checked_norm, checked_tta, checked_adapt, checked_jpeg, checked_deblock = check_options(
        mpp, stain_norm, tta, adapt_bn, jpeg_quality, deblock
    )
    views: dict[str, Any] = {
        "mpp": checked_mpp,
        "stain_norm": checked_norm,
        "tta": checked_tta,
        "adapt_bn": checked_adapt,
        "jpeg_quality": checked_jpeg,
        "deblock": checked_deblock,
    }
    if copy:
        adata = adata.copy()
    libs = library_ids(adata, library_key)
    _check_whole_slide_views(adata, libs, checked_mpp, checked_jpeg)
    per_lib_um = resolve_patch_um(adata, libs, patch_um)
    stored = adata.uns.get(UNS_KEY, {}).get("features", {})

    # cheap check before building the encoder (a build may need a download): same name, weights, patch size
    if isinstance(encoder, str) and not _is_path(weights) and not overwrite:
        key = _named_features_current(
            adata, libs, stored, encoder=encoder, weights=weights, encoder_kwargs=encoder_kwargs,
            key_added=key_added, per_lib_um=per_lib_um, views=views,
        )  # fmt: skip
        if key is not None:
            logger.info(f"features adata.obsm[{key!r}] are up to date ({encoder}); nothing computed.")
            return adata if copy else None

    enc = _build_encoder(encoder, weights, encoder_kwargs, encoder_id)
    if checked_adapt:  # before any work, also when the features would come from the cache
        from stexp.images._views import check_adapt_bn

        check_adapt_bn(enc.module, enc.name)
    key = key_added or default_key(enc.name)
    # a callable is identified across calls only by a user-given encoder_id ("id:<name>" weights); identified is
    # not rebuildable: the module itself is stored nowhere (EncoderSpec.rebuildable is False for every callable)
    is_callable = str(enc.name).startswith("callable:") and not str(enc.weights_id).startswith("id:")
    spec = _feature_spec(enc, per_lib_um, library_key, views)
    if key in adata.obsm and not overwrite and _stored_features_current(adata, libs, stored, key, spec, is_callable):
        logger.info(f"features adata.obsm[{key!r}] are up to date ({enc.name}); nothing computed.")
        return adata if copy else None

    embedded = _embed_libraries(
        adata, enc, spec, libs, per_lib_um=per_lib_um, views=views, on_outside=on_outside,
        library_key=library_key, batch_size=int(batch_size), device=device, use_disk=cache and not is_callable,
        devices=None if devices is None else int(devices),
    )  # fmt: skip
    _write_features(adata, key, enc, spec, embedded)
    return adata if copy else None
