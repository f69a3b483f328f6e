"""The names of one prediction and its companions, in one place (squidpy's ``Key`` style).

A prediction under ``key`` is a set of entries that belong together:

- ``key`` (the mean), ``key_std`` (spread, a model that gives one), ``key_lo`` and ``key_hi`` (interval
  bounds, ``predict(coverage=)``): ``adata.layers`` or ``adata.obsm`` gene DataFrames, by the rule of
  :mod:`stexp.tl._storage`;
- ``adata.var["key_expected_pcc"]`` (a calibrated model) and ``adata.var["key_pcc"]`` (written by
  :func:`stexp.tl.evaluate`);
- ``adata.obs["key_shift"]``: how far each spot lies from the training data (``stexp.models._shift``);
- the record ``adata.uns["stexp"][key]`` and the scores ``adata.uns["stexp"]["evaluate"][key]``.

Rule: a new prediction under a key replaces the whole set. :func:`write_prediction_set` first removes
every entry of the key (:func:`clear_prediction`, in both storages), then writes what the new model
gives, so nothing of a previous model (its intervals, its expected PCC, its scores) stays beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._layout import UNS_KEY
from stexp._layout import record as record_step
from stexp._settings import logger

from ._storage import _is_frame, write_prediction

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


@dataclass(frozen=True)
class PredictionKeys:
    """The names of a prediction under ``key`` and of everything that belongs to it.

    Parameters
    ----------
    key
        Key of the prediction (``key_added`` of :func:`stexp.tl.predict`).

    Examples
    --------
    >>> keys = PredictionKeys("stexp_pred")
    >>> keys.lo, keys.expected_pcc
    ('stexp_pred_lo', 'stexp_pred_expected_pcc')
    """

    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"a prediction key must be a non-empty string, got {self.key!r}.")

    @property
    def mean(self) -> str:
        """The prediction itself (a layer or an ``obsm`` gene DataFrame)."""
        return self.key

    @property
    def std(self) -> str:
        """Per-spot, per-gene spread of the prediction (same storage as the mean)."""
        return f"{self.key}_std"

    @property
    def lo(self) -> str:
        """Lower bound of the conformal interval (same storage as the mean)."""
        return f"{self.key}_lo"

    @property
    def hi(self) -> str:
        """Upper bound of the conformal interval (same storage as the mean)."""
        return f"{self.key}_hi"

    @property
    def expected_pcc(self) -> str:
        """``adata.var`` column: each gene's expected PCC on a new slide (calibrated models)."""
        return f"{self.key}_expected_pcc"

    @property
    def shift(self) -> str:
        """``adata.obs`` column: how far each spot lies from the model's training data (the shift score)."""
        return f"{self.key}_shift"

    @property
    def pcc(self) -> str:
        """``adata.var`` column written by :func:`stexp.tl.evaluate`: per-gene PCC averaged over slides."""
        return f"{self.key}_pcc"

    @property
    def arrays(self) -> tuple[str, ...]:
        """Spots x genes entries, stored by :func:`~stexp.tl._storage.write_prediction` (layer or ``obsm``)."""
        return (self.mean, self.std, self.lo, self.hi)

    @property
    def var_columns(self) -> tuple[str, ...]:
        """``adata.var`` columns of the set."""
        return (self.expected_pcc, self.pcc)

    @property
    def obs_columns(self) -> tuple[str, ...]:
        """``adata.obs`` columns of the set."""
        return (self.shift,)

    @property
    def companions(self) -> tuple[str, ...]:
        """What a prediction writes beside its mean: ``std``, ``lo``, ``hi``, ``expected_pcc``, ``shift``."""
        return (self.std, self.lo, self.hi, self.expected_pcc, self.shift)

    def __iter__(self) -> Iterator[str]:
        """Every name of the set: the mean, its companions, then ``evaluate``'s ``pcc`` column."""
        return iter((self.mean, *self.companions, self.pcc))


def clear_prediction(adata: AnnData, key: str) -> list[str]:
    """Remove the prediction under ``key`` and everything that belongs to it.

    Removes, where present: the mean, ``_std``, ``_lo`` and ``_hi`` from ``adata.layers`` and from
    ``adata.obsm`` (gene DataFrames), the ``var`` columns ``_expected_pcc`` and ``_pcc``, the ``obs``
    column ``_shift``, the record ``adata.uns["stexp"][key]`` and the scores
    ``adata.uns["stexp"]["evaluate"][key]``. Other keys are not touched.

    Parameters
    ----------
    adata
        AnnData holding the prediction.
    key
        Key of the prediction.

    Returns
    -------
    What was removed, for messages (e.g. ``["adata.layers['stexp_pred_lo']", ...]``); empty if nothing.
    """
    keys = PredictionKeys(key)
    removed: list[str] = []
    for name in keys.arrays:
        if name in adata.layers:
            del adata.layers[name]
            removed.append(f"adata.layers[{name!r}]")
        if _is_frame(adata, name):
            del adata.obsm[name]
            removed.append(f"adata.obsm[{name!r}]")
    for frame, label, names in (("var", "adata.var", keys.var_columns), ("obs", "adata.obs", keys.obs_columns)):
        table = getattr(adata, frame)
        present = [name for name in names if name in table.columns]
        if present:
            setattr(adata, frame, table.drop(columns=present))
            removed += [f"{label}[{name!r}]" for name in present]
    uns = adata.uns.get(UNS_KEY, {})
    if key in uns:
        del uns[key]
        removed.append(f"adata.uns[{UNS_KEY!r}][{key!r}]")
    scores = uns.get("evaluate", {})
    if key in scores:
        del scores[key]
        removed.append(f"adata.uns[{UNS_KEY!r}]['evaluate'][{key!r}]")
    return removed


def write_prediction_set(
    adata: AnnData,
    key: str,
    genes: Sequence[str],
    mean: Any,
    *,
    std: Any | None = None,
    lo: Any | None = None,
    hi: Any | None = None,
    expected_pcc: Any | None = None,
    shift: Any | None = None,
    record: Mapping[str, Any] | None = None,
) -> list[str]:
    """Replace the prediction under ``key`` with a new one, written together.

    First removes every entry of ``key`` (:func:`clear_prediction`; what the new prediction does not write
    again is logged), then writes what is given: the arrays where :func:`~stexp.tl._storage.write_prediction`
    puts them (a layer when ``genes`` are ``adata.var_names``, else an ``obsm`` gene DataFrame), the
    expected PCC as an ``adata.var`` column (NaN outside ``genes``; genes not in ``var`` are dropped), the
    shift as an ``adata.obs`` column and the record in ``adata.uns["stexp"][key]``.

    Parameters
    ----------
    adata
        AnnData to write into.
    key
        Key of the prediction.
    genes
        The predicted genes, one per column of ``mean`` (and of ``std``, ``lo``, ``hi``).
    mean
        Predicted expression, ``n_obs x len(genes)``.
    std
        Per-spot spread, same shape, or ``None``.
    lo, hi
        Interval bounds, same shape; both or neither.
    expected_pcc
        Expected PCC of each of ``genes`` (length ``len(genes)``), or ``None``.
    shift
        Per-spot shift score (length ``n_obs``), or ``None``.
    record
        Parameters recorded with :func:`stexp._layout.record` under ``adata.uns["stexp"][key]``, or ``None``.

    Returns
    -------
    Where each entry went (e.g. ``["adata.layers['stexp_pred']", "adata.var['stexp_pred_expected_pcc']"]``),
    the record left out.

    Raises
    ------
    ValueError
        If only one of ``lo`` / ``hi`` is given, or a shape does not match.
    """
    keys = PredictionKeys(key)
    if (lo is None) != (hi is None):
        raise ValueError(f"prediction {key!r}: interval bounds lo and hi go together; got only one.")
    genes = [str(g) for g in genes]
    for name, values in ((keys.mean, mean), (keys.std, std), (keys.lo, lo), (keys.hi, hi)):
        # checked before anything is removed, so a bad call leaves the previous prediction whole
        if values is not None and np.shape(values) != (adata.n_obs, len(genes)):
            raise ValueError(
                f"prediction {name!r}: values have shape {np.shape(values)}, expected (n_obs, n_genes) = "
                f"{(adata.n_obs, len(genes))}."
            )
    if len(set(genes)) != len(genes):
        raise ValueError(f"prediction {key!r}: genes repeat.")
    if expected_pcc is not None:
        expected_pcc = np.asarray(expected_pcc, dtype=np.float64).ravel()
        if expected_pcc.shape != (len(genes),):
            raise ValueError(f"prediction {key!r}: expected_pcc has {expected_pcc.size} values for {len(genes)} genes.")
    if shift is not None:
        shift = np.asarray(shift, dtype=np.float64).ravel()
        if shift.shape != (adata.n_obs,):
            raise ValueError(f"prediction {key!r}: shift has {shift.size} values for {adata.n_obs} spots.")

    removed = clear_prediction(adata, key)
    added = [write_prediction(adata, keys.mean, genes, mean)]
    for name, values in ((keys.std, std), (keys.lo, lo), (keys.hi, hi)):
        if values is not None:
            added.append(write_prediction(adata, name, genes, values))
    if expected_pcc is not None:
        var_idx = adata.var_names.get_indexer(genes)
        present = var_idx >= 0
        column = np.full(adata.n_vars, np.nan)
        column[var_idx[present]] = expected_pcc[present]
        adata.var[keys.expected_pcc] = column
        added.append(f"adata.var[{keys.expected_pcc!r}]")
    if shift is not None:
        adata.obs[keys.shift] = shift
        added.append(f"adata.obs[{keys.shift!r}]")
    if record is not None:
        record_step(adata, key, record)

    rewritten = {*added, f"adata.uns[{UNS_KEY!r}][{key!r}]"} if record is not None else set(added)
    stale = [entry for entry in removed if entry not in rewritten]
    if stale:
        logger.info(f"removed {', '.join(stale)}: left by the previous prediction {key!r}, not written by this one")
    return added
