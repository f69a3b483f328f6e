"""Model cards: what a model was trained on, how well it does, what it is for and where it fails.

Every model carries a :class:`ModelCard` (``model.card``), saved in its folder's ``model.json`` (under
``"card"``, so the folder's checksum covers it) and printed by :func:`stexp.models.describe`.
:func:`stexp.tl.fit` fills what it knows (:meth:`ModelCard.from_fit`): the training slides, spots,
patients, pixel sizes, genes, encoder, recipe, calibration, date and stexp version. The rest is text the
trainer adds before saving: ``model.card.intended_use``, ``model.card.limits``, ``model.card.extra`` (free
text), ``model.card.training_data["citation"]``..., and the protocol figures (``model.card.figures``,
e.g. from :func:`stexp.tl.cross_validate`). ``model.card.shift`` holds the summary of the model's
shift reference (how far a new slide's spots may lie from the training spots).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ._base import ExpressionModel

#: The expected per-gene PCC above which :meth:`ModelCard.to_text` lists a gene as one to trust.
TRUST_PCC = 0.3
#: Genes named per line of :meth:`ModelCard.to_text`.
_SHOWN_GENES = 12


@dataclass
class ModelCard:
    """A model's card: training data, encoder, genes, figures, intended use, limits, free text.

    Attributes
    ----------
    name
        The model's name (with its version for a released model, e.g. ``"her2st-breast-v1"``).
    summary
        One line: what the model predicts from what.
    training_data
        What :func:`stexp.tl.fit` trained on: ``libraries`` (with ``spots``, ``um_per_px``,
        ``spot_diameter_um`` and ``patient`` each), ``n_spots``, ``patients``; the trainer adds
        ``platform``, ``tissue``, ``citation``, ``licence``, ``source``.
    encoder
        The image encoder and patch spec (from the features' :class:`~stexp.images.EncoderSpec`).
    genes
        ``n_genes``, the ``target`` transform and optionally the ``panel`` it came from.
    recipe
        The recipe as :func:`stexp.tl.fit` ran it (model, hyper-parameters, smoothing, calibration).
    calibration
        Summary of the calibration: calibration spots, inner folds, expected per-gene PCC quantiles and
        how many genes clear :data:`TRUST_PCC`.
    figures
        Protocol figures by protocol name (e.g. ``"lopo"``, ``"loso"``): each a mapping with
        ``description``, the means over held-out slides (``pcc_acg``, ``pcc_heg``, ``pcc_hvg``, ``mse``)
        and ``per_slide`` rows.
    shift
        The shift reference's summary (its scores on the training slides and what they mean); filled
        where the model carries a shift reference.
    intended_use
        What the model is for.
    limits
        Known limits, one sentence each.
    extra
        Free text of the trainer or user.
    created
        Date and time of the fit (UTC, ISO 8601).
    stexp_version
        The stexp that trained the model.
    """

    name: str | None = None
    summary: str | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    genes: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    shift: dict[str, Any] = field(default_factory=dict)
    intended_use: str | None = None
    limits: list[str] = field(default_factory=list)
    extra: str | None = None
    created: str | None = None
    stexp_version: str | None = None

    # -- saving -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None) -> ModelCard:
        """From :meth:`to_dict` (``None``, from a folder saved before cards existed: an empty card).

        Raises
        ------
        ValueError
            If ``mapping`` is not a mapping or a field has the wrong kind of value.
        """
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise ValueError(f"a model card must be a JSON object, got {type(mapping).__name__}.")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in mapping.items() if k in names}  # keys of newer stexps are dropped
        for key in ("training_data", "encoder", "genes", "recipe", "calibration", "figures", "shift"):
            if values.get(key) is None:
                values.pop(key, None)
            elif not isinstance(values[key], Mapping):
                raise ValueError(f"model card field {key!r} must be a JSON object, got {values[key]!r}.")
            else:
                values[key] = dict(values[key])
        limits = values.get("limits")
        if isinstance(limits, str):
            values["limits"] = [limits]
        elif limits is None:
            values.pop("limits", None)
        elif not isinstance(limits, Sequence):
            raise ValueError(f"model card field 'limits' must be a list of sentences, got {limits!r}.")
        else:
            values["limits"] = [str(x) for x in limits]
        return cls(**values)

    # -- what fit knows ----------------------------------------------------------------------------
    @classmethod
    def from_fit(cls, model: ExpressionModel, *, libraries: Mapping[str, Mapping[str, Any]]) -> ModelCard:
        """The card :func:`stexp.tl.fit` writes: what it knows of the training data and the model.

        Parameters
        ----------
        model
            The fitted model (genes, encoder spec, recipe, calibration are read from it).
        libraries
            Per training library: ``spots`` and, where known, ``patient``, ``um_per_px``, ``spot_diameter_um``.
        """
        from stexp import __version__

        libs = {str(k): _jsonable(dict(v)) for k, v in libraries.items()}
        patients = sorted({str(v["patient"]) for v in libs.values() if v.get("patient") is not None})
        training = {"libraries": libs, "n_spots": int(sum(int(v.get("spots", 0)) for v in libs.values()))}
        if patients:
            training["patients"] = patients
        spec = model.encoder_spec.to_uns() if model.encoder_spec else {}
        from stexp.images._spec import VIEW_FIELDS

        described = ("encoder", "weights", "encoder_kwargs", "patch_um", "patch_px", "normalization", "out_dim")
        encoder: dict[str, Any] = {k: spec[k] for k in (*described, *VIEW_FIELDS) if k in spec}
        if model.features_key:
            encoder["features_key"] = model.features_key
        recipe = model.recipe.to_dict() if model.recipe is not None else {"model": model.name}
        return cls(
            training_data=training,
            encoder=_jsonable(encoder),
            genes={"n_genes": len(model.genes), "target": "log1p of counts per 10,000 (natural log)"},
            recipe=_jsonable(recipe),
            calibration=calibration_summary(model),
            shift=shift_summary(model),
            created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
            stexp_version=__version__,
        )

    # -- reading -----------------------------------------------------------------------------------
    def to_text(self, model: ExpressionModel | None = None, *, threshold: float = TRUST_PCC) -> str:
        """The card as text (what :func:`stexp.models.describe` prints).

        With ``model``, its genes are named: those whose expected PCC (its calibration) clears ``threshold``.
        """
        title = self.name or (model.name if model is not None else "model")
        lines = [f"Model card: {title}"]
        if self.summary:
            lines.append(self.summary)
        lines.append("")
        lines += _section("Training data", _training_lines(self.training_data))
        lines += _section("Image encoder", _mapping_lines(self.encoder))
        lines += _section("Genes", _gene_lines(self.genes, model, threshold))
        if self.recipe:
            lines += _section("Recipe", [_recipe_line(self.recipe)])
        lines += _section("Calibration", _mapping_lines(self.calibration))
        lines += _section("Figures (held-out slides)", _figure_lines(self.figures))
        lines += _section("Shift reference", _mapping_lines(self.shift))
        if self.intended_use:
            lines += _section("Intended use", [self.intended_use])
        lines += _section("Known limits", [f"- {x}" for x in self.limits])
        if self.extra:
            lines += _section("Notes", [self.extra])
        made = ", ".join(x for x in (self.created and f"trained {self.created}",
                                     self.stexp_version and f"stexp {self.stexp_version}") if x)  # fmt: skip
        if made:
            lines.append(made)
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.to_text()


def calibration_summary(model: ExpressionModel, threshold: float = TRUST_PCC) -> dict[str, Any]:
    """What a card says of a model's calibration: spots, folds, expected-PCC quantiles, genes above ``threshold``."""
    cal = getattr(model, "calibration", None)
    if cal is None:
        return {}
    pcc = np.asarray(cal.expected_pcc, dtype=float)
    finite = pcc[np.isfinite(pcc)]
    out: dict[str, Any] = {"n_calibration": int(cal.n_calibration), "score": cal.score}
    if "folds" in cal.info:
        out["folds"] = cal.info["folds"]
    if finite.size:
        q = np.quantile(finite, [0.1, 0.5, 0.9])
        out["expected_pcc"] = {"p10": round(q[0], 3), "median": round(q[1], 3), "p90": round(q[2], 3)}
        out[f"genes_expected_pcc_ge_{threshold:g}"] = int((finite >= threshold).sum())
    return _jsonable(out)


def trusted_genes(model: ExpressionModel, threshold: float = TRUST_PCC) -> list[tuple[str, float]]:
    """``(gene, expected PCC)`` of the genes whose expected PCC clears ``threshold``, best first (none uncalibrated)."""
    cal = getattr(model, "calibration", None)
    if cal is None:
        return []
    pcc = np.asarray(cal.expected_pcc, dtype=float)
    order = np.argsort(-np.nan_to_num(pcc, nan=-np.inf), kind="stable")
    return [(str(model.genes[i]), float(pcc[i])) for i in order if np.isfinite(pcc[i]) and pcc[i] >= threshold]


def describe(model: ExpressionModel | str, *, threshold: float = TRUST_PCC) -> None:
    """Print the model card of a model, a model folder or a registered pretrained model.

    Parameters
    ----------
    model
        A model, a model folder, or a name of :func:`stexp.models.pretrained` (e.g. ``"her2st-breast"``).
    threshold
        Genes whose expected per-gene PCC on a new slide (the calibration's) is at least this are listed as
        the ones to trust.
    """
    from ._base import ExpressionModel

    if not isinstance(model, ExpressionModel):
        from ._pretrained import load

        model = load(model, device="cpu")
    print(model.card.to_text(model, threshold=threshold), end="")


# -- helpers ---------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays and tuples as JSON values; non-finite floats as ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _section(title: str, body: list[str]) -> list[str]:
    return [f"{title}:", *[f"  {line}" for line in body], ""] if body else []


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _mapping_lines(mapping: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {_fmt(v)}" for k, v in mapping.items() if v is not None and v != {} and v != []]


def _training_lines(data: Mapping[str, Any]) -> list[str]:
    libs = data.get("libraries") or {}
    lines = []
    if libs:
        lines.append(f"{len(libs)} slide(s), {data.get('n_spots', '?')} spots" + (
            f", patients {', '.join(data['patients'])}" if data.get("patients") else ""))  # fmt: skip
        for lib, info in libs.items():
            lines.append(f"  {lib}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in info.items()))
    lines += _mapping_lines({k: v for k, v in data.items() if k not in ("libraries", "n_spots", "patients")})
    return lines


def _gene_lines(genes: Mapping[str, Any], model: ExpressionModel | None, threshold: float) -> list[str]:
    lines = _mapping_lines(genes)
    if model is None:
        return lines
    if genes.get("n_genes") is None:
        lines.insert(0, f"n_genes: {len(model.genes)}")
    lines.append(
        "first: " + ", ".join(model.genes[:_SHOWN_GENES]) + (" ..." if len(model.genes) > _SHOWN_GENES else "")
    )
    if model.calibration is None:
        lines.append("expected PCC per gene: not calibrated (fit with calibrate=True)")
        return lines
    trusted = trusted_genes(model, threshold)
    shown = ", ".join(f"{g} {p:.2f}" for g, p in trusted[:_SHOWN_GENES])
    lines.append(
        f"{len(trusted)} gene(s) with expected PCC >= {threshold:g} on a new slide"
        + (f": {shown}" + (" ..." if len(trusted) > _SHOWN_GENES else "") if trusted else "")
    )
    return lines


def _recipe_line(recipe: Mapping[str, Any]) -> str:
    hp = recipe.get("hparams") or {}
    parts = [str(recipe.get("model", "?"))]
    if hp:
        parts.append("(" + ", ".join(f"{k}={v}" for k, v in hp.items()) + ")")
    for key in ("smoothing", "calibrate"):
        if recipe.get(key) is not None:
            parts.append(f"{key}={recipe[key]}")
    return " ".join(parts)


def _figure_lines(figures: Mapping[str, Any]) -> list[str]:
    lines = []
    for protocol, fig in figures.items():
        if not isinstance(fig, Mapping):
            lines.append(f"{protocol}: {_fmt(fig)}")
            continue
        means = ", ".join(f"{k} {_fmt(fig[k])}" for k in ("pcc_acg", "pcc_heg", "pcc_hvg", "mse") if k in fig)
        lines.append(f"{protocol}: {means}" + (f" ({fig['description']})" if fig.get("description") else ""))
        for row in fig.get("per_slide") or []:
            lines.append("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
    return lines


def shift_summary(model: ExpressionModel) -> dict[str, Any]:
    """The card's account of the model's shift reference (``stexp.models._shift``); empty without one."""
    reference = getattr(model, "shift", None)
    if reference is None:
        return {}
    from ._shift import FLAG_FACTOR

    return {
        "training slides (held-out score)": dict(reference.slide_scores),
        "training range": reference.describe_range(),
        "meaning": "a query slide's shift score is the median distance of its spots to the nearest training spots "
        "in image-feature space, in units of the training slides' own held-out distance; above "
        f"{FLAG_FACTOR:g} x the training range's top the slide is flagged and its expected PCC scaled down",
        "folds": reference.info.get("folds"),
        "bank spots": reference.info.get("n_bank"),
    }
