"""Base class of every expression model, with saving and loading as a directory."""

from __future__ import annotations

import copy
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stexp._settings import logger

from ._data import SpotData
from ._format import FORMAT_VERSION
from ._hparams import check_hparams as check_hparams  # re-exported: one checker, used by every model
from ._hparams import describe_hparams, hparam_specs

if TYPE_CHECKING:  # pragma: no cover
    from stexp.images._spec import EncoderSpec


#: What a model predicts for some spots: the mean and, when the model gives one, a spread (float32 arrays).
PredictionPair = tuple[np.ndarray, np.ndarray | None]
#: Runtime options: arguments of fit/predict/load, never saved with a model (older folders that saved them are read).
RUNTIME_OPTIONS = ("device", "num_workers", "devices")


class _DefaultHparams:
    """``Model.default_hparams``: every hyper-parameter with its default, read from the ``__init__`` signatures."""

    def __get__(self, obj: Any, owner: type) -> dict[str, Any]:
        return {name: spec.default_value for name, spec in hparam_specs(owner).items()}


class ExpressionModel(ABC):
    """A model that predicts expression of a gene panel from image features.

    Subclasses declare their hyper-parameters as typed keyword-only arguments of ``__init__`` with
    defaults, pass them on to ``super().__init__`` (with ``**kwargs``: ``features_key``, ``encoder_spec``
    and the parents' hyper-parameters) and check their ranges with
    :func:`stexp.models._hparams.check_hparams`::

        def __init__(self, genes, *, k: int = 50, **kwargs):
            super().__init__(genes, k=k, **kwargs)  # typed here: 200.0 -> 200, "a" -> TypeError
            check_hparams(self, positive_int=("k",))

    :attr:`default_hparams` is derived from those signatures. Subclasses implement
    :meth:`_fit`, :meth:`_predict`, :meth:`_state` and :meth:`_load_state`, set :attr:`n_features` when
    fitted or loaded, and register themselves with :func:`stexp.models.register_model`. Neural models
    derive from :class:`stexp.models.TorchExpressionModel`, which implements all but the network. Users
    create models through :func:`stexp.tl.fit` and load them with :func:`stexp.models.load`.

    Attributes
    ----------
    genes
        The gene panel, in the order of the model's outputs.
    features_key
        The ``obsm`` key of the image features the model was trained on.
    encoder_spec
        How those features were made (an :class:`stexp.images.EncoderSpec`, as recorded by
        :func:`stexp.pp.embed_images`); prediction checks it against the query data.
    hparams
        Every hyper-parameter, JSON-serialisable.
    history
        Training history (e.g. per-epoch losses), JSON-serialisable.
    n_features
        Width of the image features the model reads (``None`` before fitting).
    device
        Where the model trains and predicts (``"auto"``: CUDA when available): a runtime choice, set by
        ``fit``/``predict``/``load``, never saved.
    """

    name: ClassVar[str] = "base"
    #: Every hyper-parameter with its default (a fresh dict), derived from the keyword-only arguments of the
    #: ``__init__`` of the class and its bases (:func:`stexp.models._hparams.hparam_specs`).
    default_hparams = _DefaultHparams()
    #: Hyper-parameters that count training spots to retrieve (kNN's ``k``): a fit on fewer spots uses fewer
    #: (:func:`stexp.models._recipe.build_model`).
    bank_size_hparams: ClassVar[tuple[str, ...]] = ()
    #: Whether a recipe with ``calibrate=None`` calibrates this model (its inner refits take seconds).
    calibrate_by_default: ClassVar[bool] = False
    #: A registered model that this one trains exactly as; then :meth:`from_trained` makes this model from a
    #: fitted one of that model without training again (``stexp.tl.cross_validate`` shares their fits).
    trains_as: ClassVar[str | None] = None

    def __init__(
        self,
        genes: list[str],
        *,
        features_key: str | None = None,
        encoder_spec: EncoderSpec | Mapping[str, Any] | None = None,
        **hparams: Any,
    ) -> None:
        from stexp.images._spec import EncoderSpec

        specs = hparam_specs(type(self))
        unknown = sorted(set(hparams) - set(specs))
        if unknown:
            runtime = [k for k in unknown if k in RUNTIME_OPTIONS]
            hint = f" {runtime} are runtime options: pass them to fit/predict/load." if runtime else ""
            raise TypeError(
                f"{type(self).__name__} got unknown hyper-parameter(s) {unknown}; "
                f"it takes {describe_hparams(type(self))}.{hint}"
            )
        missing = [k for k in specs if k not in hparams]
        if missing:  # a subclass's __init__ that declares a hyper-parameter but does not pass it on
            raise TypeError(
                f"{type(self).__name__}: hyper-parameter(s) {missing} of its __init__ signature did not reach "
                "ExpressionModel.__init__; pass each one on to super().__init__."
            )
        self.genes = list(genes)
        self.features_key = features_key
        self.encoder_spec = EncoderSpec.from_mapping(encoder_spec)
        #: Every hyper-parameter, typed as declared (an ``int`` given ``200.0`` holds ``200``).
        self.hparams: dict[str, Any] = {k: spec.check(self.name, hparams[k]) for k, spec in specs.items()}
        self.history: dict[str, Any] = {}
        self.is_fitted = False
        self.n_features: int | None = None
        self.device = "auto"
        self.num_workers = 0
        self.devices: int | list[int] | None = None
        #: Conformal intervals and expected per-gene PCC (:func:`stexp.tl.fit` with ``calibrate=True``), or None.
        self.calibration: Any = None  # a stexp.models._calibration.Calibration once calibrated
        #: Spatial smoothing of predictions (``stexp.models._smoothing``): the option and, once fitted, its σ.
        self.smoothing: dict[str, Any] = {"option": None, "sigma_um": 0.0}
        #: What the model was fitted as (:func:`stexp.models._recipe.fit_recipe` sets it); ``None`` before.
        self.recipe: Any = None  # a stexp.models._recipe.Recipe
        #: Per-slide feature normalisation applied to every query (``stexp.models._feature_norm``), or ``None``.
        self.feature_norm: str | None = None
        #: How far query spots lie from the training data (``stexp.models._shift.ShiftReference``), once fitted.
        self.shift: Any = None
        from ._card import ModelCard

        #: The model card (:class:`stexp.models.ModelCard`): :func:`stexp.tl.fit` fills it, the trainer adds text.
        self.card = ModelCard()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Accept a subclass that declares ``default_hparams`` as a dict (the older way; untyped, unchecked).

        The dict's values become the defaults its ``__init__`` passes on, and ``default_hparams`` is derived
        again (the dict's keys, typed where a base declares them).
        """
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("default_hparams")
        if declared is None:
            return
        if not isinstance(declared, Mapping):
            raise TypeError(
                f"{cls.__name__}.default_hparams must be a dict of defaults; better, declare the hyper-parameters "
                "as keyword-only arguments of __init__."
            )
        delattr(cls, "default_hparams")
        type.__setattr__(cls, "_declared_hparams_", dict(declared))
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: ExpressionModel, genes: list[str], **kwargs: Any) -> None:
            init(self, genes, **{**copy.deepcopy(dict(declared)), **kwargs})

        setattr(__init__, "_stexp_legacy_hparams_", True)  # noqa: B010 - hparam_specs reads the dict instead
        type.__setattr__(cls, "__init__", __init__)

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        """Train on ``train`` (targets aligned with :attr:`genes`)."""

    @abstractmethod
    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        """Predicted expression ``(n_spots, n_genes)`` and a per-spot-and-gene spread (or ``None``)."""

    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]:
        """Every learnt array (weights, reference bank) by name, for saving."""

    @abstractmethod
    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`_state` returned."""

    # -- public API ---------------------------------------------------------------------------
    @property
    def reads_patches(self) -> bool:
        """Whether the model embeds image patches itself (a fine-tuned encoder) instead of reading ``obsm`` features."""
        return bool(self.hparams.get("finetune_encoder", False))

    def check_features(self, data: SpotData, what: str = "data") -> None:
        """Raise a ValueError when the image features of ``data`` are not as wide as the model's."""
        if self.reads_patches or self.n_features is None:
            return
        if data.features.ndim != 2 or data.features.shape[1] != self.n_features:
            raise ValueError(
                f"{self.name}: the model was trained on {self.n_features}-dimensional image features, "
                f"the {what} have shape {data.features.shape}; use the features the model was trained on."
            )

    def fit(
        self,
        train: SpotData,
        validation: SpotData | None = None,
        *,
        device: str = "auto",
        num_workers: int = 0,
        devices: int | list[int] | None = None,
    ) -> ExpressionModel:
        """Train the model; returns ``self``.

        Parameters
        ----------
        train, validation
            Training spots and, optionally, validation spots (early stopping, monitoring).
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...; the model also predicts there.
        num_workers
            DataLoader worker processes that cut and augment patches when the encoder is fine-tuned.
        devices
            Neural models: train with DDP on this many devices (GPUs with ``device="cuda"``, processes with
            ``device="cpu"``) or these GPU indices; ``None``: one device (or the torchrun / SLURM layout).
            Other models ignore it.
        """
        for what, data in (("training", train), ("validation", validation)):
            if data is None:
                continue
            if data.target is None:
                raise ValueError(f"{what} data have no measured expression (target is None).")
            if data.target.shape[1] != len(self.genes):
                raise ValueError(
                    f"{what} target has {data.target.shape[1]} genes, the model's panel {len(self.genes)}."
                )
        if int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        self.device, self.num_workers, self.devices = device, int(num_workers), devices
        self._fit(train, validation)
        self.is_fitted = True
        return self

    @classmethod
    def from_trained(
        cls, base: ExpressionModel, train: SpotData, validation: SpotData | None = None, **hparams: Any
    ) -> ExpressionModel:
        """A model of this class made from a fitted model of :attr:`trains_as` (``base``, trained on ``train``)."""
        raise NotImplementedError(f"{cls.__name__} does not train as another model (trains_as is None).")

    def inner_fit_hparams(self) -> dict[str, Any]:
        """Choices made on all training slides that inner refits keep fixed (e.g. ridge's penalty); default none."""
        return {}

    def left_out_predictor(self, train: SpotData) -> Callable[[np.ndarray, np.ndarray], PredictionPair] | None:
        """``predict_held(fit_idx, held_idx)`` without an inner refit, or ``None`` (the default: refit).

        For a model that can predict the rows ``held_idx`` of ``train`` (the spots it was fitted on) as a copy
        of it fitted on the rows ``fit_idx`` alone would, with :meth:`inner_fit_hparams` fixed, from its own
        fitted state (e.g. retrieval with the other rows excluded from its bank). The inner folds that
        choose σ and calibrate the model then cost one prediction each instead of one fit
        (:func:`stexp.models._recipe.inner_predictor`). Unsmoothed.
        """
        return None

    def predict(
        self, data: SpotData, *, device: str | None = None, smooth: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Predicted expression and spread for the spots of ``data`` (on ``device``; default: the model's).

        With ``smooth`` (default), the mean is averaged over neighbouring spots of the same slide with
        the fitted smoothing σ (``self.smoothing["sigma_um"]``; 0: unchanged). A model fitted with a
        per-slide ``feature_norm`` normalises each slide of ``data`` first.
        """
        return self._predict_query(self.query(data), device=device, smooth=smooth)

    def query(self, data: SpotData) -> SpotData:
        """``data`` in the model's feature space (checked; normalised per slide when the model's recipe says so)."""
        if not self.is_fitted:
            raise RuntimeError(f"this {self.name} model is not fitted yet; call stexp.tl.fit first.")
        self.check_features(data)
        from ._feature_norm import normalise_spots

        return normalise_spots(data, self.feature_norm)

    def _predict_query(
        self, data: SpotData, *, device: str | None = None, smooth: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if device is not None:
            self.device = device
        mean, spread = self._predict(data)
        sigma = float(self.smoothing.get("sigma_um") or 0.0)
        if smooth and sigma > 0:
            from ._smoothing import smooth as smooth_values

            mean = smooth_values(np.asarray(mean, dtype=np.float32), data.coords_um, data.library, sigma)
        return np.asarray(mean, dtype=np.float32), None if spread is None else np.asarray(spread, dtype=np.float32)

    def shift_scores(self, data: SpotData) -> np.ndarray | None:
        """Each spot's shift score (``stexp.models._shift``), or ``None`` for a model without a shift reference."""
        if self.shift is None or self.reads_patches:
            return None
        return self.shift.spot_scores(self.query(data).features)

    def check_intervals(self, coverage: float) -> None:
        """Raise a ValueError unless ``coverage`` is in (0, 1) and the model's calibration can give it.

        The model must be calibrated, on enough spots for ``coverage``
        (:meth:`stexp.models._calibration.Calibration.check_coverage`).
        """
        from ._calibration import check_coverage

        check_coverage(coverage)
        if self.calibration is None:
            raise ValueError(
                f"this {self.name} model has no calibration, so it cannot give intervals with a stated coverage; "
                f"refit it with stexp.tl.fit(..., model={self.name!r}, calibrate=True) (it refits the model on "
                "inner folds of the training slides), or predict without coverage=."
            )
        self.calibration.check_coverage(coverage)

    def predict_intervals(
        self, data: SpotData, coverage: float, *, device: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Prediction, spread and split-conformal bounds covering a new spot's value with probability ``coverage``.

        Raises
        ------
        ValueError
            See :meth:`check_intervals`.
        """
        self.check_intervals(coverage)
        data = self.query(data)
        mean, spread = self._predict_query(data, device=device)
        lo, hi = self.calibration.intervals(mean, data.features, spread, float(coverage))
        return mean, spread, lo, hi

    def save(self, path: str | Path, *, overwrite: bool = False, storage_dtype: str = "float32") -> Path:
        """Save as a directory: ``model.json`` (hyper-parameters, genes, encoder, card) and ``weights.safetensors``.

        Nothing is pickled: weights and the reference bank are stored as plain tensors.

        Parameters
        ----------
        path
            The model folder.
        overwrite
            Replace an existing non-empty folder (kept until the new one is complete).
        storage_dtype
            ``"float32"`` or ``"float16"``: store the large float arrays (reference banks, weights, calibration
            residuals: :data:`HALF_MIN_SIZE` values or more) in half precision, half
            the folder's size. :func:`stexp.models.load` reads them back as float32, so computation stays
            float32; the values are rounded to about 3 significant digits.
        """
        from ._format import write_model_dir

        path = Path(path)
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it.")
        if not self.is_fitted:
            raise RuntimeError("cannot save a model that is not fitted.")
        from stexp._versions import versions

        config = {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "genes": self.genes,
            "features_key": self.features_key,
            "n_features": self.n_features,
            "encoder_spec": self.encoder_spec.to_dict(),
            "hparams": self.hparams,
            "history": self.history,
            "smoothing": self.smoothing,
            "recipe": None if self.recipe is None else self.recipe.to_dict(),
            "feature_norm": self.feature_norm,
            "target": "log1p of counts per 10,000 (natural log), from raw counts over all genes",
            "versions": versions(),
        }
        config["card"] = self.card.to_dict()
        state = {k: np.ascontiguousarray(v) for k, v in self._state().items()}
        if getattr(self, "calibration", None) is not None:  # saved beside the weights, under "calibration."
            config["calibration"] = self.calibration.config()
            state.update(self.calibration.state())
        if getattr(self, "shift", None) is not None:  # saved beside the weights, under "shift."
            config["shift"] = self.shift.config()
            state.update(self.shift.state())
        if storage_dtype != "float32":
            state, config["storage"] = _to_half(state, storage_dtype)
        # model.json (with the weights' checksum) + weights.safetensors, renamed into place when complete
        write_model_dir(path, config, state, overwrite=overwrite)
        logger.info(f"saved {self.name} model to {path}")
        return path

    def __repr__(self) -> str:
        status = "fitted" if self.is_fitted else "not fitted"
        enc = self.encoder_spec.encoder or "?"
        return f"{type(self).__name__}({len(self.genes)} genes, features={self.features_key!r} [{enc}], {status})"


#: Float arrays of at least this many values are stored in half precision by ``save(storage_dtype="float16")``.
HALF_MIN_SIZE = 4096


def _to_half(state: dict[str, np.ndarray], storage_dtype: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``state`` with its large float arrays in float16, and the record of what was converted.

    Small arrays (scalers, temperatures, penalties) keep their precision; so do arrays of whole numbers
    (indices, group labels: float16 holds integers exactly only up to 2,048) and arrays with a value beyond
    the float16 range (65,504), which would turn into infinities.
    """
    if storage_dtype != "float16":
        raise ValueError(f"storage_dtype must be 'float32' or 'float16', got {storage_dtype!r}.")
    limit = float(np.finfo(np.float16).max)
    out, halved = {}, []
    for k, v in state.items():
        finite = v[np.isfinite(v)] if v.dtype.kind == "f" else v
        if (
            v.dtype.kind == "f"
            and v.size >= HALF_MIN_SIZE
            and np.all(np.abs(finite) <= limit)
            and not np.array_equal(finite, np.round(finite))
        ):
            out[k] = v.astype(np.float16)
            halved.append(k)
        else:
            out[k] = v
    return out, {"dtype": "float16", "arrays": halved, "min_size": HALF_MIN_SIZE}


def load(
    path: str | Path,
    *,
    genes: list[str] | None = None,
    encoder_spec: EncoderSpec | dict[str, Any] | None = None,
    device: str = "auto",
) -> ExpressionModel:
    """Load a model saved with :meth:`ExpressionModel.save`.

    Parameters
    ----------
    path
        The model directory.
    genes
        When given, the gene panel the caller expects; a different panel raises.
    encoder_spec
        When given, the feature spec the caller expects (e.g. ``adata.uns["stexp"]["features"][key]``);
        a different encoder, weights or patch size raises.
    device
        Where the model will predict (``"auto"``: CUDA when available); nothing of the machine that
        saved the model is restored.

    Raises
    ------
    FileNotFoundError
        If the directory or one of its files is missing (named).
    ValueError
        If ``device`` is not a device of this machine (:func:`stexp._devices.check_device`); if the folder
        was written by a newer stexp (upgrade stexp); if the genes or the encoder differ from what the
        caller expects (the message says what differs); or if ``model.json`` or the weights are damaged
        or were edited (each file is checked against its SHA-256; the message names the file).
    """
    from stexp._devices import check_device

    from ._format import read_model_dir
    from ._registry import get_model_class

    device = check_device(device)  # refused here, not at the first predict
    path = Path(path)
    # format version first (a newer stexp's folder says so), then every file against its checksum, named on damage
    config, state = read_model_dir(path)
    state = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in state.items()}  # computed in float32
    if genes is not None:
        check_genes(config["genes"], list(genes), what=f"model at {path}")
    if encoder_spec is not None:
        from stexp.images._spec import check_encoder_spec

        check_encoder_spec(config["encoder_spec"], encoder_spec, what=f"model at {path}")
    missing = [k for k in ("model", "genes", "hparams") if k not in config]
    if missing:
        raise ValueError(f"{path / 'model.json'} lacks {missing}: not a complete stexp model description.")
    cls = get_model_class(config["model"])
    hparams = {k: v for k, v in config["hparams"].items() if k not in RUNTIME_OPTIONS}
    try:
        model = cls(
            config["genes"], features_key=config.get("features_key"), encoder_spec=config.get("encoder_spec"), **hparams
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / 'model.json'} describes a model this stexp cannot build: {err}") from err
    model.device = device
    from ._card import ModelCard

    model.card = ModelCard.from_dict(config.get("card"))  # folders saved before cards existed: an empty card
    model.n_features = config.get("n_features")
    model.history = config.get("history", {})
    from ._calibration import Calibration, split_state
    from ._shift import ShiftReference
    from ._shift import split_state as split_shift_state

    state, calibration_state = split_state(state)  # folders saved before calibration existed have none
    state, shift_state = split_shift_state(state)  # folders saved before the shift score existed have none
    model.feature_norm = config.get("feature_norm")
    # folders saved before smoothing existed have none: no smoothing
    model.smoothing = dict(config.get("smoothing") or {"option": None, "sigma_um": 0.0})
    if config.get("recipe"):  # folders saved before recipes existed have none
        from ._recipe import Recipe

        model.recipe = Recipe.from_dict(config["recipe"])
    model._load_state(state)
    if config.get("calibration") is not None:
        model.calibration = Calibration.from_saved(config["calibration"], calibration_state)
    if config.get("shift") is not None:
        model.shift = ShiftReference.from_saved(config["shift"], shift_state)
    model.is_fitted = True
    return model


def check_genes(model_genes: list[str], other_genes: list[str], *, what: str = "model") -> None:
    """Raise a ValueError that says how two gene panels differ, if they do."""
    if list(model_genes) == list(other_genes):
        return
    a, b = set(model_genes), set(other_genes)
    only_model, only_other = sorted(a - b), sorted(b - a)
    if not only_model and not only_other:
        raise ValueError(f"{what}: same {len(a)} genes but in a different order.")
    raise ValueError(
        f"{what} was trained on {len(model_genes)} genes, the data/panel given has {len(other_genes)}: "
        f"{len(only_model)} only in the model (e.g. {only_model[:5]}), "
        f"{len(only_other)} only in the data (e.g. {only_other[:5]})."
    )
