"""Simple baselines that every benchmark runs beside the models: training mean, ridge probe, kNN retrieval.

All three work on the same frozen image features as the models and are registered as ``"mean"``,
``"ridge"`` and ``"knn"``. They save and load through :class:`~stexp.models.ExpressionModel` as
plain arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from stexp._settings import logger
from stexp.models._base import ExpressionModel, PredictionPair, check_hparams
from stexp.models._data import SpotData
from stexp.models._folds import inner_folds
from stexp.models._registry import register_model
from stexp.models._retrieval import (
    bank_index,
    choose_temperature,
    outside,
    temperature_from_state,
    temperature_state,
    weighted_retrieval,
)
from stexp.models._scaling import feature_scaling, unit_rows

#: The ridge penalties the inner cross-validation chooses from (``ridge`` and ``ridge_knn``).
RIDGE_ALPHAS: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)


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

    calibrate_by_default: ClassVar[bool] = True

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


def check_ridge_hparams(model: ExpressionModel) -> None:
    """The ranges of the ridge's hyper-parameters (of ``ridge``, and of ``ridge_knn``'s ridge part)."""
    check_hparams(model, positive_int=("n_components",), positive=("alphas",), min_int={"cv_folds": 2})


@register_model("ridge")
class RidgeModel(ExpressionModel):
    """Linear probe on frozen features (the HEST-benchmark recipe): standardise, PCA, ridge.

    Features are standardised with the training mean and standard deviation, projected on the
    first ``n_components`` principal components of the training spots (fewer when there are fewer
    spots or features; ``n_components=None``: no projection, ridge on every standardised feature), and
    regressed on the target by ridge regression (one SVD per fit serves every penalty of the grid).
    The penalty is chosen among ``alphas`` by an inner cross-validation on the training spots
    only, on the inner folds every choice of stexp uses (:func:`stexp.models._folds.inner_folds`:
    patients, else slides, else spatial blocks of a single slide), so the chosen penalty is the one
    that transfers to unseen tissue. Scaling and PCA are refit inside each inner fold. The chosen
    alpha and the inner scores are in :attr:`history`.

    Parameters
    ----------
    genes
        The gene panel.
    n_components
        Principal components of the standardised features (fewer with fewer spots or features); ``None``:
        no projection.
    alphas
        The penalties to choose from (held as a list of floats).
    cv_folds
        Inner folds at most.
    standardize
        Standardise the features with the training mean and standard deviation.
    seed
        Seed of the randomised PCA.
    **kwargs
        ``features_key``, ``encoder_spec`` (:class:`~stexp.models.ExpressionModel`).
    """

    calibrate_by_default: ClassVar[bool] = True

    def __init__(
        self,
        genes: list[str],
        *,
        n_components: int | None = 256,
        alphas: Sequence[float] = RIDGE_ALPHAS,
        cv_folds: int = 5,
        standardize: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            n_components=n_components,
            alphas=alphas,
            cv_folds=cv_folds,
            standardize=standardize,
            seed=seed,
            **kwargs,
        )
        check_ridge_hparams(self)

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

        n_comp = max(min(self.hparams["n_components"], X.shape[0] - 1, X.shape[1]), 1)
        pca = PCA(n_components=n_comp, random_state=self.hparams["seed"]).fit(Z)
        arrays |= {"pca_mean": pca.mean_, "pca_components": pca.components_}
        return arrays, pca.transform(Z)

    @staticmethod
    def _transform(arrays: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        Z = (X - arrays["scaler_mean"]) / arrays["scaler_scale"]
        if "pca_components" not in arrays:
            return Z
        return (Z - arrays["pca_mean"]) @ arrays["pca_components"].T

    def _inner_splits(self, train: SpotData) -> tuple[list, str]:
        folds = inner_folds(train, self.hparams["cv_folds"])
        return folds.splits, folds.how

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        X = np.asarray(train.features, dtype=np.float64)
        Y = np.asarray(train.target, dtype=np.float64)
        if train.n_spots < 4:
            raise ValueError(
                f"ridge: needs at least 4 training spots for its inner cross-validation, got {train.n_spots}."
            )
        alphas = list(self.hparams["alphas"])
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

    def inner_fit_hparams(self) -> dict[str, Any]:
        """Choices inner refits keep fixed: the penalty already chosen (no nested cross-validation)."""
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
    What it gains is measured in ``docs/benchmarks.md``.

    Parameters
    ----------
    genes
        The gene panel.
    k
        Training spots retrieved per query spot.
    temperature
        Softmax temperature of the weights: a positive number, ``None`` (equal weights) or ``"auto"``.
    standardize
        Standardise the features with the training mean and standard deviation.
    chunk_size
        Query spots per similarity block (bounds memory).
    search
        ``"auto"``: exact search below :data:`stexp.models._ann.ANN_MIN_BANK` training spots, an approximate
        faiss index above it (when faiss is installed; built at fit, saved with the model, its recall in
        ``history["ann"]``); ``"exact"``; or ``"approximate"`` (needs faiss).
    **kwargs
        ``features_key``, ``encoder_spec`` (:class:`~stexp.models.ExpressionModel`).
    """

    bank_size_hparams: ClassVar[tuple[str, ...]] = ("k",)
    calibrate_by_default: ClassVar[bool] = True

    def __init__(
        self,
        genes: list[str],
        *,
        k: int = 50,
        temperature: float | Literal["auto"] | None = 0.1,
        standardize: bool = True,
        chunk_size: int = 256,
        search: Literal["auto", "exact", "approximate"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            k=k,
            temperature=temperature,
            standardize=standardize,
            chunk_size=chunk_size,
            search=search,
            **kwargs,
        )
        check_hparams(self, positive_int=("k", "chunk_size"), positive=("temperature",))
        t = self.hparams["temperature"]
        self.temperature_: float | None = None if t == "auto" else t
        self.index_: Any = None  # a stexp.models._ann.AnnIndex over the bank, or None (exact search)

    def _normalise(self, X: np.ndarray) -> np.ndarray:
        """Standardised unit rows, made 16,384 rows at a time (features on disk are read by chunks)."""
        out = np.empty(X.shape, dtype=np.float32)
        for s in range(0, X.shape[0], 16_384):
            out[s : s + 16_384] = unit_rows((X[s : s + 16_384] - self.feature_mean_) / self.feature_scale_)
        return out

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        X = np.asarray(train.features, dtype=np.float32)
        if self.hparams["k"] > train.n_spots:
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
        self.index_ = bank_index(self.bank_features_, self.hparams["k"], search=self.hparams["search"])
        if self.index_ is not None:
            self.history["ann"] = self.index_.info  # the same dict: later left-out searches add their nprobe
        if self.hparams["temperature"] == "auto":
            val_unit = None
            if validation is not None and validation.target is not None:
                val_unit = self._normalise(np.asarray(validation.features, dtype=np.float32))
            self.temperature_, info = choose_temperature(
                self.bank_features_,
                train,
                k=self.hparams["k"],
                validation_unit=val_unit,
                validation=validation,
                default=self.default_hparams["temperature"],
                search=self.hparams["search"],
                index=self.index_,
            )
            self.history.update(info)
            logger.debug(f"knn: temperature {self.temperature_} chosen on {info['inner_cv']}")

    def inner_fit_hparams(self) -> dict[str, Any]:
        """Choices inner refits keep fixed: the temperature already chosen."""
        return {"temperature": self.temperature_}

    def left_out_predictor(self, train: SpotData) -> Callable[[np.ndarray, np.ndarray], PredictionPair] | None:
        """Inner refits without refitting: retrieval from the bank with the held-out rows excluded.

        An inner kNN fitted on the rows ``fit_idx`` of ``train`` would bank exactly those rows; searching this
        model's bank (``train``, in order) with every other row excluded finds the same neighbours, with no
        copy of the bank. The one difference: the features are standardised with the mean and scale of all
        training spots, not of ``fit_idx`` alone (no expression is involved). ``None`` when ``train`` is not
        the bank this model was fitted on.
        """
        n = self.bank_features_.shape[0]
        if train.n_spots != n or train.target is None:
            return None
        head = self._normalise(np.asarray(train.features[:2], dtype=np.float32))
        if not np.allclose(head, self.bank_features_[:2], atol=1e-5):
            return None

        def predict_held(fit_idx: np.ndarray, held_idx: np.ndarray) -> PredictionPair:
            return weighted_retrieval(
                self.bank_features_[np.asarray(held_idx, dtype=np.int64)],
                self.bank_features_,
                self.bank_target_,
                k=min(self.hparams["k"], len(fit_idx)),
                temperature=self.temperature_,
                chunk=self.hparams["chunk_size"],
                index=self.index_,
                exclude=outside(fit_idx, n),
            )

        return predict_held

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        X = np.asarray(data.features, dtype=np.float32)
        k = self.hparams["k"]
        if k > self.bank_features_.shape[0]:
            raise ValueError(f"knn: k={k} is larger than the reference bank ({self.bank_features_.shape[0]} spots).")
        return weighted_retrieval(
            self._normalise(X),
            self.bank_features_,
            self.bank_target_,
            k=k,
            temperature=self.temperature_,
            chunk=self.hparams["chunk_size"],
            index=self.index_,
        )

    def _state(self) -> dict[str, np.ndarray]:
        state = {
            "feature_mean": self.feature_mean_,
            "feature_scale": self.feature_scale_,
            "bank_features": self.bank_features_,
            "bank_target": self.bank_target_,
            # the temperature in use, so that a model fitted with "auto" predicts the same when loaded
            "temperature": temperature_state(self.temperature_),
        }
        if self.index_ is not None:  # centroids and cells: the index is rebuilt at load without k-means
            state.update(self.index_.state())
        return state

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.feature_mean_ = _state_array(state, "feature_mean", self.name).astype(np.float32)
        self.feature_scale_ = _state_array(state, "feature_scale", self.name).astype(np.float32)
        self.bank_features_ = _state_array(state, "bank_features", self.name).astype(np.float32)
        self.bank_target_ = _state_array(state, "bank_target", self.name).astype(np.float32)
        self.n_features = int(self.bank_features_.shape[1])
        _check_panel(self, self.bank_target_.shape[1], "bank_target")
        if "temperature" in state:  # folders saved before temperature="auto" keep the hyper-parameter
            self.temperature_ = temperature_from_state(state["temperature"])
        self.index_ = None
        if "ann.centroids" in state:
            from stexp.models._ann import AnnIndex, faiss_available

            if faiss_available():
                self.index_ = AnnIndex.from_state(self.bank_features_, state)
            else:
                logger.warning(
                    f"{self.name}: the model was fitted with an approximate index, but faiss is not installed; "
                    "predicting by exact search (slower on this bank, same or better neighbours)."
                )
