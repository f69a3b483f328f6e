"""What a prediction can be trusted for, in a few lines: the slides' shift and the genes worth using."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._keys import PredictionKeys

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

#: Genes whose expected PCC on the slide reaches this are listed as worth using (``stexp predict``).
MIN_EXPECTED_PCC = 0.1
#: At most this many trusted genes are named.
MAX_NAMED = 10


def prediction_report(adata: AnnData, key: str, *, min_expected_pcc: float = MIN_EXPECTED_PCC) -> list[str]:
    """``shift`` and ``trusted`` lines for the prediction under ``key`` (``stexp predict``'s summary).

    The shift line gives each slide's shift score against the model's training range, and says when a
    slide lies beyond it. The trusted line names the genes whose expected PCC (after the slide's shift
    factor) reaches ``min_expected_pcc``; without a calibration it says that nothing is known.
    """
    keys = PredictionKeys(key)
    record = adata.uns.get("stexp", {}).get(key, {})
    lines = []
    shift = record.get("shift")
    if shift:
        for lib, s in shift["slides"].items():
            verdict = (
                "BEYOND the training range: predictions likely unreliable"
                if s["flagged"]
                else "within the training range"
            )
            lines.append(f"shift     {lib}: {s['score']:.2f} against {shift['training_range']}; {verdict}")
    else:
        lines.append("shift     not scored (the model has no shift reference)")
    resolution = record.get("resolution") or {}
    for lib, r in (resolution.get("slides") or {}).items():
        if r["coarser"]:
            lines.append(
                f"detail    {lib}: {r['detail_um_per_px']:.3g} µm/px, {r['times_coarser']:.1f} times coarser than the "
                f"training slides ({resolution['training_detail_um_per_px']:.3g} µm/px): predictions likely poorer; "
                f"try refitting on training slides embedded with mpp={r['detail_um_per_px']:.3g}"
            )
    compression = record.get("compression") or {}
    for lib, c in (compression.get("slides") or {}).items():
        if c["heavy"]:
            done = "deblocked before embedding, " if c.get("deblocked") else "not deblocked, "
            lines.append(
                f"jpeg      {lib}: block artefacts {c['jpeg_blockiness']:.2f} (1.0 none, about 1.5 at JPEG quality 30): "
                f"{done}predictions likely poorer; use a lossless or high-quality export if there is one"
            )
    if keys.expected_pcc not in adata.var:
        lines.append("trusted   unknown: the model is not calibrated (fit with calibrate=True to know which genes)")
        return lines
    expected = adata.var[keys.expected_pcc].dropna().sort_values(ascending=False)
    good = expected[expected >= min_expected_pcc]
    named = ", ".join(f"{g} ({v:.2f})" for g, v in good.iloc[:MAX_NAMED].items())
    more = f", and {len(good) - MAX_NAMED} more" if len(good) > MAX_NAMED else ""
    best = float(expected.iloc[0]) if len(expected) else np.nan
    if len(good):
        lines.append(
            f"trusted   {len(good)} of {len(expected)} genes with expected PCC >= {min_expected_pcc:g}: {named}{more}"
        )
    else:
        lines.append(
            f"trusted   none of {len(expected)} genes reaches expected PCC {min_expected_pcc:g} (best {best:.2f}); "
            "treat the prediction as exploratory"
        )
    return lines
