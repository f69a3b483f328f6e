"""``stexp.tl.fit``: train any registered model on an AnnData."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list, library_ids
from stexp._process import leaves_process_state
from stexp._settings import logger, settings

from ._inputs import features_spec, make_model, resolve_features, resolve_genes, spot_data

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from stexp.models._base import ExpressionModel


#: What ``fit`` trains without options: the model, its hyper-parameters and the smoothing of its predictions
#: (kNN retrieval with k=200 and its softmax temperature chosen on the training slides: the best measured on
#: HER2+ under leave-one-patient-out, cross-resolution and stain shift, ``docs/benchmarks.md``). With fewer
#: training spots than ``k``, every training spot is a neighbour.
DEFAULT_MODEL = "knn"
DEFAULT_MODEL_PARAMS: dict[str, Any] = {"k": 200, "temperature": "auto"}
DEFAULT_SMOOTHING: float | str | None = "auto"


@leaves_process_state
@doc_params
def fit(
    adata: AnnData,
    *,
    model: str | None = None,
    genes: str | Sequence[str] | None = None,
    features_key: str | None = None,
    library_key: str = LIBRARY_KEY,
    layer: str | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    seed: int | None = None,
    validation: str | Sequence[str] | None = None,
    device: str = "auto",
    num_workers: int = 0,
    devices: int | Sequence[int] | None = None,
    calibrate: bool | None = None,
    calibration_folds: int = 3,
    calibration_score: str | None = None,
    smoothing: float | str | None = None,
    **model_kwargs: Any,
) -> ExpressionModel:
    """Train an expression model on the slides of ``adata``.

    The caller's process is left as it was: global RNG states, torch's thread count, deterministic
    flags and environment variables are restored when ``fit`` returns or raises.

    Parameters
    ----------
    adata
        AnnData in stexp's layout with raw counts and image features (or images to embed).
    model
        Name of a registered model (see :func:`stexp.models.available_models`): ``"mclstexp"``,
        ``"nh2st"``, ``"ridge_knn"``, or the baselines ``"mean"``, ``"ridge"``, ``"knn"``, ``"mlp"``.
        ``None``: the default pipeline, the best measured on the HER2+ benchmark (``docs/benchmarks.md``):
        :data:`DEFAULT_MODEL` with :data:`DEFAULT_MODEL_PARAMS` and ``smoothing=`` :data:`DEFAULT_SMOOTHING`.
    {genes}
    {features_key}
    {library_key}
    {layer}
    max_epochs, batch_size, lr, weight_decay, seed
        Training options, passed to models that take them. ``None`` keeps each model's own default
        (mclSTExp: 90 epochs, batch 128, lr 1e-4, weight decay 1e-3, as in the paper; NH2ST: 200
        epochs, lr 5e-4; see each model's ``default_hparams``); ``seed=None``: ``stexp.settings.seed``.
    validation
        Library id(s) held out for validation (early stopping, monitoring); they are not trained on.
    {device}
    num_workers
        DataLoader worker processes that cut and augment patches when the image encoder is fine-tuned.
    devices
        Train a neural model with DDP over this many devices, one process each: GPUs with ``device="cuda"``
        (or a list of GPU indices), CPU processes (gloo) with ``device="cpu"``. ``None``: one device, or
        the layout of torchrun / SLURM ``srun`` when they launched the script. In Jupyter the processes are
        forked (``"ddp_notebook"``), from a script spawned (``"ddp_spawn"``); the trained model and its
        history come back to this process. ``batch_size`` is per process (contrastive models gather their
        negatives from every process). A runtime choice, never saved with the model; see :doc:`/distributed`.
    calibrate
        Calibrate the model's uncertainty on the training slides (see ``docs/uncertainty.md``): refit it on
        ``calibration_folds`` inner folds that each leave out training slides (patients when there are
        several; spatial blocks of a single slide), and keep, from the out-of-fold residuals, split-conformal
        interval quantiles (``stexp.tl.predict(..., coverage=0.9)``) and each gene's expected PCC on a new
        slide. Costs ``calibration_folds`` extra fits. ``None`` (default): on for the models that fit in
        seconds (``"mean"``, ``"ridge"``, ``"knn"``), off for the neural ones (``"mlp"``, ``"mclstexp"``,
        ``"nh2st"``; pass ``calibrate=True``). Validation slides are not used.
    calibration_folds
        Inner folds of the calibration (at most the number of training slides or patients).
    calibration_score
        Per-spot difficulty that scales the intervals, one of ``stexp.models._calibration.SCORES``
        (default ``"depth"``: the spot's sequencing depth predicted from its image features, widened for
        spots far from every training spot in image-feature space).
    smoothing
        Spatial smoothing of the model's predictions over neighbouring spots of the same slide (a
        Gaussian of σ µm; ``stexp.models._smoothing``), saved with the model and applied by
        :func:`stexp.tl.predict`. ``"auto"`` chooses σ on training slides only: on the ``validation``
        slides when given, else by an inner cross-validation over the training slides (up to 3 extra
        fits; costly for neural models). A number is σ in µm; ``0``: none. ``None``: none, or with
        ``model=None`` the default pipeline's :data:`DEFAULT_SMOOTHING`.
    **model_kwargs
        Model hyper-parameters (see each model's ``default_hparams``). For ``"mclstexp"`` and
        ``"nh2st"``, ``finetune_encoder=True`` trains the image encoder that made ``features_key``
        end to end on augmented patches (GPU advised); the model then embeds patches itself at
        prediction time.

    Returns
    -------
    The fitted model (an :class:`~stexp.models.ExpressionModel`); save it with ``model.save(path)``.
    """
    default_pipeline = model is None
    if model is None:
        model = DEFAULT_MODEL
        model_kwargs = {**DEFAULT_MODEL_PARAMS, **model_kwargs}
        smoothing = DEFAULT_SMOOTHING if smoothing is None else smoothing
    if smoothing is not None:
        model_kwargs["smoothing"] = smoothing
    libs = library_ids(adata, library_key)
    genes = resolve_genes(adata, genes)
    features_key = resolve_features(adata, features_key, library_key=library_key)

    val_libs = as_list(validation) or []
    unknown = [v for v in val_libs if v not in libs]
    if unknown:
        raise KeyError(f"validation library id(s) {unknown} not in adata.obs[{library_key!r}] ({libs}).")
    if val_libs and len(libs) < 2:
        raise ValueError(f"validation needs at least two slides, adata has {len(libs)} ({libs}).")
    if val_libs and set(val_libs) == set(libs):
        raise ValueError("every slide is held out for validation; none is left to train on.")

    options = {
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": settings.seed if seed is None else seed,
    }
    spec = features_spec(adata, features_key)
    est = make_model(model, genes, features_key=features_key, encoder_spec=spec, options=options, **model_kwargs)
    data = spot_data(
        adata,
        features_key=features_key,
        library_key=library_key,
        genes=genes,
        layer=layer,
        patches=spec if est.reads_patches else None,
    )
    is_val = np.isin(data.library, val_libs)
    train, val = data.subset(~is_val), (data.subset(is_val) if is_val.any() else None)
    too_many = [k for k in est.bank_size_hparams if int(est.hparams.get(k) or 0) > train.n_spots]
    if default_pipeline and too_many:  # a small training set: every spot is a neighbour
        logger.info(f"{est.name}: {too_many} > {train.n_spots} training spots; every training spot is a neighbour")
        est = est.inner_copy(train.n_spots, smoothing=est.smoothing["option"])
    logger.info(
        f"fitting {est.name} on {train.n_spots} spots of {len(train.libraries)} slide(s), {len(genes)} genes"
        + (f", validating on {val_libs}" if val_libs else "")
    )
    est.fit(train, val, device=device, num_workers=num_workers, devices=devices)
    auto = calibrate is None
    if auto:  # neural models (their module is imported once one exists) cost minutes per refit
        torch_module = sys.modules.get("stexp.models._torch")
        is_neural = torch_module is not None and isinstance(est, torch_module.TorchExpressionModel)
        calibrate = not is_neural and not est.reads_patches
    if calibrate:
        from stexp.models._calibration import DEFAULT_SCORE
        from stexp.models._calibration import calibrate as calibrate_model

        try:
            est.calibration = calibrate_model(
                est,
                train,
                n_folds=calibration_folds,
                score=calibration_score or DEFAULT_SCORE,
                seed=int(options["seed"] or 0),
            )
        except ValueError as err:  # e.g. an inner fold too small for the model (kNN's k); asked for: raise
            if not auto:
                raise
            logger.warning(f"{est.name}: not calibrated ({err}); predict(coverage=) will refuse this model.")
    return est
