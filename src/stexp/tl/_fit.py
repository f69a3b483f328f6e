"""``stexp.tl.fit``: train any registered model on an AnnData."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._devices import check_device
from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list, library_ids
from stexp._process import leaves_process_state
from stexp._settings import logger, settings
from stexp.models._recipe import fit_recipe

from ._inputs import features_spec, resolve_features, resolve_genes, resolve_recipe, spot_data

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from stexp.models._base import ExpressionModel
    from stexp.models._recipe import Recipe


@leaves_process_state
@doc_params
def fit(
    adata: AnnData,
    *,
    model: str | Recipe | None = None,
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
    calibration_folds: int | None = None,
    calibration_score: str | None = None,
    smoothing: float | str | None = None,
    slide_weights: Mapping[str, int] | None = None,
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
        ``None``: the default pipeline, :data:`stexp.models.DEFAULT_RECIPE` (print it to see its model,
        hyper-parameters, smoothing and calibration; the best measured, ``docs/benchmarks.md``). A registered
        model name (:func:`stexp.models.available_models`): ``"mclstexp"``, ``"mclstexp_plus"``, ``"nh2st"``,
        ``"ridge_knn"``, or the baselines ``"mean"``, ``"ridge"``, ``"knn"``, ``"mlp"``, with its defaults. Or
        a :class:`stexp.models.Recipe`. The options below that are given replace the recipe's.
    {genes}
    {features_key}
    {library_key}
    {layer}
    max_epochs, batch_size, lr, weight_decay, seed
        Training options. ``None`` keeps the model's own default (mclSTExp: 90 epochs, batch 128, lr 1e-4,
        weight decay 1e-3, as in the paper; NH2ST: 200 epochs, lr 5e-4; see each model's
        ``default_hparams``); an option the model does not take raises a TypeError (``seed`` is passed only
        to models that take one, and seeds the calibration); ``seed=None``: ``stexp.settings.seed``.
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
        ``calibration_folds`` inner folds (patients, else slides, else spatial blocks of a single slide;
        ``stexp.models._folds``), and keep, from the out-of-fold residuals, split-conformal interval
        quantiles (``stexp.tl.predict(..., coverage=0.9)``) and each gene's expected PCC on a new slide.
        Costs ``calibration_folds`` extra fits. ``None``: the recipe's choice (the default pipeline and the
        models that fit in seconds, ``"mean"``, ``"ridge"``, ``"knn"``, ``"ridge_knn"``, calibrate; the neural
        ones do not unless ``calibrate=True``). Validation slides are not used.
    calibration_folds
        Inner folds of the calibration (``None``: the recipe's, 3).
    calibration_score
        Per-spot difficulty that scales the intervals, one of :data:`stexp.models.CALIBRATION_SCORES`
        (``None``: the recipe's, ``"depth"``: the spot's sequencing depth predicted from its image features,
        widened for spots far from every training spot in image-feature space).
    smoothing
        Spatial smoothing of the model's predictions over neighbouring spots of the same slide (a
        Gaussian of σ µm; ``stexp.models._smoothing``), saved with the model and applied by
        :func:`stexp.tl.predict`. ``"auto"`` chooses σ on training slides only: on the ``validation``
        slides when given, else on the inner folds (up to 3 extra fits; costly for neural models). A number
        is σ in µm; ``0``: none. ``None``: the recipe's (none for a model name; ``"auto"`` for the default).
    slide_weights
        How many times a training slide counts, e.g. ``{{"C2": 3}}``: its spots enter the fit (the retrieval bank,
        the model's training set, the inner folds) that many times; slides not named count once. The workflow
        of adapting to a new patient with one measured section (:doc:`/shift`): on HER2+ a weight of 3 for the
        new patient's measured section beat 1 (``benchmarks/adapt.py``). Recorded in the model card.
    **model_kwargs
        Model hyper-parameters (see each model's ``default_hparams``). For ``"mclstexp"`` and
        ``"nh2st"``, ``finetune_encoder=True`` trains the image encoder that made ``features_key``
        end to end on augmented patches (GPU advised); the model then embeds patches itself at
        prediction time.

    Returns
    -------
    The fitted model (an :class:`~stexp.models.ExpressionModel`); save it with ``model.save(path)``.
    """
    device = check_device(device)
    recipe = resolve_recipe(
        model,
        hparams=model_kwargs,
        training_options={"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay},
        smoothing=smoothing,
        calibrate=calibrate,
        calibration_folds=calibration_folds,
        calibration_score=calibration_score,
    )
    seed = settings.seed if seed is None else seed
    recipe = recipe.with_training_options(seed=seed)
    genes = resolve_genes(adata, genes)
    features_key = resolve_features(adata, features_key, library_key=library_key)
    val_libs = _validation_libraries(adata, validation, library_key)
    spec = features_spec(adata, features_key)
    data = spot_data(
        adata,
        features_key=features_key,
        library_key=library_key,
        genes=genes,
        layer=layer,
        patches=spec if recipe.hparams.get("finetune_encoder", False) else None,
    )
    is_val = np.isin(data.library, val_libs)
    train, val = data.subset(~is_val), (data.subset(is_val) if is_val.any() else None)
    weights = _slide_weights(slide_weights, train.libraries, val_libs)
    n_spots = train.n_spots
    if weights:
        train = train.subset(_weighted_rows(train.library, weights))
    logger.info(
        f"fitting {recipe} on {n_spots} spots of {len(train.libraries)} slide(s), {len(genes)} genes"
        + (f", slide weights {weights} ({train.n_spots} weighted spots)" if weights else "")
        + (f", validating on {val_libs}" if val_libs else "")
    )
    fitted = fit_recipe(
        recipe,
        train,
        val,
        genes=genes,
        features_key=features_key,
        encoder_spec=spec,
        device=device,
        num_workers=num_workers,
        devices=list(devices) if isinstance(devices, Sequence) else devices,
        seed=int(seed or 0),
    )
    fitted.card = _card(adata, fitted, train, library_key, weights)
    return fitted


def _slide_weights(
    slide_weights: Mapping[str, int] | None, libraries: Sequence[str], validation: Sequence[str]
) -> dict[str, int]:
    """The slide weights that differ from 1, checked: training slides, positive integers."""
    if not slide_weights:
        return {}
    if not isinstance(slide_weights, Mapping):
        raise TypeError(f"slide_weights must map library ids to integers, e.g. {{'C2': 3}}, got {slide_weights!r}.")
    known = {str(lib) for lib in libraries}
    checked: dict[str, int] = {}
    for lib, weight in slide_weights.items():
        if str(lib) in validation:
            raise ValueError(f"slide_weights names {lib!r}, a validation slide: it is not trained on.")
        if str(lib) not in known:
            raise KeyError(f"slide_weights names {lib!r}, not a training slide ({sorted(known)}).")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 1:
            raise ValueError(f"slide_weights[{lib!r}] must be a positive integer (times it counts), got {weight!r}.")
        if int(weight) != 1:
            checked[str(lib)] = int(weight)
    return checked


def _weighted_rows(library: np.ndarray, weights: dict[str, int]) -> np.ndarray:
    """Row indices in which the spots of each weighted slide appear ``weight`` times (in slide order)."""
    rows = np.arange(len(library))
    extra = [rows[library.astype(str) == lib] for lib, w in weights.items() for _ in range(w - 1)]
    return np.concatenate([rows, *extra])


def _card(adata, model: ExpressionModel, train, library_key: str, weights: dict[str, int] | None = None):
    """The model card of a fit: the training slides (spots, patient, pixel and spot size, detail seen) and the model."""
    from stexp._layout import spot_diameter_um, um_per_px
    from stexp.images._slide import detail_um_per_px, readable_views
    from stexp.models._card import ModelCard

    libs: dict[str, dict[str, Any]] = {}
    obs_libs = adata.obs[library_key].astype(str).to_numpy()
    views = readable_views(adata, train.libraries)
    for lib in train.libraries:
        weight = (weights or {}).get(str(lib), 1)
        info: dict[str, Any] = {"spots": int(np.sum(train.library == lib)) // weight}
        if weight != 1:
            info["weight"] = weight
        if "patient" in adata.obs:
            patients = adata.obs["patient"].astype(str).to_numpy()[obs_libs == str(lib)]
            if len(set(patients)) == 1:
                info["patient"] = str(patients[0])
        for name, get in (("um_per_px", um_per_px), ("spot_diameter_um", spot_diameter_um)):
            try:
                info[name] = round(float(get(adata, str(lib))), 4)
            except (KeyError, ValueError, TypeError):  # not recorded for this library: left out of the card
                pass
        detail = detail_um_per_px(adata, views[str(lib)], model.encoder_spec or None) if str(lib) in views else None
        if detail is not None:  # the finest detail its features saw (tl.predict compares new slides with it)
            info["detail_um_per_px"] = round(detail, 4)
        libs[str(lib)] = info
    return ModelCard.from_fit(model, libraries=libs)


def _validation_libraries(adata, validation: str | Sequence[str] | None, library_key: str) -> list[str]:
    """The validation library ids, checked: known, and leaving at least one slide to train on."""
    libs = library_ids(adata, library_key)
    val_libs = as_list(validation) or []
    unknown = [v for v in val_libs if v not in libs]
    if unknown:
        raise KeyError(f"validation library id(s) {unknown} not in adata.obs[{library_key!r}] ({libs}).")
    if val_libs and len(libs) < 2:
        raise ValueError(f"validation needs at least two slides, adata has {len(libs)} ({libs}).")
    if val_libs and set(val_libs) == set(libs):
        raise ValueError("every slide is held out for validation; none is left to train on.")
    return list(val_libs)
