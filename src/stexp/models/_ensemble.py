"""``ridge_knn``: the average of the ridge probe and kNN retrieval on the same frozen features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from stexp.models._base import ExpressionModel, check_hparams
from stexp.models._baselines import RIDGE_ALPHAS, KNNModel, RidgeModel, check_ridge_hparams
from stexp.models._data import SpotData
from stexp.models._registry import register_model

#: The hyper-parameters of the ridge part (the same names and defaults as the registered ``"ridge"``).
_RIDGE_KEYS = ("n_components", "alphas", "cv_folds", "standardize", "seed")


@register_model("ridge_knn")
class RidgeKNNModel(ExpressionModel):
    """Average of a ridge probe and a kNN retrieval, both on the same frozen features.

    The two err differently: ridge is a linear map of the whole feature space, kNN copies the measured
    expression of the most similar training spots (their real co-expression, bounded to observed
    values). The prediction is ``ridge_weight * ridge + (1 - ridge_weight) * knn``; the spread is the
    kNN neighbours' weighted standard deviation. Each part is exactly the registered ``"ridge"`` /
    ``"knn"`` model (its penalty chosen by grouped inner cross-validation over training slides).

    Parameters
    ----------
    genes
        The gene panel.
    n_components, alphas, cv_folds, standardize, seed
        The ridge's (:class:`~stexp.models._baselines.RidgeModel`, with its defaults).
    k, temperature
        The kNN's (:class:`~stexp.models._baselines.KNNModel`; ``temperature="auto"``: chosen on the
        training slides), 200 neighbours by default.
    ridge_weight
        Weight of the ridge in the average, in [0, 1].
    **kwargs
        ``features_key``, ``encoder_spec`` (:class:`~stexp.models.ExpressionModel`).
    """

    bank_size_hparams: ClassVar[tuple[str, ...]] = ("k",)
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
        k: int = 200,
        temperature: float | Literal["auto"] | None = 0.1,
        ridge_weight: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            n_components=n_components,
            alphas=alphas,
            cv_folds=cv_folds,
            standardize=standardize,
            seed=seed,
            k=k,
            temperature=temperature,
            ridge_weight=ridge_weight,
            **kwargs,
        )
        hp = self.hparams
        check_ridge_hparams(self)
        check_hparams(self, positive_int=("k",), positive=("temperature",), unit_interval=("ridge_weight",))
        common: dict[str, Any] = {"features_key": self.features_key, "encoder_spec": self.encoder_spec}
        self.ridge = RidgeModel(self.genes, **common, **{key: hp[key] for key in _RIDGE_KEYS})
        self.knn = KNNModel(self.genes, **common, k=hp["k"], temperature=hp["temperature"])

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        k = self.hparams["k"]  # at most the training spots (stexp.models._recipe.build_model)
        self.ridge.fit(train, device=self.device)  # a single alpha: fit without inner cross-validation
        self.knn.fit(train, device=self.device)
        self.n_features = self.ridge.n_features
        self.history = {"ridge": self.ridge.history, "k": k}

    def inner_fit_hparams(self) -> dict[str, Any]:
        """Choices inner refits keep fixed: the penalty and temperature already chosen."""
        return {"alphas": [float(self.ridge.history["alpha"])], "temperature": self.knn.temperature_}

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        w = self.hparams["ridge_weight"]
        ridge, _ = self.ridge._predict(data)
        knn, spread = self.knn._predict(data)
        return w * np.asarray(ridge) + (1.0 - w) * np.asarray(knn), spread

    def _state(self) -> dict[str, np.ndarray]:
        return {
            **{f"ridge.{k}": v for k, v in self.ridge._state().items()},
            **{f"knn.{k}": v for k, v in self.knn._state().items()},
        }

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        for prefix, part in (("ridge.", self.ridge), ("knn.", self.knn)):
            part._load_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            part.is_fitted = True
        self.knn.hparams["k"] = int(self.history.get("k", self.knn.hparams["k"]))
        self.n_features = self.ridge.n_features
