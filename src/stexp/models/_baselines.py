"""Simple baselines that every benchmark runs beside the models: training mean, ridge probe, kNN retrieval.

All three work on the same frozen image features as the models and are registered as ``"mean"``,
``"ridge"`` and ``"knn"``. They save and load through :class:`~stexp.models.ExpressionModel` as
plain arrays.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from stexp._settings import logger
from stexp.models._base import ExpressionModel
from stexp.models._data import SpotData
from stexp.models._registry import register_model


def _state_array(state: dict[str, np.ndarray], key: str, model: str) -> np.ndarray:
    if key not in state:
        raise ValueError(f"{model}: the saved weights lack {key!r} (they have {sorted(state)}); not a {model} state.")
    return np.asarray(state[key])


def _check_panel(model: ExpressionModel, n_genes: int, key: str) -> None:
    if n_genes != len(model.genes):
        raise ValueError(
            f"{model.name}: the saved {key!r} has {n_genes} genes, the model's panel (model.json) {len(model.genes)}; "
            "the model folder is inconsistent."
        )


@register_model("mean")
class MeanModel(ExpressionModel):
    """Predict the training mean of each gene at every spot, whatever the image.

    The floor every image model must beat on MSE. Its prediction is constant on a slide, so its
    per-gene Pearson is undefined (:func:`stexp.tl.evaluate` counts the genes as constant). The
    spread is the training standard deviation of each gene.

    Hyper-parameters: none.
    """

    default_hparams: ClassVar[dict[str, Any]] = {}

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        target = np.asarray(train.target, dtype=np.float64)
        self.mean_ = target.mean(axis=0).astype(np.float32)
        self.std_ = target.std(axis=0).astype(np.float32)
        self.n_features = int(train.features.shape[1])

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        n = data.n_spots
        return np.tile(self.mean_, (n, 1)), np.tile(self.std_, (n, 1))

    def _state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "std": self.std_}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean_ = _state_array(state, "mean", self.name).astype(np.float32)
        self.std_ = _state_array(state, "std", self.name).astype(np.float32)
        _check_panel(self, self.mean_.shape[0], "mean")


def feature_scaling(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``X`` (1 where a feature is constant), for standardising."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def ridge_path(Z: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One SVD of the centred design for every penalty: ``(V, s, UᵀY_c, Z mean, Y mean)``.

    The ridge coefficients for penalty ``a`` are ``V diag(s / (s² + a)) UᵀY_c`` (what
    :class:`sklearn.linear_model.Ridge` with an intercept solves), so a grid of penalties costs one
    decomposition instead of one solve each.
    """
    z_mean, y_mean = Z.mean(axis=0), Y.mean(axis=0)
    U, s, Vt = np.linalg.svd(Z - z_mean, full_matrices=False)
    return Vt.T, s, U.T @ (Y - y_mean), z_mean, y_mean


def ridge_coef(path: tuple, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``(n_features, n_targets)`` and intercept of penalty ``alpha`` on a :func:`ridge_path`."""
    V, s, uty, z_mean, y_mean = path
    coef = V @ ((s / (s**2 + alpha))[:, None] * uty)
    return coef, y_mean - z_mean @ coef


@register_model("ridge")
class RidgeModel(ExpressionModel):
    """Linear probe on frozen features (the HEST-benchmark recipe): standardise, PCA, ridge.

    Features are standardised with the training mean and standard deviation, projected on the
    first ``n_components`` principal components of the training spots (fewer when there are fewer
    spots or features; ``n_components=None``: no projection, ridge on every standardised feature), and
    regressed on the target by ridge regression (one SVD per fit serves every penalty of the grid).
    The penalty is chosen among ``alphas`` by an inner cross-validation on the training spots
    only, grouped by slide (:class:`~sklearn.model_selection.GroupKFold` over the training slides,
    so the chosen penalty is the one that transfers across slides); with a single training slide
    it falls back to a shuffled :class:`~sklearn.model_selection.KFold` over spots, which favours
    weaker penalties because neighbouring spots are alike. Scaling and PCA are refit inside each
    inner fold. The chosen alpha and the inner scores are in :attr:`history`.

    Hyper-parameters (``default_hparams``)
        ``n_components=256`` (or ``None``), ``alphas`` (the grid, 1e-1 ... 1e5), ``cv_folds=5`` (at most
        the number of training slides when grouping), ``standardize=True``, ``seed=0`` (inner KFold
        shuffling and randomised PCA).
    """

    default_hparams: ClassVar[dict[str, Any]] = {
        "n_components": 256,
        "alphas": [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0],
        "cv_folds": 5,
        "standardize": True,
        "seed": 0,
    }

    def __init__(self, genes: list[str], **kwargs: Any) -> None:
        super().__init__(genes, **kwargs)
        hp = self.hparams
        n_comp = hp["n_components"]
        if n_comp is not None and (int(n_comp) != n_comp or n_comp < 1):
            raise ValueError(f"ridge: n_components must be a positive integer or None, got {n_comp!r}.")
        alphas = np.asarray(hp["alphas"], dtype=np.float64).ravel()
        if alphas.size == 0 or not (alphas > 0).all():
            raise ValueError(f"ridge: alphas must be a non-empty list of positive numbers, got {hp['alphas']!r}.")
        if int(hp["cv_folds"]) != hp["cv_folds"] or hp["cv_folds"] < 2:
            raise ValueError(f"ridge: cv_folds must be an integer >= 2, got {hp['cv_folds']!r}.")

    # -- the transform, on plain arrays (so a loaded model needs no sklearn object) ------------
    def _fit_transform(self, X: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Scaler (and PCA) fitted on ``X``; returns their arrays and the transformed ``X``."""
        mean, scale = feature_scaling(X)
        if not self.hparams["standardize"]:
            scale = np.ones(X.shape[1])
        Z = (X - mean) / scale
        arrays = {"scaler_mean": mean, "scaler_scale": scale}
        if self.hparams["n_components"] is None:
            return arrays, Z
        from sklearn.decomposition import PCA

        n_comp = int(min(self.hparams["n_components"], X.shape[0] - 1, X.shape[1]))
        n_comp = max(n_comp, 1)
        pca = PCA(n_components=n_comp, random_state=int(self.hparams["seed"])).fit(Z)
        arrays |= {"pca_mean": pca.mean_, "pca_components": pca.components_}
        return arrays, pca.transform(Z)

    @staticmethod
    def _transform(arrays: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        Z = (X - arrays["scaler_mean"]) / arrays["scaler_scale"]
        if "pca_components" not in arrays:
            return Z
        return (Z - arrays["pca_mean"]) @ arrays["pca_components"].T

    def _inner_splits(self, train: SpotData) -> tuple[list, str]:
        from sklearn.model_selection import GroupKFold, KFold

        groups = np.asarray(train.library).astype(str)
        n_groups = len(set(groups))
        folds = int(self.hparams["cv_folds"])
        if n_groups >= 2:
            cv = GroupKFold(n_splits=min(folds, n_groups))
            return list(cv.split(train.features, groups=groups)), f"GroupKFold({min(folds, n_groups)}) over slides"
        cv = KFold(n_splits=min(folds, train.n_spots), shuffle=True, random_state=int(self.hparams["seed"]))
        return list(cv.split(train.features)), f"KFold({min(folds, train.n_spots)}) over spots of one slide"

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        X = np.asarray(train.features, dtype=np.float64)
        Y = np.asarray(train.target, dtype=np.float64)
        if train.n_spots < 4:
            raise ValueError(
                f"ridge: needs at least 4 training spots for its inner cross-validation, got {train.n_spots}."
            )
        alphas = [float(a) for a in np.asarray(self.hparams["alphas"], dtype=np.float64).ravel()]
        # one penalty: nothing to choose, no inner cross-validation
        splits, how = self._inner_splits(train) if len(alphas) > 1 else ([], "none (one alpha given)")
        scores = np.zeros(len(alphas))
        for inner_train, inner_val in splits:
            arrays, Z = self._fit_transform(X[inner_train])
            Zv = self._transform(arrays, X[inner_val])
            path = ridge_path(Z, Y[inner_train])
            for a, alpha in enumerate(alphas):
                coef, intercept = ridge_coef(path, alpha)
                scores[a] += np.mean((Zv @ coef + intercept - Y[inner_val]) ** 2) * len(inner_val)
        scores /= train.n_spots
        best = int(np.argmin(scores)) if splits else 0
        arrays, Z = self._fit_transform(X)
        coef, intercept = ridge_coef(ridge_path(Z, Y), alphas[best])
        self.arrays_ = {
            **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()},
            "coef": coef.T.astype(np.float32),
            "intercept": np.asarray(intercept, dtype=np.float32).reshape(-1),
            "alpha": np.asarray([alphas[best]], dtype=np.float32),
        }
        self.n_features = X.shape[1]
        self.history = {"alpha": alphas[best], "alphas": alphas, "inner_cv": how}
        if splits:
            self.history["inner_cv_mse"] = scores.tolist()
        if best in (0, len(alphas) - 1) and len(alphas) > 1:
            logger.warning(
                f"ridge: the chosen alpha {alphas[best]:g} is at the edge of the grid {alphas}; widen alphas=."
            )
        logger.debug(f"ridge: alpha {alphas[best]:g} by {how}, {Z.shape[1]} inputs")

    def smoothing_inner_hparams(self) -> dict[str, Any]:
        """Hyper-parameters of the inner fits that choose the smoothing: the penalty already chosen (no nested CV)."""
        return {"alphas": [float(self.history["alpha"])]}

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        X = np.asarray(data.features, dtype=np.float64)
        arrays = {k: v.astype(np.float64) for k, v in self.arrays_.items()}
        Z = self._transform(arrays, X)
        return Z @ arrays["coef"].T + arrays["intercept"], None

    def _state(self) -> dict[str, np.ndarray]:
        return dict(self.arrays_)

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        keys = ["scaler_mean", "scaler_scale", "coef", "intercept", "alpha"]
        if "pca_components" in state or self.hparams["n_components"] is not None:
            keys += ["pca_mean", "pca_components"]
        self.arrays_ = {k: _state_array(state, k, self.name).astype(np.float32) for k in keys}
        self.n_features = int(self.arrays_["scaler_mean"].shape[0])
        _check_panel(self, self.arrays_["coef"].shape[0], "coef")
        self.history.setdefault("alpha", float(self.arrays_["alpha"][0]))


#: Softmax temperatures that ``temperature="auto"`` chooses from (``None``: equal weights).
TEMPERATURE_GRID: tuple[float | None, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, None)


def _neighbour_weights(sim: np.ndarray, temperature: float | None) -> np.ndarray:
    """Row-normalised weights of the retrieved neighbours: ``softmax(sim / temperature)`` or equal."""
    if temperature is None:
        w = np.ones_like(sim)
    else:
        w = np.exp((sim - sim.max(axis=1, keepdims=True)) / float(temperature))
    return w / w.sum(axis=1, keepdims=True)


def _top_k(query: np.ndarray, bank: np.ndarray, k: int, chunk: int):
    """Yield ``(rows, top, sim)``: for each block of query rows, the ``k`` most similar bank rows and their similarity."""
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        yield slice(start, start + chunk), top, np.take_along_axis(sim, top, axis=1).astype(np.float64)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (float32; an all-zero row stays zero)."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def check_temperature(model: str, name: str, value: Any) -> None:
    """Raise a ValueError unless a retrieval temperature is a positive number, ``None`` or ``"auto"``."""
    if not (value is None or value == "auto" or (not isinstance(value, (str, bool)) and float(value) > 0)):
        raise ValueError(f"{model}: {name} must be positive, None or 'auto', got {value!r}.")


def temperature_state(temperature: float | None) -> np.ndarray:
    """The temperature in use as a saved array (``nan``: equal weights)."""
    return np.asarray([np.nan if temperature is None else float(temperature)], dtype=np.float64)


def temperature_from_state(array: np.ndarray) -> float | None:
    """Inverse of :func:`temperature_state`."""
    t = float(np.asarray(array).ravel()[0])
    return None if np.isnan(t) else t


def weighted_retrieval(
    query_unit: np.ndarray,
    bank_unit: np.ndarray,
    bank_target: np.ndarray,
    *,
    k: int,
    temperature: float | None,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-``k`` retrieval with softmax weights: the weighted mean and standard deviation of the neighbours."""
    mean = np.empty((query_unit.shape[0], bank_target.shape[1]), dtype=np.float32)
    spread = np.empty_like(mean)
    for rows, top, sim in _top_k(query_unit, bank_unit, k, chunk):
        w = _neighbour_weights(sim, temperature)
        neighbours = bank_target[top]  # (chunk, k, genes)
        m = np.einsum("qk,qkg->qg", w, neighbours)
        var = np.einsum("qk,qkg->qg", w, (neighbours - m[:, None, :]) ** 2)
        mean[rows] = m
        spread[rows] = np.sqrt(np.maximum(var, 0.0))
    return mean, spread


def retrieval_by_temperature(
    bank_unit: np.ndarray, bank_target: np.ndarray, query_unit: np.ndarray, *, k: int, chunk: int = 256
) -> dict[float | None, np.ndarray]:
    """Retrieval predictions of ``query_unit`` from a bank (cosine top-``k``), one per temperature of the grid."""
    k = min(int(k), bank_unit.shape[0])
    preds = {t: np.empty((query_unit.shape[0], bank_target.shape[1]), dtype=np.float32) for t in TEMPERATURE_GRID}
    for rows, top, sim in _top_k(query_unit, bank_unit, k, chunk):
        neighbours = bank_target[top]
        for t in TEMPERATURE_GRID:
            preds[t][rows] = np.einsum("qk,qkg->qg", _neighbour_weights(sim, t), neighbours)
    return preds


def choose_temperature(
    train_unit: np.ndarray,
    train: SpotData,
    *,
    k: int,
    validation_unit: np.ndarray | None = None,
    validation: SpotData | None = None,
    default: float | None = 0.1,
) -> tuple[float | None, dict[str, Any]]:
    """The retrieval temperature of :data:`TEMPERATURE_GRID` that predicts held-out spots best.

    On the validation spots (retrieving from every training spot) when given with a target, else by
    inner validation over the training spots: each slide (the two spatial halves of a single slide)
    retrieves from the other training spots. Score: mean per-gene Pearson correlation per slide.

    Parameters
    ----------
    train_unit, validation_unit
        Unit-norm embeddings of the training (bank) and validation spots.
    train, validation
        Their :class:`~stexp.models.SpotData` (target, slides, coordinates).
    k
        Neighbours retrieved (at most the bank size).
    default
        The temperature returned when nothing can be scored (too few spots).

    Returns
    -------
    The temperature and ``{"temperature", "temperature_grid", "inner_pcc", "inner_cv"}`` for the history.
    """
    from ._smoothing import inner_groups, mean_gene_pearson

    target = np.asarray(train.target, dtype=np.float32)
    if validation_unit is not None and validation is not None and validation.target is not None:
        how = "the validation slides"
        preds = retrieval_by_temperature(train_unit, target, validation_unit, k=k)
        truth, lib = np.asarray(validation.target, dtype=np.float32), np.asarray(validation.library).astype(str)
    else:
        groups, how = inner_groups(train.coords_um, train.library)
        preds = {t: np.full(target.shape, np.nan, dtype=np.float32) for t in TEMPERATURE_GRID}
        for group in np.unique(groups) if len(np.unique(groups)) >= 2 else []:
            va = groups == group
            for t, pred in retrieval_by_temperature(train_unit[~va], target[~va], train_unit[va], k=k).items():
                preds[t][va] = pred
        # each inner validation group scored as a slide of its own (a half of one slide counts as a slide)
        truth, lib = target, np.char.add(np.asarray(train.library).astype(str), np.asarray(groups).astype(str))
    scores = [mean_gene_pearson(preds[t], truth, lib) for t in TEMPERATURE_GRID]
    finite = [s if np.isfinite(s) else -np.inf for s in scores]
    if np.isfinite(max(finite)):
        chosen = TEMPERATURE_GRID[int(np.argmax(finite))]
    else:  # too few spots to validate
        chosen, how = default, how + " (nothing to score: the default)"
    return chosen, {
        "temperature": chosen,
        "temperature_grid": list(TEMPERATURE_GRID),
        "inner_pcc": scores,
        "inner_cv": how,
    }


@register_model("knn")
class KNNModel(ExpressionModel):
    """Retrieval on the frozen features: average the expression of the most similar training spots.

    No training: the training spots' features and measured expression are the reference bank.
    Features are standardised with the training mean and standard deviation (``standardize``),
    then each query spot takes the ``k`` training spots of highest cosine similarity and predicts
    their average expression, weighted by ``softmax(similarity / temperature)`` (``temperature=None``
    gives equal weights). The spread is the weighted standard deviation over those neighbours.

    ``temperature="auto"`` chooses it from :data:`TEMPERATURE_GRID` without the test slides: on the
    validation slides when given, else by inner validation over the training slides (each slide, or
    each spatial half of a single slide, predicted from the others). The temperature with the highest
    mean per-gene Pearson correlation wins (``history["temperature"]``, ``history["inner_pcc"]``).
    On HER2+ it raised leave-one-patient-out PCC(ACG) from 0.092 to 0.098 (``docs/benchmarks.md``).

    Hyper-parameters (``default_hparams``)
        ``k=50``, ``temperature=0.1`` (a positive number, ``None`` or ``"auto"``), ``standardize=True``,
        ``chunk_size=256`` (query spots per similarity block, bounds memory).
    """

    default_hparams: ClassVar[dict[str, Any]] = {"k": 50, "temperature": 0.1, "standardize": True, "chunk_size": 256}
    bank_size_hparams: ClassVar[tuple[str, ...]] = ("k",)

    def __init__(self, genes: list[str], **kwargs: Any) -> None:
        super().__init__(genes, **kwargs)
        hp = self.hparams
        for key in ("k", "chunk_size"):
            if int(hp[key]) != hp[key] or hp[key] < 1:
                raise ValueError(f"knn: {key} must be a positive integer, got {hp[key]!r}.")
        check_temperature("knn", "temperature", hp["temperature"])
        self.temperature_: float | None = None if hp["temperature"] == "auto" else hp["temperature"]

    def _normalise(self, X: np.ndarray) -> np.ndarray:
        return unit_rows((X - self.feature_mean_) / self.feature_scale_)

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        X = np.asarray(train.features, dtype=np.float32)
        if int(self.hparams["k"]) > train.n_spots:
            raise ValueError(f"knn: k={self.hparams['k']} is larger than the {train.n_spots} training spots.")
        if self.hparams["standardize"]:
            mean, scale = feature_scaling(X)
            self.feature_mean_, self.feature_scale_ = mean.astype(np.float32), scale.astype(np.float32)
        else:
            self.feature_mean_ = np.zeros(X.shape[1], dtype=np.float32)
            self.feature_scale_ = np.ones(X.shape[1], dtype=np.float32)
        self.bank_features_ = self._normalise(X)
        self.bank_target_ = np.asarray(train.target, dtype=np.float32)
        self.n_features = int(X.shape[1])
        if self.hparams["temperature"] == "auto":
            val_unit = None
            if validation is not None and validation.target is not None:
                val_unit = self._normalise(np.asarray(validation.features, dtype=np.float32))
            self.temperature_, info = choose_temperature(
                self.bank_features_,
                train,
                k=int(self.hparams["k"]),
                validation_unit=val_unit,
                validation=validation,
                default=self.default_hparams["temperature"],
            )
            self.history.update(info)
            logger.debug(f"knn: temperature {self.temperature_} chosen on {info['inner_cv']}")

    def smoothing_inner_hparams(self) -> dict[str, Any]:
        """Hyper-parameters of the inner fits that choose the smoothing: the temperature already chosen."""
        return {"temperature": self.temperature_}

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        X = np.asarray(data.features, dtype=np.float32)
        k = int(self.hparams["k"])
        if k > self.bank_features_.shape[0]:
            raise ValueError(f"knn: k={k} is larger than the reference bank ({self.bank_features_.shape[0]} spots).")
        return weighted_retrieval(
            self._normalise(X),
            self.bank_features_,
            self.bank_target_,
            k=k,
            temperature=self.temperature_,
            chunk=int(self.hparams["chunk_size"]),
        )

    def _state(self) -> dict[str, np.ndarray]:
        return {
            "feature_mean": self.feature_mean_,
            "feature_scale": self.feature_scale_,
            "bank_features": self.bank_features_,
            "bank_target": self.bank_target_,
            # the temperature in use, so that a model fitted with "auto" predicts the same when loaded
            "temperature": temperature_state(self.temperature_),
        }

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.feature_mean_ = _state_array(state, "feature_mean", self.name).astype(np.float32)
        self.feature_scale_ = _state_array(state, "feature_scale", self.name).astype(np.float32)
        self.bank_features_ = _state_array(state, "bank_features", self.name).astype(np.float32)
        self.bank_target_ = _state_array(state, "bank_target", self.name).astype(np.float32)
        self.n_features = int(self.bank_features_.shape[1])
        _check_panel(self, self.bank_target_.shape[1], "bank_target")
        if "temperature" in state:  # folders saved before temperature="auto" keep the hyper-parameter
            self.temperature_ = temperature_from_state(state["temperature"])
