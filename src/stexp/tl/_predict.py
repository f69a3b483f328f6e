"""``stexp.tl.predict``: write a model's predicted expression into the AnnData (``tl._storage``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stexp._devices import check_device
from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, library_ids
from stexp._process import leaves_process_state
from stexp._settings import logger
from stexp.images._spec import check_encoder_spec

from ._inputs import check_var_names, features_spec, spot_data

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from stexp.models._base import ExpressionModel


def _ensure_features(adata, model, *, features_key: str, library_key: str, **embed_options: object) -> None:
    """Embed the images with the model's encoder spec when the features are missing.

    The one place where :func:`stexp.tl.predict` and ``stexp predict`` turn a model's
    :class:`~stexp.images.EncoderSpec` back into :func:`stexp.pp.embed_images` arguments
    (:meth:`~stexp.images.EncoderSpec.embed_kwargs`); ``embed_options`` (``batch_size``, ``device``) are
    passed on.

    Raises
    ------
    KeyError
        If the features are missing and the model's encoder cannot be rebuilt from its spec.
    ValueError
        If the model's features were cut at a different patch size per library and ``adata`` has
        another library.
    """
    if features_key in adata.obsm:
        return
    from collections.abc import Mapping

    spec = model.encoder_spec
    try:
        kwargs = spec.embed_kwargs()
    except ValueError as err:
        raise KeyError(
            f"the {model.name} model needs image features {features_key!r}, which are not in adata.obsm, and {err} "
            "Embed the images with the encoder the model was trained with (stexp.pp.embed_images, in Python) and "
            "pass features_key= to stexp.tl.predict."
        ) from None
    if isinstance(kwargs["patch_um"], Mapping):
        missing = [lib for lib in library_ids(adata, library_key) if lib not in kwargs["patch_um"]]
        if missing:
            raise ValueError(
                f"the {model.name} model was trained on features cut at a different patch size per library "
                f"({kwargs['patch_um']} µm), so the patch size of librar{'y' if len(missing) == 1 else 'ies'} "
                f"{missing[:5]} is unknown; to predict new slides, fit it on features embedded with one patch_um=."
            )
    from stexp.pp import embed_images

    embed_images(adata, **kwargs, library_key=library_key, key_added=features_key, **embed_options)


@leaves_process_state
@doc_params
def predict(
    adata: AnnData,
    model: ExpressionModel,
    *,
    key_added: str = "stexp_pred",
    library_key: str = LIBRARY_KEY,
    features_key: str | None = None,
    device: str | None = None,
    coverage: float | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict expression for every spot of ``adata`` from its images.

    Writes the prediction of the model's genes that are in ``adata.var_names`` under ``key_added``
    (float32), its per-spot spread (an uncertainty, where the model gives one) under
    ``key_added + "_std"``, and a record in ``adata.uns["stexp"][key_added]``. Measured expression is
    never used.

    Where: when the model's panel is all of ``adata.var_names``, ``adata.layers[key_added]``
    (``n_obs x n_vars``); when ``var`` holds more genes than the panel, ``adata.obsm[key_added]``, a
    ``pandas.DataFrame`` (index ``obs_names``, one column per panel gene), so that a 785-gene panel on
    100,000 spots x 18,000 genes takes 0.3 GB instead of two dense NaN-padded 7 GB layers. Read either
    with ``adata.obsm[key_added]["ERBB2"]`` / ``adata.layers[key_added]``; every ``stexp.tl`` / ``stexp.pl``
    function that takes a prediction key accepts both (see ``docs/layout.md``).

    A calibrated model (``stexp.tl.fit(..., calibrate=True)``) also writes each gene's expected PCC on a
    new slide to ``adata.var[key_added + "_expected_pcc"]`` and, with ``coverage=``, the interval bounds
    ``key_added + "_lo"`` and ``key_added + "_hi"`` next to the prediction, in the same storage.

    Each slide is compared with the model's training slides twice, recorded in ``uns["stexp"][key_added]``
    and logged as a warning when it stands out: its shift score (``obs[key_added + "_shift"]``, the distance
    of its image features to the training spots; record ``"shift"``) and the finest detail its images show
    against the training slides' (record ``"resolution"``: a slide more than 1.5 times coarser, e.g. a
    ~2000-px export, is reported with what to try). An in-memory image with heavy JPEG block artefacts is
    reported too (record ``"compression"``; by default its features were computed from the image deblocked,
    the ``deblock`` view option of :func:`stexp.pp.embed_images`). See ``docs/shift.md``.

    A prediction replaces everything under ``key_added`` (``stexp.tl._keys.PredictionKeys``): what a
    previous prediction of that key left (its spread, intervals, expected PCC, shift score, record, and the
    scores of :func:`stexp.tl.evaluate`) is removed first, in both storages, even where this model does not
    write it again; what was removed is logged.

    Parameters
    ----------
    adata
        AnnData in stexp's layout; it needs images or the features the model was trained on.
        Slides without measured expression (e.g. from :func:`stexp.io.grid_spots`) are fine.
    {model}
    key_added
        Key of the prediction (a layer or an ``obsm`` DataFrame, see above).
    {library_key}
    features_key
        ``obsm`` key of the image features (default: the key the model was trained on). When it is
        missing and the model's encoder is a registry name, the images are embedded first. Not used
        by a model whose image encoder was fine-tuned (``finetune_encoder=True``): it embeds the
        patches with its own encoder, at the patch size it was trained with.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``...; ``None``: where the model was fitted or loaded for. Missing
        features are embedded there too.
    coverage
        Write split-conformal intervals that contain a new spot's measured value (per gene) with this
        probability, e.g. ``0.9``; their width follows the model's difficulty score (wider where the
        model is less sure). Needs a calibrated model (see ``docs/uncertainty.md``).
    {copy}

    Raises
    ------
    ValueError
        If the features were made with another encoder, weights or patch size than the model's;
        ``coverage`` is given for a model without calibration or above the largest coverage its
        calibration supports (the message says which); or ``adata.var_names`` hold duplicates (named).
        All before any embedding or prediction.
    """
    device = None if device is None else check_device(device)
    calibration = model.calibration
    if coverage is not None:  # refused before any work
        model.check_intervals(coverage)
    check_var_names(adata)  # before any embedding
    adata = adata.copy() if copy else adata
    library_ids(adata, library_key)
    features_key = features_key or model.features_key
    if model.reads_patches:  # a fine-tuned encoder embeds the patches itself; obsm features are not used
        features_key = None
    else:
        if features_key is None:
            raise ValueError(f"the {model.name} model records no features key; pass features_key= naming adata.obsm.")
        _ensure_features(
            adata, model, features_key=features_key, library_key=library_key, device=device or model.device
        )
        check_encoder_spec(model.encoder_spec, features_spec(adata, features_key), what=f"the {model.name} model")

    var_idx = adata.var_names.get_indexer(model.genes)
    present = var_idx >= 0
    if not present.any():
        raise ValueError(
            f"none of the model's {len(model.genes)} genes is in adata.var_names; "
            "build the AnnData with genes=model.genes (e.g. stexp.io.grid_spots(..., genes=model.genes))."
        )
    data = spot_data(
        adata,
        features_key=features_key,
        library_key=library_key,
        patches=model.encoder_spec if model.reads_patches else None,
    )
    if coverage is None:
        mean, spread = model.predict(data, device=device)
        lo = hi = None
    else:
        mean, spread, lo, hi = model.predict_intervals(data, coverage, device=device)
    in_var = lambda values: None if values is None else np.asarray(values)[:, present]
    shift, shift_record, factor = _shift(model, data)
    from stexp.images._slide import readable_views

    from ._compression import compression_check
    from ._resolution import resolution_check

    views = readable_views(adata, data.library)  # each slide's image, found once for both checks
    resolution = resolution_check(adata, model, views)
    # the features' spec equals the model's (check_encoder_spec above); a fine-tuned encoder has no view options
    compression = compression_check(views, deblocked=not model.reads_patches and model.encoder_spec.deblock)
    expected = None if calibration is None else np.asarray(calibration.expected_pcc)[present] * factor

    from ._keys import write_prediction_set

    panel = np.asarray(model.genes)[present]  # storage: layers when panel == var, else an obsm gene DataFrame
    n_missing = int((~present).sum())
    added = write_prediction_set(
        adata,
        key_added,
        panel,
        in_var(mean),
        std=in_var(spread),
        lo=in_var(lo),
        hi=in_var(hi),
        expected_pcc=expected,
        shift=shift,
        record={
            "model": model.name,
            "features_key": features_key,
            "fine_tuned_encoder": model.reads_patches,
            "genes": list(panel),
            "n_model_genes_missing_from_var": n_missing,
            "target": "log1p of counts per 10,000",
            "hparams": model.hparams,
            "coverage": None if coverage is None else float(coverage),
            "calibration": None if calibration is None else calibration.config(),
            "shift": shift_record,
            "resolution": resolution,
            "compression": compression,
        },
    )
    if n_missing:
        logger.warning(f"{n_missing} of the model's genes are not in adata.var_names and were not written.")
    logger.info(f"added {', '.join(added)}")
    return adata if copy else None


def _shift(model: ExpressionModel, data) -> tuple[np.ndarray | None, dict | None, float]:
    """Per-spot shift scores, their record (per slide) and the factor applied to the expected PCC; warns per slide.

    The factor is the smallest of the slides' (``stexp.models._shift.expected_pcc_factor``): ``var`` holds one
    expected PCC per gene for all the slides predicted together, so it is the most shifted slide's.
    """
    scores = model.shift_scores(data)
    if scores is None:
        return None, None, 1.0
    reference = model.shift
    slides = reference.summary(scores, data.library)
    record = {
        "what": "median over the slide's spots of the distance to the nearest training spots in image-feature "
        "space, in units of the training slides' own held-out distance (1: like a training slide)",
        "training_range": reference.describe_range(),
        "range_max": reference.range_max,
        "slides": slides,
    }
    factor = float(np.nanmin([s["expected_pcc_factor"] for s in slides.values()]))
    factor = factor if np.isfinite(factor) else 1.0
    for lib, s in slides.items():
        if s["flagged"]:
            logger.warning(
                f"slide {lib!r} looks unlike the model's training slides (shift score {s['score']:.2f}; "
                f"{reference.describe_range()}): its stain, scanner, resolution or tissue lies outside what the "
                f"model was trained on, so its predictions are likely unreliable (expected PCC scaled by "
                f"{s['expected_pcc_factor']:.2f}). Check the slide's µm/px and staining; measure one section "
                "of this source and add it to the training slides (docs/shift.md)."
            )
        else:
            logger.info(f"slide {lib!r}: shift score {s['score']:.2f} ({reference.describe_range()})")
    return scores, record, factor
