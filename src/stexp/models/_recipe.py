"""Recipes: what a fit trains, and the one function that fits one.

A :class:`Recipe` names a registered model, its hyper-parameters, the spatial smoothing of its
predictions and its calibration. :func:`fit_recipe` is the only way stexp trains a model:
:func:`stexp.tl.fit`, every fold of :func:`stexp.tl.cross_validate`, the inner refits that choose the
smoothing σ and calibrate the uncertainty, and the benchmark all go through it. So small training sets
are handled in one place (:func:`build_model` clamps every retrieval size to the training spots), and the
steps after training (σ, then calibration) always run in the same order.

No AnnData here: :func:`fit_recipe` takes :class:`~stexp.models.SpotData`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._settings import logger

from ._data import SpotData
from ._folds import INNER_FOLDS
from ._hparams import describe_hparams, typed_hparams
from ._registry import get_model_class
from ._smoothing import smoothing_option

if TYPE_CHECKING:  # pragma: no cover
    from stexp.images._spec import EncoderSpec

    from ._base import ExpressionModel, PredictionPair

#: Options of a fit that a model receives only when it declares them as hyper-parameters.
TRAINING_OPTIONS = ("max_epochs", "batch_size", "lr", "weight_decay", "seed")
#: Difficulty score of the calibration unless a recipe names another (see :data:`stexp.models.CALIBRATION_SCORES`).
DEFAULT_CALIBRATION_SCORE = "depth"
#: Fewest training spots of a fit (inner refits excepted): with one spot every prediction is that spot's
#: expression whatever the image, and no choice (temperature, σ, penalty, calibration) can be made on inner folds.
MIN_TRAIN_SPOTS = 2


@dataclass(frozen=True)
class Recipe:
    """What a fit trains: a registered model, its hyper-parameters, smoothing and calibration.

    Parameters
    ----------
    model
        A registered model name (:func:`stexp.models.available_models`).
    hparams
        Hyper-parameters of the model; each must be one the model declares (checked here, with the list
        of what it accepts) and of its declared type (typed here: ``k=200.0`` holds ``200``; ranges are
        checked when the model is made). Those not given keep the model's defaults.
    smoothing
        Spatial smoothing of the predictions: ``None`` / ``0`` (none), a σ in µm, or ``"auto"`` (σ chosen
        on the training slides; :func:`stexp.models._smoothing.fit_smoothing`).
    calibrate
        Calibrate the uncertainty on inner folds of the training slides (``stexp.models._calibration``).
        ``None``: on for the models that fit in seconds (``ExpressionModel.calibrate_by_default``).
    calibration_folds
        Inner folds of the calibration.
    calibration_score
        The calibration's difficulty score.
    feature_norm
        Per-slide normalisation of the image features at fit and prediction (``"slide_centre"``,
        ``"slide_standardise"``; :mod:`stexp.models._feature_norm`), or ``None``.
    name
        A label for logs and records (e.g. ``"default"``); ``None``: the model name.
    """

    model: str
    hparams: Mapping[str, Any] = field(default_factory=dict)
    smoothing: float | str | None = None
    calibrate: bool | None = None
    calibration_folds: int = INNER_FOLDS
    calibration_score: str = DEFAULT_CALIBRATION_SCORE
    feature_norm: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        cls = get_model_class(self.model)  # KeyError listing the registry
        object.__setattr__(self, "model", cls.name)
        unknown = sorted(set(self.hparams) - set(cls.default_hparams))
        if unknown:
            raise TypeError(_refusal(cls, unknown))
        object.__setattr__(self, "hparams", typed_hparams(cls, self.hparams))
        object.__setattr__(self, "smoothing", smoothing_option(self.smoothing))
        if self.calibrate is not None and not isinstance(self.calibrate, bool):
            raise TypeError(f"calibrate must be True, False or None, got {self.calibrate!r}.")
        folds = self.calibration_folds
        if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
            raise ValueError(f"calibration_folds must be an integer >= 2, got {folds!r}.")
        from ._calibration import SCORES
        from ._feature_norm import check_feature_norm

        check_feature_norm(self.feature_norm)
        if self.feature_norm is not None and self.hparams.get("finetune_encoder", False):
            raise ValueError("feature_norm works on frozen features; a model that fine-tunes its encoder has none.")
        if self.calibration_score not in SCORES:
            raise ValueError(f"calibration_score must be one of {SCORES}, got {self.calibration_score!r}.")

    @property
    def model_class(self) -> type[ExpressionModel]:
        """The registered class of :attr:`model`."""
        return get_model_class(self.model)

    @property
    def label(self) -> str:
        """:attr:`name`, or the model name."""
        return self.name or self.model

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (``hparams`` replaces the mapping; see :meth:`with_hparams`)."""
        return replace(self, **changes)

    def with_hparams(self, **hparams: Any) -> Recipe:
        """A copy whose hyper-parameters are updated with ``hparams``."""
        return replace(self, hparams={**self.hparams, **hparams})

    def with_training_options(self, **options: Any) -> Recipe:
        """A copy with the training options (:data:`TRAINING_OPTIONS`) that are not ``None``.

        ``seed`` goes only to a model that declares it; any other option a model does not take raises a
        TypeError naming what the model accepts (so ``max_epochs`` is never silently ignored).
        """
        unknown = sorted(set(options) - set(TRAINING_OPTIONS))
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; the training options are {TRAINING_OPTIONS}.")
        declared = self.model_class.default_hparams
        given = {k: v for k, v in options.items() if v is not None}
        refused = sorted(k for k in given if k not in declared and k != "seed")
        if refused:
            raise TypeError(_refusal(self.model_class, refused))
        return self.with_hparams(**{k: v for k, v in given.items() if k in declared})

    def wants_calibration(self) -> bool:
        """Whether :func:`fit_recipe` calibrates (``calibrate=None`` resolved by the model class)."""
        if self.calibrate is not None:
            return self.calibrate
        return bool(self.model_class.calibrate_by_default) and not self.hparams.get("finetune_encoder", False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (saved in a model folder)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(values))

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        calibrate = {None: "auto", True: "on", False: "off"}[self.calibrate]
        norm = f", feature_norm={self.feature_norm!r}" if self.feature_norm else ""
        return (
            f"{self.label}: {self.model}({params}), smoothing={self.smoothing!r}, calibrate={calibrate} "
            f"({self.calibration_score!r}, {self.calibration_folds} folds){norm}"
        )


def _refusal(cls: type[ExpressionModel], names: list[str]) -> str:
    """``model 'ridge' does not take ['max_epochs']; it takes n_components: int | None = 256, ...``."""
    return f"model {cls.name!r} does not take {names}; it takes {describe_hparams(cls)}."


#: What :func:`stexp.tl.fit` trains when given no model: kNN retrieval over 200 neighbours with a softmax
#: temperature chosen on the training slides, spatial smoothing chosen likewise, and calibrated uncertainty.
#: The best pipeline measured by ``benchmarks/her2st.py`` (``docs/benchmarks.md``).
DEFAULT_RECIPE = Recipe("knn", {"k": 200, "temperature": "auto"}, smoothing="auto", calibrate=None, name="default")


def build_model(
    recipe: Recipe,
    genes: list[str],
    *,
    n_train: int,
    features_key: str | None = None,
    encoder_spec: EncoderSpec | Mapping[str, Any] | None = None,
    inner: bool = False,
) -> ExpressionModel:
    """A new, unfitted model of ``recipe`` for ``n_train`` training spots.

    Every hyper-parameter that counts training spots to retrieve (``bank_size_hparams``: kNN's ``k``,
    mclSTExp's ``top_k``) is clamped to ``n_train`` (logged; at debug level for an ``inner`` refit): a small
    training set, or an inner fold of one, retrieves every spot it has.

    Raises
    ------
    ValueError
        If ``n_train < 1``, or (unless ``inner``) ``n_train`` < :data:`MIN_TRAIN_SPOTS`; before any training.
    """
    if n_train < 1:
        raise ValueError(f"{recipe.model}: no training spots to fit on.")
    if not inner and n_train < MIN_TRAIN_SPOTS:
        raise ValueError(
            f"{recipe.label} needs at least {MIN_TRAIN_SPOTS} training spots, got {n_train}: a model of one spot "
            "predicts that spot's expression everywhere, whatever the image. Fit on more spots (a whole slide "
            "or more; several slides for the default pipeline's choices and calibration)."
        )
    cls = recipe.model_class
    hparams = dict(recipe.hparams)
    for key in cls.bank_size_hparams:
        value = hparams.get(key, cls.default_hparams.get(key))
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > n_train:
            log = logger.debug if inner else logger.info
            log(f"{recipe.model}: {key}={value} > {n_train} training spots; every training spot is retrieved")
            hparams[key] = int(n_train)
    return cls(genes, features_key=features_key, encoder_spec=encoder_spec, **hparams)


def fit_recipe(
    recipe: Recipe,
    train: SpotData,
    validation: SpotData | None = None,
    *,
    genes: list[str],
    features_key: str | None = None,
    encoder_spec: EncoderSpec | Mapping[str, Any] | None = None,
    device: str = "auto",
    num_workers: int = 0,
    devices: int | list[int] | None = None,
    seed: int = 0,
    inner: bool = False,
) -> ExpressionModel:
    """Fit ``recipe`` on ``train``: build the model, train it, choose its smoothing, calibrate it.

    Parameters
    ----------
    recipe
        What to fit.
    train, validation
        Training spots and, optionally, validation spots (early stopping; σ and temperatures are then
        chosen there). Their targets are aligned with ``genes``.
    genes
        The gene panel.
    features_key, encoder_spec
        Recorded with the model (prediction checks them against the query).
    device, num_workers, devices
        Runtime options (see :meth:`stexp.models.ExpressionModel.fit`); never saved.
    seed
        Seeds the calibration's subsampling.
    inner
        An inner refit of another fit (smoothing, calibration): logs less.

    Returns
    -------
    The fitted model; ``model.recipe`` is ``recipe``.
    """
    from ._feature_norm import normalise_spots

    train = normalise_spots(train, recipe.feature_norm)
    validation = None if validation is None else normalise_spots(validation, recipe.feature_norm)
    model = build_model(
        recipe, genes, n_train=train.n_spots, features_key=features_key, encoder_spec=encoder_spec, inner=inner
    )
    model.feature_norm = recipe.feature_norm
    model.fit(train, validation, device=device, num_workers=num_workers, devices=devices)
    return finish_recipe(recipe, model, train, validation, seed=seed, inner=inner)


def finish_recipe(
    recipe: Recipe,
    model: ExpressionModel,
    train: SpotData,
    validation: SpotData | None = None,
    *,
    seed: int = 0,
    inner: bool = False,
) -> ExpressionModel:
    """The steps after training, in order: the shift reference, the smoothing σ, then the calibration.

    For a model trained by :func:`fit_recipe`, or made from another fitted model without training (e.g.
    :meth:`stexp.models._mclstexp_plus.MclSTExpPlus.from_mclstexp`). ``train`` and ``validation`` are in the
    model's feature space (normalised per slide when the recipe says so). An ``inner`` refit gets no shift
    reference (nothing scores its predictions).
    """
    from ._shift import fit_shift_reference
    from ._smoothing import fit_smoothing

    model.recipe = recipe
    model.feature_norm = recipe.feature_norm
    if not inner and not model.reads_patches:
        model.shift = fit_shift_reference(train, seed=seed)
    model.smoothing = fit_smoothing(
        model, recipe.smoothing, train, validation, predict_held=inner_predictor(model, recipe, train, seed)
    )
    if not recipe.wants_calibration():
        return model
    from ._calibration import calibrate

    try:
        model.calibration = calibrate(
            model,
            train,
            n_folds=recipe.calibration_folds,
            score=recipe.calibration_score,
            seed=seed,
            predict_held=inner_predictor(model, recipe, train, seed, keep_sigma=True),
        )
    except ValueError as err:  # e.g. too few spots for the inner folds; asked for explicitly: raise
        if recipe.calibrate:
            raise ValueError(
                f"{recipe.model}: calibration on inner folds of the training slides failed: {err}"
            ) from err
        logger.warning(f"{model.name}: not calibrated ({err}); predict(coverage=) will refuse this model.")
    return model


def inner_predictor(
    model: ExpressionModel, recipe: Recipe, train: SpotData, seed: int, *, keep_sigma: bool = False
) -> Callable[[np.ndarray, np.ndarray], PredictionPair]:
    """``predict_held(fit_idx, held_idx)``: the rows ``held_idx`` of ``train`` predicted by ``recipe`` fitted on ``fit_idx``.

    What the inner folds of a fit (the smoothing σ, the calibration) predict with. The choices ``model``
    already made on all training slides (:meth:`~stexp.models.ExpressionModel.inner_fit_hparams`: kNN's
    temperature, ridge's penalty) stay fixed, so an inner fold measures the fitted predictor and costs one
    fit, not a nested choice. A model that can leave rows out of its own fitted state
    (:meth:`~stexp.models.ExpressionModel.left_out_predictor`: retrieval with them excluded from its bank)
    predicts without any refit or copy of the training spots; any other is refitted on ``train.subset(fit_idx)``
    with the model's runtime, never calibrated. The prediction is smoothed with the model's fitted σ when
    ``keep_sigma`` (the calibration measures the smoothed predictor), else not.
    """
    fixed = model.inner_fit_hparams()
    sigma = float(model.smoothing.get("sigma_um") or 0.0) if keep_sigma else 0.0
    left_out = model.left_out_predictor(train)
    if left_out is not None:

        def predict_left_out(fit_idx: np.ndarray, held_idx: np.ndarray) -> PredictionPair:
            mean, spread = left_out(fit_idx, held_idx)
            if sigma > 0:
                from ._smoothing import smooth

                held = np.asarray(held_idx, dtype=np.int64)
                mean = smooth(np.asarray(mean, dtype=np.float32), train.coords_um[held], train.library[held], sigma)
            return mean, spread

        return predict_left_out
    # the data are already in the model's feature space: the inner copy normalises nothing again
    inner = recipe.replace(
        hparams={**recipe.hparams, **fixed}, smoothing=sigma or None, calibrate=False, feature_norm=None
    )

    def predict_refitted(fit_idx: np.ndarray, held_idx: np.ndarray) -> PredictionPair:
        refitted = fit_recipe(
            inner,
            train.subset(fit_idx),
            genes=model.genes,
            features_key=model.features_key,
            encoder_spec=model.encoder_spec,
            device=model.device,
            num_workers=model.num_workers,
            devices=None,  # inner refits run in this process
            seed=seed,
            inner=True,
        )
        return refitted.predict(train.subset(held_idx))

    return predict_refitted
