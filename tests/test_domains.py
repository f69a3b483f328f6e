"""Spatial domains from (predicted) expression and their agreement with an annotation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

import stexp
from stexp.pp._target import expression_target

HAS_LEIDEN = any(importlib.util.find_spec(m) is not None for m in ("igraph", "leidenalg"))


@pytest.fixture(autouse=True)
def _one_thread():
    """k-means' OpenMP threads crawl when other jobs share the two cores: use one."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def test_kmeans_on_measured_target_recovers_domains(synth):
    n_true = synth.obs["domain"].nunique()
    stexp.tl.domains(synth, layer=None, n_domains=n_true)
    dom = synth.obs["stexp_domain"]
    assert isinstance(dom.dtype, pd.CategoricalDtype)
    assert list(dom.cat.categories) == [str(i) for i in range(n_true)]
    sizes = dom.value_counts(sort=False).to_numpy()
    assert (np.diff(sizes) <= 0).all()  # numbered from the largest domain
    table = stexp.tl.score_domains(synth, truth_key="domain")
    assert list(table.index) == ["slide_0", "slide_1", "slide_2"]
    assert (table["n_spots"] == 144).all()
    # the synthetic domains drive expression: clustering the truth must find them (ARI ~0.98-1 here)
    assert table["ari"].min() > 0.9 and table["nmi"].min() > 0.9
    rec = synth.uns["stexp"]["stexp_domain"]
    assert rec["n_domains"] == n_true and rec["method"] == "kmeans" and rec["n_genes"] == synth.n_vars


def test_silhouette_picks_the_true_number_of_domains(synth):
    stexp.tl.domains(synth, layer=None)
    rec = synth.uns["stexp"]["stexp_domain"]
    sil = {int(k): v for k, v in rec["silhouette"].items()}
    assert sorted(sil) == list(range(2, 11))
    assert rec["n_domains"] == max(sil, key=sil.get) == synth.obs["domain"].nunique()


def test_clusters_predictions_and_drops_genes_outside_the_panel(synth):
    target = expression_target(synth)
    rng = np.random.default_rng(0)
    pred = (target + rng.normal(0, 0.8, target.shape)).astype(np.float32)
    pred[:, :10] = np.nan  # genes outside the model's panel
    synth.layers["stexp_pred"] = pred
    out = stexp.tl.domains(synth, n_domains=4, copy=True)
    assert "stexp_domain" not in synth.obs  # copy=True leaves the input alone
    assert out.uns["stexp"]["stexp_domain"]["n_genes"] == synth.n_vars - 10
    ari = stexp.tl.score_domains(out, truth_key="domain")["ari"]
    assert ari.mean() > 0.7  # noisy predictions still carry the domains

    genes = list(synth.var_names[10:30])
    stexp.tl.domains(synth, n_domains=4, genes=genes, key_added="dom_sub")
    assert synth.uns["stexp"]["dom_sub"]["n_genes"] == 20


def test_same_seed_same_domains(synth):
    a = stexp.tl.domains(synth, layer=None, n_domains=3, seed=3, copy=True).obs["stexp_domain"]
    b = stexp.tl.domains(synth, layer=None, n_domains=3, seed=3, copy=True).obs["stexp_domain"]
    assert (a == b).all()


@pytest.mark.skipif(not HAS_LEIDEN, reason="needs python-igraph or leidenalg")
def test_leiden(synth):
    stexp.tl.domains(synth, layer=None, method="leiden", resolution=0.5)
    table = stexp.tl.score_domains(synth, truth_key="domain")
    assert table["ari"].mean() > 0.7
    coarse = synth.obs["stexp_domain"].nunique()
    stexp.tl.domains(synth, layer=None, method="leiden", resolution=2.0)
    assert synth.obs["stexp_domain"].nunique() > coarse  # resolution controls the number of domains


def test_domains_bad_input(synth):
    with pytest.raises(KeyError, match="stexp_pred"):
        stexp.tl.domains(synth)
    with pytest.raises(KeyError, match="nope"):
        stexp.tl.domains(synth, layer=None, genes=["gene_000", "nope"])
    with pytest.raises(ValueError, match="method"):
        stexp.tl.domains(synth, layer=None, method="louvain")
    with pytest.raises(ValueError, match="resolution"):
        stexp.tl.domains(synth, layer=None, method="leiden", n_domains=3)
    with pytest.raises(ValueError, match="n_domains"):
        stexp.tl.domains(synth, layer=None, n_domains=1)
    synth.layers["stexp_pred"] = np.full(synth.shape, np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN for every gene"):
        stexp.tl.domains(synth)
    synth.layers["stexp_pred"][:, :5] = 1.0
    synth.layers["stexp_pred"][7, 2] = np.nan
    with pytest.raises(ValueError, match="1 of 432 spots"):
        stexp.tl.domains(synth)
    synth.uns["stexp"] = {"unmeasured": True}
    with pytest.raises(ValueError, match="unmeasured"):
        stexp.tl.domains(synth, layer=None)


def test_score_domains_leaves_out_missing_and_ignored_labels(synth):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    synth.obs["stexp_domain"] = pd.Categorical(rng.integers(0, 3, synth.n_obs).astype(str))
    label = synth.obs["domain"].astype(object).to_numpy()
    label[:10] = "Undetermined"  # matched case-insensitively
    label[10:15] = None
    synth.obs["label"] = pd.Categorical(label)
    table = stexp.tl.score_domains(synth)
    keep = np.ones(synth.n_obs, dtype=bool)
    keep[:15] = False
    lib0 = keep & (synth.obs["library_id"] == "slide_0").to_numpy()
    assert table.loc["slide_0", "n_spots"] == lib0.sum() == 144 - 15
    truth, pred = synth.obs["label"].astype(str)[lib0], synth.obs["stexp_domain"].astype(str)[lib0]
    assert table.loc["slide_0", "ari"] == pytest.approx(adjusted_rand_score(truth, pred))
    assert table.loc["slide_0", "nmi"] == pytest.approx(normalized_mutual_info_score(truth, pred))
    assert abs(table["ari"]).max() < 0.1  # random domains do not agree with the annotation
    assert table.loc["slide_1", "n_spots"] == 144

    everything = stexp.tl.score_domains(synth, ignore=())
    assert everything.loc["slide_0", "n_spots"] == 144 - 5

    with pytest.raises(KeyError, match="'nope'"):
        stexp.tl.score_domains(synth, truth_key="nope")
    with pytest.raises(KeyError, match="'missing'"):
        stexp.tl.score_domains(synth, key="missing")


# -- never silently fewer domains than asked for ---------------------------------------------------------------


@pytest.mark.parametrize("n_domains", [None, 2, 3])
def test_constant_expression_refused_alike(synth, n_domains):
    synth.layers["stexp_pred"] = np.ones((synth.n_obs, synth.n_vars), dtype=np.float32)
    with pytest.raises(ValueError, match=r"cannot find n_domains=.* only 1 distinct spot profile\(s\) among 432 spots"):
        stexp.tl.domains(synth, n_domains=n_domains)
    assert "stexp_domain" not in synth.obs


def test_fewer_profiles_than_domains_refused(synth):
    pred = np.zeros((synth.n_obs, 5), dtype=np.float32)
    pred[::2] = 1.0  # two distinct profiles
    synth.layers["stexp_pred"] = np.pad(pred, ((0, 0), (0, synth.n_vars - 5)), constant_values=np.nan)
    with pytest.raises(ValueError, match=r"n_domains=3 domains: the expression has only 2 distinct"):
        stexp.tl.domains(synth, n_domains=3)
    stexp.tl.domains(synth, n_domains=2)
    assert synth.obs["stexp_domain"].nunique() == 2
    stexp.tl.domains(synth, n_domains=None, key_added="auto")  # the search stops at 2 profiles: 2 domains
    assert synth.obs["auto"].nunique() == 2 and set(synth.uns["stexp"]["auto"]["silhouette"]) == {"2"}


@pytest.mark.parametrize(
    ("n_domains", "error"),
    [(1, ValueError), (432, ValueError), (10_000, ValueError), (2.5, TypeError), ("3", TypeError), (True, TypeError)],
)
def test_bad_n_domains(synth, n_domains, error):
    with pytest.raises(error, match="n_domains must be"):
        stexp.tl.domains(synth, layer=None, n_domains=n_domains)


def test_infinite_prediction_refused_not_dropped(synth):
    pred = expression_target(synth)
    pred[:, 4] = np.inf  # a gene whose every value is infinite is not 'outside the panel'
    synth.layers["stexp_pred"] = pred
    with pytest.raises(ValueError, match="432 of 432 spots have NaN or infinite values"):
        stexp.tl.domains(synth, n_domains=3)


def test_nan_spot_in_prediction_refused(synth):
    pred = expression_target(synth)
    pred[7, 2] = np.nan
    synth.layers["stexp_pred"] = pred
    with pytest.raises(ValueError, match=rf"1 of 432 spots have NaN .*'{synth.obs_names[7]}'"):
        stexp.tl.domains(synth, n_domains=3)


def test_nan_counts_refused_for_measured_target(synth):
    synth.X.data[0] = np.nan
    with pytest.raises(ValueError, match="adata.X contains 1 NaN"):
        stexp.tl.domains(synth, layer=None, n_domains=3)


def test_spatial_mode_follows_the_tissue_on_noisy_predictions(synth):
    target = expression_target(synth)
    rng = np.random.default_rng(3)
    synth.layers["stexp_pred"] = (target + rng.normal(0, 4.0, target.shape)).astype(np.float32)
    n_true = synth.obs["domain"].nunique()
    alone = stexp.tl.domains(synth, n_domains=n_true, spatial=0.0, copy=True)
    spatial = stexp.tl.domains(synth, n_domains=n_true, spatial=0.8, copy=True)
    default = stexp.tl.domains(synth, n_domains=n_true, copy=True)
    assert default.uns["stexp"]["stexp_domain"]["spatial"] == 0.6  # the measured default (benchmarks/domains.py)
    ari_alone = stexp.tl.score_domains(alone, truth_key="domain")["ari"].mean()
    ari_spatial = stexp.tl.score_domains(spatial, truth_key="domain")["ari"].mean()
    assert ari_spatial > ari_alone + 0.3, (ari_alone, ari_spatial)  # ~0.11 -> ~0.56
    assert spatial.uns["stexp"]["stexp_domain"]["spatial"] == 0.8
    for bad in (-0.1, 1.0, True, "0.5"):
        with pytest.raises(ValueError, match="spatial"):
            stexp.tl.domains(synth, n_domains=2, spatial=bad, copy=True)
