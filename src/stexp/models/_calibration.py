"""Calibrated uncertainty for any model: slide-grouped split-conformal intervals and per-gene expected PCC.

:func:`calibrate` refits a copy of a fitted model on inner folds of its training spots, grouped so that
every calibration spot is predicted by a model that never saw its slide (by patient when there are
several, else by slide; with a single training slide, by contiguous spatial blocks of it, which is
optimistic and logged as such). From the out-of-fold predictions it learns

- the **per-gene conformal quantiles** of the normalised residual ``|y - ŷ| / d(x, g)``, so that at
  prediction time ``ŷ ± q_g(coverage) · d(x, g)`` covers a new spot's measured value with the stated
  probability (split-conformal; the out-of-fold residuals of the inner models stand in for those of the
  final model, as in CV+);
- ``d(x, g)``, the **difficulty** of a spot (wider intervals where the model is less sure): by default the
  spot's sequencing depth predicted from its image (``"depth"``: fewer counts, noisier log-expression; the
  best of :data:`SCORES` measured on HER2+ leave-one-patient-out, the comparison is in
  ``docs/uncertainty.md``). Every score but ``"none"`` and ``"distance"`` is multiplied by
  ``max(1, distance / ref)``, where
  ``distance`` is the spot's mean distance to its nearest training spots in feature space and ``ref`` the
  90th percentile of that distance over the calibration spots, so that spots unlike any training spot
  (another stain, another tissue) get wider intervals;
- the **expected PCC** of each gene on a new slide: the per-gene Pearson of the out-of-fold predictions on
  each held-out group's slides, averaged over slides.

Everything is plain numpy arrays (:meth:`Calibration.state`), saved in the model folder next to the weights.
No AnnData, no query data: only the training spots are used.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._metrics import per_slide_pearson
from stexp._settings import logger

from ._data import MAX_INNER_QUERIES, SpotData, inner_query_sample
from ._folds import InnerFolds, inner_folds
from ._retrieval import euclidean_neighbours
from ._scaling import feature_scaling

if TYPE_CHECKING:  # pragma: no cover
    from ._base import ExpressionModel, PredictionPair

#: Difficulty scores ``d(x, g)`` that normalise the conformal residuals.
#: ``"none"``: 1 everywhere (plain per-gene split conformal, constant width per gene);
#: ``"distance"``: mean distance of the spot to its ``k`` nearest training spots in (PCA-reduced, standardised)
#: image-feature space; ``"neighbour_spread"``: standard deviation of the measured expression of those
#: ``k`` training spots, per gene; ``"neighbour_residual"``: mean absolute out-of-fold residual of those
#: ``k`` training spots, per gene; ``"spot_residual"``: the same averaged over genes (one number per spot, less
#: noisy); ``"model_spread"``: the model's own spread (retrieval spread for kNN and
#: mclSTExp, MC dropout for NH2ST; not available for ridge, MLP, mean); ``"depth"``: the spot's sequencing depth
#: predicted from its image features, as ``exp(-0.5 * predicted centred log depth)`` (a ridge regression fit on
#: the training spots' total counts, centred within each slide): counting noise on the log scale shrinks with
#: depth, and on HER2+ the depth explains most of which spots are mispredicted.
SCORES = ("none", "distance", "neighbour_spread", "neighbour_residual", "spot_residual", "model_spread", "depth")
#: The difficulty scores a calibration can use, i.e. the choices of ``calibration_score=`` of
#: :class:`stexp.models.Recipe` and :func:`stexp.tl.fit` (public as ``stexp.models.CALIBRATION_SCORES``):
#: ``"none"`` (constant width per gene), ``"distance"`` (to the nearest training spots in image-feature space),
#: ``"neighbour_spread"`` / ``"neighbour_residual"`` (spread of the measured expression / mean out-of-fold error
#: of those spots, per gene), ``"spot_residual"`` (the latter averaged over genes), ``"model_spread"`` (the
#: model's own spread; only models that give one) and ``"depth"`` (the spot's sequencing depth predicted from
#: its image; the default).
CALIBRATION_SCORES = SCORES
DEFAULT_SCORE = "depth"
#: How the per-gene quantile is taken over the calibration spots (see :meth:`Calibration.quantile`).
QUANTILE_MODES = ("group_max", "pooled")
DEFAULT_QUANTILE_MODE = "group_max"
#: Prefix of the calibration arrays in a model folder's weights file.
STATE_PREFIX = "calibration."
#: At most this many calibration spots' normalised residuals are stored.
MAX_QUANTILES = 2000
#: At most this many training spots form the neighbour bank.
MAX_BANK = 5000


@dataclass
class Calibration:
    """What :func:`calibrate` learnt; see the module docstring.

    Attributes
    ----------
    score
        The difficulty score (one of :data:`SCORES`).
    scores
        ``(m, n_genes)``: the normalised calibration residuals ``|y - ŷ| / d`` (a random subset of
        :data:`MAX_QUANTILES` spots when there were more).
    groups
        ``(m,)``: the inner fold (held-out group of slides) of each row of ``scores``.
    n_calibration
        Number of calibration spots.
    expected_pcc
        ``(n_genes,)``: the per-gene Pearson expected on a new slide (NaN where never defined).
    floor
        ``(n_genes,)``: added to the raw difficulty so that no interval has zero width.
    bank
        Neighbour bank: ``proj_mean``, ``proj_scale``, ``proj_components`` (the feature projection),
        ``features`` (projected bank spots), ``target``/``residual`` (their measured expression and
        absolute out-of-fold residuals, for the neighbour scores).
    info
        JSON-serialisable description: folds, grouping, timing, k, per-fold expected PCC.
    """

    score: str
    scores: np.ndarray
    groups: np.ndarray
    n_calibration: int
    expected_pcc: np.ndarray
    floor: np.ndarray
    bank: dict[str, np.ndarray] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    # -- prediction time ------------------------------------------------------------------------
    def _mode(self, mode: str | None) -> str:
        mode = mode or self.info.get("quantile_mode", "pooled")
        if mode not in QUANTILE_MODES:
            raise ValueError(f"quantile mode must be one of {QUANTILE_MODES}, got {mode!r}.")
        return mode

    def _parts(self, mode: str) -> list[np.ndarray]:
        """The calibration rows a quantile is taken over: all of them, or one array per held-out group."""
        if mode == "pooled":
            return [self.scores]
        return [self.scores[self.groups == g] for g in np.unique(self.groups)]

    def max_coverage(self, mode: str | None = None) -> float:
        """The largest coverage these calibration spots support: ``n / (n + 1)``.

        ``n`` is the number of calibration spots (``"pooled"``), or of the smallest held-out group
        (``"group_max"``, the default): a split-conformal quantile at ``coverage`` needs
        ``ceil((n + 1) * coverage) <= n`` spots, else the only honest bound is infinite.
        """
        n = min(part.shape[0] for part in self._parts(self._mode(mode)))
        return n / (n + 1)

    def check_coverage(self, coverage: float, mode: str | None = None) -> None:
        """Raise a ValueError before any prediction when the calibration is too small for ``coverage``.

        Instead of bounds of ``±inf`` for every spot (what split-conformal gives then), the message says the
        largest coverage these calibration spots support and how to get more.
        """
        check_coverage(coverage)
        mode = self._mode(mode)
        sizes = [part.shape[0] for part in self._parts(mode)]
        n = min(sizes)
        if np.ceil((n + 1) * coverage) <= n:
            return
        needed = int(np.ceil(coverage / (1 - coverage)))
        while np.ceil((needed + 1) * coverage) > needed:  # float rounding
            needed += 1
        where = (
            f"{n} calibration spots"
            if mode == "pooled"
            else f"{len(sizes)} held-out groups ({self.info.get('folds', 'inner folds')}) of {sorted(sizes)} spots, "
            f"the smallest {n}"
        )
        raise ValueError(
            f"coverage={coverage:g} needs at least {needed} calibration spots per held-out group, but this "
            f"model's calibration has {where}: the largest coverage it supports is {n / (n + 1):.4g} "
            f"(n / (n + 1)); with more the interval bounds would be infinite for every spot. Ask for a coverage "
            f"<= {n / (n + 1):.4g}, or refit with more training spots per slide (patient) so that every inner "
            "fold holds more calibration spots."
        )

    def quantile(self, coverage: float, mode: str | None = None) -> np.ndarray:
        """Per-gene conformal quantile of the normalised residual at ``coverage``.

        ``mode`` (default: the calibration's ``quantile_mode``): ``"pooled"`` takes the split-conformal
        quantile over all calibration spots; ``"group_max"`` takes it within each held-out group (slide or
        patient) and keeps the largest, so that the interval covers on every held-out group, not only on
        average: the exchangeable unit of a new slide is the slide, whose shift moves all its spots at once.

        Raises
        ------
        ValueError
            If ``coverage`` is above :meth:`max_coverage` (:meth:`check_coverage`): the quantile would be
            infinite.
        """
        self.check_coverage(coverage, mode)
        out = np.full(self.scores.shape[1], -np.inf)
        for part in self._parts(self._mode(mode)):
            n = part.shape[0]
            level = np.ceil((n + 1) * coverage) / n
            out = np.maximum(out, np.quantile(part, level, axis=0, method="higher"))
        return out.astype(np.float64)

    def difficulty(self, features: np.ndarray | None, spread: np.ndarray | None, n_genes: int) -> np.ndarray:
        """``d(x, g)`` for query spots, ``(n_spots, n_genes)`` (the floor included)."""
        raw, dist = _raw_difficulty(self.score, self.bank, features, spread, n_genes, k=int(self.info["k"]))
        return (raw + self.floor) * _inflation(dist, self.info.get("distance_ref"))

    def intervals(
        self,
        mean: np.ndarray,
        features: np.ndarray | None,
        spread: np.ndarray | None,
        coverage: float,
        mode: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds ``mean ∓ q_g(coverage) · d(x, g)``, float32."""
        half = self.difficulty(features, spread, mean.shape[1]) * self.quantile(coverage, mode)
        return (mean - half).astype(np.float32), (mean + half).astype(np.float32)

    # -- saving -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"score": self.score, "n_calibration": int(self.n_calibration), **self.info}

    def state(self) -> dict[str, np.ndarray]:
        arrays = {
            "scores": self.scores,
            "groups": self.groups,
            "expected_pcc": self.expected_pcc,
            "floor": self.floor,
            **{f"bank.{k}": v for k, v in self.bank.items()},
        }
        return {STATE_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    @classmethod
    def from_saved(cls, config: dict[str, Any], state: dict[str, np.ndarray]) -> Calibration:
        arrays = {k[len(STATE_PREFIX) :]: np.asarray(v) for k, v in state.items() if k.startswith(STATE_PREFIX)}
        missing = [k for k in ("scores", "groups", "expected_pcc", "floor") if k not in arrays]
        if missing:
            raise ValueError(f"the model's calibration lacks {missing}: the model folder is inconsistent.")
        info = {k: v for k, v in config.items() if k not in ("score", "n_calibration")}
        bank = {k[len("bank.") :]: v for k, v in arrays.items() if k.startswith("bank.")}
        return cls(
            score=config["score"],
            scores=arrays["scores"],
            groups=arrays["groups"].astype(np.int64),
            n_calibration=int(config["n_calibration"]),
            expected_pcc=arrays["expected_pcc"].astype(np.float64),
            floor=arrays["floor"],
            bank=bank,
            info=info,
        )


def check_coverage(coverage: float) -> None:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float, np.number)) or not 0 < coverage < 1:
        raise ValueError(f"coverage must be a number in (0, 1), e.g. 0.9, got {coverage!r}.")


def split_state(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The model's own arrays and the calibration arrays of a saved state."""
    own = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    cal = {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    return own, cal


# -- difficulty -------------------------------------------------------------------------------------
def _project(bank: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    Z = (np.asarray(X, dtype=np.float32) - bank["proj_mean"]) / bank["proj_scale"]
    return Z @ bank["proj_components"].T


def _fit_projection(X: np.ndarray, n_components: int) -> dict[str, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    mean, scale = feature_scaling(X)
    Z = (X - mean) / scale
    n = int(max(1, min(n_components, Z.shape[0] - 1, Z.shape[1])))
    _, _, vt = np.linalg.svd(Z - Z.mean(axis=0), full_matrices=False)
    return {
        "proj_mean": mean.astype(np.float32),
        "proj_scale": scale.astype(np.float32),
        "proj_components": vt[:n].astype(np.float32),
    }


def _raw_difficulty(
    score: str,
    bank: dict[str, np.ndarray],
    features: np.ndarray | None,
    spread: np.ndarray | None,
    n_genes: int,
    *,
    k: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw ``d(x, g)`` before the floor, and each spot's mean distance to its ``k`` nearest bank spots (or None)."""
    if score == "none":
        n = features.shape[0] if features is not None else np.asarray(spread).shape[0]
        return np.zeros((n, n_genes)), None
    if features is None:
        raise ValueError(f"score={score!r} needs the spots' image features.")
    q = _project(bank, features)
    idx, dist = euclidean_neighbours(q, bank["features"], k)
    mean_dist = dist.mean(axis=1)
    if score == "model_spread":
        if spread is None:
            raise ValueError("the model gives no spread; its calibration cannot use score='model_spread'.")
        return np.asarray(spread, dtype=np.float64), mean_dist
    if score == "distance":
        return np.repeat(mean_dist[:, None], n_genes, axis=1), None
    if score == "depth":
        return np.repeat(_depth_difficulty(bank, features)[:, None], n_genes, axis=1), mean_dist
    if score == "spot_residual":
        spot = bank["residual"].astype(np.float64).mean(axis=1)
        return np.repeat(spot[idx].mean(axis=1)[:, None], n_genes, axis=1), mean_dist
    values = bank["residual"] if score == "neighbour_residual" else bank["target"]
    out = np.empty((q.shape[0], n_genes))
    for s in range(0, q.shape[0], 256):
        nb = values[idx[s : s + 256]].astype(np.float64)  # (chunk, k, genes)
        out[s : s + 256] = nb.mean(axis=1) if score == "neighbour_residual" else nb.std(axis=1)
    return out, mean_dist


#: Penalties among which the depth regression's is chosen (generalised cross-validation).
DEPTH_ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 15))


def _fit_depth_model(
    features: np.ndarray, depth: np.ndarray, library: np.ndarray, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Ridge from standardised features to ``log1p(depth)`` centred within each slide (the arrays of ``"depth"``).

    Fitted on at most :data:`MAX_BANK` spots (a seeded sample beyond), its penalty chosen among
    :data:`DEPTH_ALPHAS` by exact leave-one-out error (:func:`ridge_loo`).
    """
    rows = np.arange(features.shape[0])
    if rows.size > MAX_BANK:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_BANK, replace=False))
    X = np.asarray(features[rows], dtype=np.float64)
    mean, scale = feature_scaling(X)
    y = np.log1p(np.asarray(depth, dtype=np.float64)[rows])
    library = np.asarray(library).astype(str)[rows]
    for lib in np.unique(library):  # depth differs between slides for technical reasons the image cannot show
        in_lib = library == lib
        y[in_lib] -= y[in_lib].mean()
    coef, intercept = ridge_loo((X - mean) / scale, y, DEPTH_ALPHAS)
    return {
        "depth_mean": mean.astype(np.float32),
        "depth_scale": scale.astype(np.float32),
        "depth_coef": coef.astype(np.float32),
        "depth_intercept": np.asarray([intercept], dtype=np.float32),
    }


def ridge_loo(X: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """Ridge with an intercept whose penalty has the smallest exact leave-one-out squared error: coefficients, intercept.

    One eigendecomposition of the centred ``XᵀX`` serves every penalty; the leave-one-out residual of spot ``i``
    is ``(y_i - ŷ_i) / (1 - h_ii)`` with ``h`` the hat matrix including the intercept (the criterion of
    :class:`sklearn.linear_model.RidgeCV`'s default, at ``n·p²`` instead of its per-penalty products).
    """
    x_mean, y_mean = X.mean(axis=0), float(y.mean())
    Xc, yc = X - x_mean, y - y_mean
    n, p = Xc.shape
    # Xc = U S Vᵀ from the smaller of XᵀX (p x p) and XXᵀ (n x n): eigenvalues s², XV = Xc V = U S
    if n > p:
        eigval, V = np.linalg.eigh(Xc.T @ Xc)
        eigval = np.maximum(eigval, 0.0)
        XV = Xc @ V
    else:
        eigval, U = np.linalg.eigh(Xc @ Xc.T)
        keep = eigval > eigval.max() * 1e-12  # the null directions fit nothing and add no leverage
        eigval, U = eigval[keep], U[:, keep]
        XV = U * np.sqrt(eigval)
        V = (Xc.T @ U) / np.sqrt(eigval)
    r = XV.T @ yc
    leverage_terms = XV**2
    best, best_err = alphas[0], np.inf
    for alpha in alphas:
        shrink = 1.0 / (eigval + alpha)
        fitted = XV @ (shrink * r)
        hat = leverage_terms @ shrink + 1.0 / n
        err = float(np.mean(((yc - fitted) / (1.0 - hat)) ** 2))
        if err < best_err:
            best, best_err = alpha, err
    coef = V @ (r / (eigval + best))
    return coef, y_mean - float(x_mean @ coef)


def _depth_difficulty(bank: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """``exp(-0.5 * predicted centred log depth)`` of every spot: larger where fewer counts are expected."""
    Z = (np.asarray(features, dtype=np.float64) - bank["depth_mean"]) / bank["depth_scale"]
    predicted = Z @ bank["depth_coef"].astype(np.float64) + float(bank["depth_intercept"][0])
    return np.exp(-0.5 * np.clip(predicted, -20.0, 20.0))


def _inflation(mean_dist: np.ndarray | None, ref: float | None) -> np.ndarray | float:
    """``max(1, distance / ref)`` per spot, ``ref`` the 90th percentile of the calibration spots' distances.

    Intervals widen for spots farther from the training spots than almost every calibration spot was.
    """
    if mean_dist is None or ref is None:
        return 1.0
    return np.maximum(1.0, mean_dist / ref)[:, None]


def _oof_difficulty(
    score: str,
    bank: dict[str, np.ndarray],
    train: SpotData,
    spread: np.ndarray | None,
    fold: np.ndarray,
    k: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``d`` of every calibration spot, computed from the training spots of the *other* inner folds only."""
    features = np.asarray(train.features, dtype=np.float32)
    n_genes = bank["target"].shape[1]
    out = np.empty((features.shape[0], n_genes))
    dists = np.full(features.shape[0], np.nan)
    bank_fold = bank["fold"]
    for f in np.unique(fold):
        rows = np.flatnonzero(fold == f)
        keep = bank_fold != f
        sub = {**bank, "features": bank["features"][keep], "target": bank["target"][keep]}
        sub["residual"] = bank["residual"][keep]
        if score == "depth":
            assert train.depth is not None  # checked by calibrate()
            others = fold != f
            sub.update(_fit_depth_model(features[others], train.depth[others], train.library[others], seed=seed))
        out[rows], d = _raw_difficulty(
            score, sub, features[rows], None if spread is None else spread[rows], n_genes, k=k
        )
        if d is not None:
            dists[rows] = d
    return out, (None if np.isnan(dists).all() else dists)


def out_of_fold(
    model: ExpressionModel,
    train: SpotData,
    n_folds: int,
    refit: Callable[[SpotData], ExpressionModel] | None = None,
    *,
    predict_held: Callable[[np.ndarray, np.ndarray], PredictionPair] | None = None,
    max_queries: int | None = MAX_INNER_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Out-of-fold mean, spread and fold of the training spots, predicted on inner folds.

    The inner folds are :func:`stexp.models._folds.inner_folds` (``oof["folds"]``). Each fold's held-out
    spots are predicted by ``predict_held(fit_idx, held_idx)`` (:func:`stexp.models._recipe.inner_predictor`),
    or by ``refit(data)``, an inner model fitted on the fold's other spots. At most ``max_queries / n_folds``
    held-out spots per fold are predicted, a slide-stratified sample of spatial windows
    (:func:`stexp.models._data.inner_query_sample`; ``None``: all): ``oof["rows"]`` are the spots predicted
    (sorted), and row ``i`` of ``oof["mean"]`` / ``oof["spread"]`` is spot ``oof["rows"][i]`` (nothing is held for
    the spots not predicted: a million training spots would cost two arrays of 3 GB); ``oof["fold"]`` covers
    every training spot.
    """
    if predict_held is None:
        if refit is None:
            raise TypeError("out_of_fold needs predict_held= or refit= (how to predict a held-out fold).")
        fitter = refit
        predict_held = lambda fit_idx, held_idx: fitter(train.subset(fit_idx)).predict(train.subset(held_idx))
    folds = inner_folds(train, n_folds)
    budget = None if max_queries is None else max(1, int(max_queries) // folds.n_folds)
    held = [inner_query_sample(train, h, budget, seed=seed + f) for f, (_, h) in enumerate(folds.splits)]
    rows = np.sort(np.concatenate(held))
    position = np.searchsorted(rows, np.arange(train.n_spots))
    mean = np.full((rows.size, len(model.genes)), np.nan, dtype=np.float32)
    spread = None
    for (fit_idx, _), held_idx in zip(folds.splits, held, strict=True):
        m, s = predict_held(fit_idx, held_idx)
        mean[position[held_idx]] = m
        if s is not None:
            spread = np.full_like(mean, np.nan) if spread is None else spread
            spread[position[held_idx]] = s
    return {"mean": mean, "spread": spread, "fold": folds.fold, "folds": folds, "rows": rows}


def calibrate(
    model: ExpressionModel,
    train: SpotData,
    *,
    n_folds: int = 3,
    score: str = DEFAULT_SCORE,
    k: int = 20,
    n_components: int = 32,
    seed: int = 0,
    refit: Callable[[SpotData], ExpressionModel] | None = None,
    predict_held: Callable[[np.ndarray, np.ndarray], PredictionPair] | None = None,
    oof: dict[str, Any] | None = None,
    quantile_mode: str = DEFAULT_QUANTILE_MODE,
) -> Calibration:
    """Calibrate a fitted ``model`` on its training spots ``train``; see the module docstring.

    Parameters
    ----------
    model
        The fitted model (it is not changed; clones of it are refit on the inner folds).
    train
        The spots it was trained on, with their target.
    n_folds
        Inner folds (at most the number of groups).
    score
        The difficulty score, one of :data:`SCORES`.
    k
        Neighbours of the neighbour scores.
    n_components
        Dimensions of the feature projection the neighbours are searched in.
    seed
        Seeds the subsampling of a bank larger than :data:`MAX_BANK`.
    refit
        ``refit(data)`` fits an inner copy of the model on ``data``; not needed with ``predict_held`` or ``oof``.
    predict_held
        ``predict_held(fit_idx, held_idx)``: held-out rows of ``train`` predicted as by a copy of the model
        fitted on ``fit_idx`` (:func:`stexp.models._recipe.inner_predictor`, what a fit uses).
    oof
        Precomputed :func:`out_of_fold` result (to compare several scores on one set of refits).
    quantile_mode
        ``"group_max"`` or ``"pooled"``: see :meth:`Calibration.quantile`.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    if quantile_mode not in QUANTILE_MODES:
        raise ValueError(f"quantile_mode must be one of {QUANTILE_MODES}, got {quantile_mode!r}.")
    if model.reads_patches:
        raise NotImplementedError(
            "calibration of a model that fine-tunes its image encoder is not supported (it would fine-tune the "
            "encoder once per inner fold); calibrate a model on frozen features."
        )
    if train.target is None:
        raise ValueError("calibration needs the training spots' measured expression.")
    if score == "depth" and train.depth is None:
        raise ValueError(
            "calibration score 'depth' needs the training spots' total counts (SpotData.depth, filled by "
            "stexp.tl.fit from the counts); choose another score among " + str(SCORES) + "."
        )
    if oof is None and refit is None and predict_held is None:
        raise TypeError(
            "calibrate needs predict_held= or refit= (how to predict an inner fold), or a precomputed oof=."
        )
    t0 = time.perf_counter()
    oof = oof or out_of_fold(model, train, n_folds, refit, predict_held=predict_held, seed=seed)
    t_fits = time.perf_counter() - t0
    if score == "model_spread" and oof["spread"] is None:
        raise ValueError(f"the {model.name} model gives no spread; choose another score among {SCORES}.")
    n_training = train.n_spots
    oof, train = _sampled(oof, train)  # the calibration spots: those the inner models predicted
    target = np.asarray(train.target, dtype=np.float64)
    mean, fold = oof["mean"].astype(np.float64), oof["fold"]
    residual = np.abs(target - mean)

    # Expected PCC: per held-out slide (per block of a single slide), per gene, then averaged over slides.
    folds: InnerFolds = oof["folds"]
    per_slide = list(per_slide_pearson(mean, target, oof["scoring_library"]).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a gene constant on every held-out slide: NaN
        expected = np.nanmean(np.vstack(per_slide), axis=0) if per_slide else np.full(target.shape[1], np.nan)

    # Neighbour bank: every training spot (subsampled beyond MAX_BANK), in a projected feature space.
    rng = np.random.default_rng(seed)
    rows = np.arange(train.n_spots)
    if rows.size > MAX_BANK:
        rows = np.sort(rng.choice(rows, MAX_BANK, replace=False))
    features = np.asarray(train.features, dtype=np.float32)
    bank = _fit_projection(features[rows], n_components)
    bank["features"] = _project(bank, features[rows]).astype(np.float32)
    bank["target"] = target[rows].astype(np.float32)
    bank["residual"] = residual[rows].astype(np.float32)
    bank["fold"] = fold[rows]
    raw, dists = _oof_difficulty(score, bank, train, oof["spread"], fold, k, seed=seed)
    if score == "depth":
        assert train.depth is not None  # checked above
        bank.update(_fit_depth_model(features, train.depth, train.library, seed=seed))
    floor = _floor(raw)
    distance_ref = None if dists is None else float(np.quantile(dists, 0.9))
    normalised = residual / ((raw + floor) * _inflation(dists, distance_ref))
    keep = np.arange(normalised.shape[0])
    if keep.size > MAX_QUANTILES:
        keep = np.sort(rng.choice(keep, MAX_QUANTILES, replace=False))
    del bank["fold"]
    if score == "none":
        bank = {}
    elif score in ("distance", "model_spread", "depth"):
        bank = {k_: v for k_, v in bank.items() if k_ not in ("target", "residual")}
    elif score == "neighbour_spread":
        bank.pop("residual")
    else:
        bank.pop("target")
    info = {
        "folds": folds.how,
        "n_folds": int(fold.max() + 1),
        "k": int(k),
        "n_components": int(n_components),
        "distance_ref": distance_ref,
        "quantile_mode": quantile_mode,
        "n_training_spots": int(n_training),  # n_calibration of them were predicted (a bounded sample)
        "refit_seconds": round(t_fits, 2),
        "oof_pcc_mean": float(np.nanmean(expected)) if np.isfinite(expected).any() else None,
    }
    if folds.single_slide:
        logger.warning(
            "calibration: a single training slide, so the inner folds are spatial blocks of it; intervals and "
            "expected PCC are likely optimistic for other slides. Train on several slides (patients) to calibrate."
        )
    logger.info(
        f"calibrated {model.name}: {info['folds']}, score {score!r}, {target.shape[0]} calibration spots, "
        f"mean expected PCC {info['oof_pcc_mean']}, refits {t_fits:.1f} s"
    )
    return Calibration(
        score=score,
        scores=normalised[keep].astype(np.float32),
        groups=fold[keep].astype(np.int64),
        n_calibration=int(target.shape[0]),
        expected_pcc=expected,
        floor=floor.astype(np.float32),
        bank=bank,
        info=info,
    )


def _sampled(oof: dict[str, Any], train: SpotData) -> tuple[dict[str, Any], SpotData]:
    """``oof`` and ``train`` restricted to the spots the inner models predicted (``oof["rows"]``; all when absent).

    ``oof["mean"]`` / ``oof["spread"]`` already hold those spots only (:func:`out_of_fold`).
    """
    folds: InnerFolds = oof["folds"]
    rows = oof.get("rows")
    if rows is None or len(rows) == train.n_spots:
        return {**oof, "scoring_library": folds.scoring_library(train.library)}, train
    sub = {**oof, "fold": np.asarray(oof["fold"])[rows]}
    sub["scoring_library"] = folds.scoring_library(train.library)[rows]
    return sub, train.subset(rows)


def _floor(raw: np.ndarray) -> np.ndarray:
    """Per-gene floor added to the raw difficulty: a quarter of its median (a small positive number if that is 0)."""
    med = np.median(raw, axis=0)
    pos = raw[raw > 0]
    tiny = float(np.median(pos)) * 1e-3 if pos.size else 1.0
    return np.where(med > 0, 0.25 * med, 0.0) + max(tiny, 1e-6)
