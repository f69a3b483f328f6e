"""The shift score: how far a slide's image features lie from a model's training data.

At fit (:func:`fit_shift_reference`), for every model: a bank of training spots (at most :data:`MAX_BANK`,
drawn evenly from every training slide) in a standardised feature space, and each training spot's
**out-of-fold distance**: its mean cosine distance to its :data:`K` nearest bank spots of the *other*
inner folds (:func:`stexp.models._folds.inner_folds`: other patients when there are several, else other
slides, else other spatial blocks of a single slide). That is how far a spot of a training slide lies from
training data it was not part of, i.e. what a new slide from the same source looks like.

At prediction (:meth:`ShiftReference.spot_scores`) a spot's score is its distance to its nearest bank spots
divided by the median out-of-fold distance: about 1 (or below, the bank holding every fold) for a new slide
like the training slides, larger the farther the slide's appearance (stain, scanner, resolution, tissue)
lies from them. A slide's score is the median of its spots'. The **training range** is the largest score
of a training slide held out of the bank (:attr:`ShiftReference.range_max`); a slide above
:data:`FLAG_FACTOR` times it is flagged: its predictions have no support in the training data, and the
expected PCC is scaled down by :func:`expected_pcc_factor` (measured on the shift protocol of
``benchmarks/shift.py``; ``docs/shift.md``).

Cost: one blocked matrix product of the query spots against at most :data:`MAX_BANK` bank rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stexp._settings import logger

from ._data import SpotData
from ._folds import inner_folds
from ._retrieval import _top_k
from ._scaling import feature_scaling, unit_rows

#: Nearest bank spots a spot's distance is averaged over.
K = 10
#: At most this many training spots form the bank (drawn evenly across slides).
MAX_BANK = 2000
#: Spots embedded at a time (fit and prediction read the features in blocks: no full-size temporary).
EMBED_BLOCK = 16_384
#: Principal components the bank is stored in (enough to keep the distances of the full standardised space).
N_COMPONENTS = 256
#: A slide whose score exceeds this multiple of the training range is flagged (``docs/shift.md``).
FLAG_FACTOR = 1.0
#: Slope of the expected-PCC factor beyond the training range (:func:`expected_pcc_factor`): the value that best
#: matched realised PCC over the renderings of ``benchmarks/shift.py`` (default pipeline, HER2+ LOPO; the top of
#: the grid searched; leave-one-kind-out it does not lower the error on an unseen kind, see ``docs/shift.md``).
DECAY = 6.0
#: Prefix of the shift arrays in a model folder's weights file.
STATE_PREFIX = "shift."


def expected_pcc_factor(score: float, range_max: float, decay: float = DECAY) -> float:
    """How much of the in-distribution expected PCC a slide of median score ``score`` keeps.

    1 within the training range; beyond it ``exp(-decay * (score / range_max - 1))``.
    """
    if not np.isfinite(score) or range_max <= 0:
        return float("nan")
    excess = max(0.0, float(score) / float(range_max) - 1.0)
    return float(np.exp(-decay * excess))


@dataclass
class ShiftReference:
    """What :func:`fit_shift_reference` keeps of the training data; see the module docstring.

    Attributes
    ----------
    mean, scale
        Feature standardisation of the training spots.
    components
        ``(c, n_features)``: principal axes of the standardised training features the bank lives in.
    bank
        ``(m, c)``: bank spots, projected, with unit rows.
    distance_scale
        Median out-of-fold distance of the training spots (a score of 1).
    slide_scores
        Each training slide's median out-of-fold score.
    info
        JSON-serialisable description (folds, bank size, k).
    """

    mean: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    components: np.ndarray = field(repr=False)
    bank: np.ndarray = field(repr=False)
    distance_scale: float
    slide_scores: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def range_max(self) -> float:
        """The largest score of a training slide held out of the bank: the edge of the training range."""
        return float(max(self.slide_scores.values()))

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Unit rows in the reference's PCA axes, :data:`EMBED_BLOCK` spots at a time (features may be on disk)."""
        out = np.empty((features.shape[0], self.components.shape[0]), dtype=np.float32)
        for s in range(0, features.shape[0], EMBED_BLOCK):
            Z = (np.asarray(features[s : s + EMBED_BLOCK], dtype=np.float32) - self.mean) / self.scale
            out[s : s + EMBED_BLOCK] = unit_rows(Z @ self.components.T)
        return out

    def spot_scores(self, features: np.ndarray) -> np.ndarray:
        """Per spot: mean cosine distance to the :data:`K` nearest bank spots over :attr:`distance_scale`."""
        return _distances(self.embed(features), self.bank, int(self.info.get("k", K))) / self.distance_scale

    def summary(self, scores: np.ndarray, library: np.ndarray) -> dict[str, dict[str, Any]]:
        """Per slide: median score, whether it is beyond the training range, and its expected-PCC factor."""
        out = {}
        library = np.asarray(library).astype(str)
        for lib in dict.fromkeys(library.tolist()):
            median = float(np.median(scores[library == lib]))
            out[lib] = {
                "score": round(median, 4),
                "flagged": bool(median > FLAG_FACTOR * self.range_max),
                "expected_pcc_factor": round(expected_pcc_factor(median, self.range_max), 4),
                "range_max": self.range_max,
            }
        return out

    def describe_range(self) -> str:
        """``"training slides 0.91-1.12 (3 folds by patients)"``."""
        values = list(self.slide_scores.values())
        return f"training slides {min(values):.2f}-{max(values):.2f} ({self.info.get('folds', '?')})"

    # -- saving -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"distance_scale": self.distance_scale, "slide_scores": dict(self.slide_scores), **self.info}

    def state(self) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "scale": self.scale, "components": self.components, "bank": self.bank}
        return {STATE_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    @classmethod
    def from_saved(cls, config: dict[str, Any], state: dict[str, np.ndarray]) -> ShiftReference:
        arrays = {k[len(STATE_PREFIX) :]: np.asarray(v) for k, v in state.items() if k.startswith(STATE_PREFIX)}
        missing = [k for k in ("mean", "scale", "components", "bank") if k not in arrays]
        if missing:
            raise ValueError(f"the model's shift reference lacks {missing}: the model folder is inconsistent.")
        info = {k: v for k, v in config.items() if k not in ("distance_scale", "slide_scores")}
        return cls(
            mean=arrays["mean"],
            scale=arrays["scale"],
            components=arrays["components"],
            bank=arrays["bank"],
            distance_scale=float(config["distance_scale"]),
            slide_scores={str(k): float(v) for k, v in config["slide_scores"].items()},
            info=info,
        )


def split_state(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The other arrays and the shift arrays of a saved state."""
    own = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    return own, {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}


def _distances(query: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each (unit) query row to its ``k`` most similar (unit) bank rows."""
    k = max(1, min(int(k), bank.shape[0]))
    out = np.empty(query.shape[0], dtype=np.float64)
    for rows, _, sim in _top_k(query, bank, k, chunk=2048):
        out[rows] = 1.0 - sim.mean(axis=1)
    return out


def _bank_rows(library: np.ndarray, n_max: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n_max`` rows, the same share from every slide (all rows when there are few)."""
    n = library.size
    if n <= n_max:
        return np.arange(n)
    libs = np.unique(library)
    per = max(1, n_max // libs.size)
    rows = [
        rng.choice(np.flatnonzero(library == lib), min(per, int((library == lib).sum())), replace=False) for lib in libs
    ]
    return np.sort(np.concatenate(rows))


def fit_shift_reference(train: SpotData, *, seed: int = 0, k: int = K) -> ShiftReference | None:
    """The shift reference of ``train`` (``None``, logged, when there are too few spots or folds)."""
    features = np.asarray(train.features, dtype=np.float32)
    if features.ndim != 2 or train.n_spots < 4:
        logger.debug("shift reference: too few training spots")
        return None
    try:
        folds = inner_folds(train)
    except ValueError as err:
        logger.info(f"no shift reference ({err}); predictions will not be scored for shift.")
        return None
    rng = np.random.default_rng(seed)
    library = np.asarray(train.library).astype(str)
    rows = _bank_rows(library, MAX_BANK, rng)
    mean, scale = feature_scaling(features[rows].astype(np.float64))
    Z = (features[rows] - mean) / scale
    n_comp = int(max(1, min(N_COMPONENTS, Z.shape[0] - 1, Z.shape[1])))
    _, _, vt = np.linalg.svd(Z - Z.mean(axis=0), full_matrices=False)
    ref = ShiftReference(
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        components=vt[:n_comp].astype(np.float32),
        bank=np.empty((0, n_comp), dtype=np.float32),
        distance_scale=1.0,
        slide_scores={},
        info={"k": int(k), "folds": folds.how, "n_bank": int(rows.size), "n_components": n_comp},
    )
    ref.bank = ref.embed(features[rows])
    bank_fold = folds.fold[rows]
    others = {f: ref.bank[bank_fold != f] for f in np.unique(folds.fold)}  # each fold's bank: the other folds
    oof = np.full(train.n_spots, np.nan)
    for start in range(0, train.n_spots, EMBED_BLOCK):  # every spot against the bank of the other folds
        block = slice(start, start + EMBED_BLOCK)
        embedded, fold = ref.embed(features[block]), folds.fold[block]
        for f in np.unique(fold):
            if others[f].shape[0]:
                oof[start + np.flatnonzero(fold == f)] = _distances(embedded[fold == f], others[f], k)
    if np.isnan(oof).all():
        return None
    ref.distance_scale = float(np.nanmedian(oof)) or 1.0
    scores = oof / ref.distance_scale
    scoring = np.asarray(folds.scoring_library(train.library)).astype(str)
    ref.slide_scores = {
        lib: round(float(np.nanmedian(scores[scoring == lib])), 4)
        for lib in dict.fromkeys(scoring.tolist())
        if np.isfinite(scores[scoring == lib]).any()
    }
    if folds.single_slide:
        logger.info(
            "shift reference: a single training slide, so its range comes from spatial blocks of it; "
            "every other slide will likely score beyond it."
        )
    return ref
