"""Distributed training: the strategy chosen per environment, and a real 2-process DDP fit on CPU (gloo)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from _features import STATS_KEY, stat_features

import stexp
from stexp.models import _engine
from stexp.models._engine import parallel_plan, per_process_batch

LAUNCHER_VARS = ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_NNODES")


@pytest.fixture
def plain_script(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_engine, "is_interactive", lambda: False)


def test_strategy_per_environment(plain_script, monkeypatch):
    assert parallel_plan("cpu")["strategy"] == "auto"
    assert parallel_plan("cpu", 1) == {
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "world_size": 1,
    }
    assert parallel_plan("cpu", 2)["strategy"] == "ddp_spawn"  # a plain script
    monkeypatch.setattr(_engine, "is_interactive", lambda: True)
    assert parallel_plan("cpu", 2)["strategy"] == "ddp_notebook"  # Jupyter / IPython: fork
    # torchrun: 2 nodes x 4 processes
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    plan = parallel_plan("cpu")
    assert (plan["strategy"], plan["devices"], plan["num_nodes"], plan["world_size"]) == ("ddp", 4, 2, 8)
    for var in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var)
    # srun: 3 nodes, 6 tasks
    monkeypatch.setenv("SLURM_NTASKS", "6")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NNODES", "3")
    plan = parallel_plan("cpu", 2)
    assert (plan["strategy"], plan["devices"], plan["num_nodes"]) == ("ddp", 2, 3)


def test_bad_devices(plain_script):
    with pytest.raises(ValueError, match="at least 1"):
        parallel_plan("cpu", 0)
    with pytest.raises(ValueError, match="GPU indices"):
        parallel_plan("cpu", [0, 1])
    with pytest.raises(ValueError, match="positive integer"):
        parallel_plan("cpu", "two")


def test_per_process_batch():
    assert per_process_batch(1000, 128, 1) == (128, True)
    assert per_process_batch(200, 128, 2) == (100, False)  # each process has 100 spots: one batch, none dropped
    assert per_process_batch(300, 64, 2) == (64, True)


def test_devices_is_not_a_hyperparameter():
    with pytest.raises(TypeError, match="runtime options"):
        stexp.models.get_model_class("mlp")(["a"], devices=2)


@pytest.fixture(scope="module")
def split():
    adata = stexp.datasets.synthetic(n_slides=3, n_spots=96, n_genes=20, seed=0)
    stat_features(adata)
    is_test = (adata.obs["library_id"] == "slide_2").to_numpy()
    return adata[~is_test].copy(), adata[is_test].copy()


def _mse(model, train, test) -> tuple[float, float]:
    """MSE of the model's prediction on the test slide, and of the training mean (the baseline)."""
    from stexp.pp._target import expression_target

    genes = list(train.var_names)
    truth = expression_target(test, genes)
    stexp.tl.predict(test, model)
    baseline = expression_target(train, genes).mean(0, keepdims=True)
    return float(((test.layers["stexp_pred"] - truth) ** 2).mean()), float(((baseline - truth) ** 2).mean())


@pytest.mark.slow
def test_two_process_mclstexp_matches_one_process(split):
    """mclSTExp with 2 CPU processes (ddp_spawn from a script, gloo): negatives gathered across processes."""
    train, test = split
    params = {
        "model": "mclstexp",
        "features_key": STATS_KEY,
        "max_epochs": 12,
        "batch_size": 48,
        "lr": 2e-3,
        "device": "cpu",
        "seed": 0,
        "projection_dim": 32,
        "n_heads": 2,
        "head_dim": 16,
        "top_k": 30,
    }
    t0 = time.perf_counter()
    one = stexp.tl.fit(train, **params)
    t1 = time.perf_counter()
    two = stexp.tl.fit(train, devices=2, **params)
    t2 = time.perf_counter()
    print(f"1 process {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s", file=sys.stderr)
    assert two.devices == 2 and "devices" not in two.hparams
    # the history came back from the workers: one value per epoch, decreasing
    for est in (one, two):
        losses = est.history["train_loss"]
        assert len(losses) == 12 and np.isfinite(losses).all() and losses[-1] < losses[0]
    # chance level of the gathered batch: 2 x 48 spots
    assert two.history["chance_loss"] == pytest.approx(np.log(96))
    # the main process holds trained weights: both beat the training mean on the held-out slide
    results = {}
    for name, est in (("one", one), ("two", two)):
        mse, base = _mse(est, train, test.copy())
        results[name] = mse
        assert mse < 0.9 * base, (name, mse, base)
    assert results["two"] < 1.25 * results["one"]


@pytest.mark.slow
def test_notebook_strategy_forks_and_returns_the_history(split, monkeypatch):
    """In Jupyter/IPython the workers are forked (ddp_notebook); the weights and history come back."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_engine, "is_interactive", lambda: True)
    train, test = split
    est = stexp.tl.fit(
        train,
        model="mlp",
        features_key=STATS_KEY,
        max_epochs=6,
        batch_size=48,
        lr=3e-3,
        device="cpu",
        devices=2,
        seed=0,
    )
    losses = est.history["train_loss"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    mse, base = _mse(est, train, test.copy())
    assert mse < base


# embed_images(devices=N): the patches sharded over processes through Lightning


def _pool_encoder():
    import torch

    # picklable; 768-d, so the 90 spots' features (276 KB) exceed a pipe's buffer (a deadlock when they were
    # sent back through Lightning's return queue)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(16), torch.nn.Flatten())


EMBED = {"encoder_id": "pool16", "device": "cpu", "patch_um": 40, "batch_size": 16}
EMBED_KEY = "X_stexp_callable_pool16"


def test_embed_devices_is_checked():
    adata = stexp.datasets.synthetic(n_slides=1, n_spots=8, n_genes=5, seed=0)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="devices must be None"):
            stexp.pp.embed_images(adata, encoder=_pool_encoder(), devices=bad, **EMBED)


def test_embed_two_processes_match_one_and_share_the_cache(monkeypatch):
    """2 CPU processes (forked, as in Jupyter; gloo) give the features of one; cached libraries are not redone."""
    from stexp.images._cache import cache_dir
    from stexp.pp import _embed_parallel

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_engine, "is_interactive", lambda: True)
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=45, n_genes=5, seed=1)  # odd counts: uneven shards
    one = stexp.pp.embed_images(adata, encoder=_pool_encoder(), cache=False, copy=True, **EMBED)
    jobs = []
    real = _embed_parallel.embed_jobs

    def counted(enc, todo, **kw):
        jobs.append(len(todo))
        return real(enc, todo, **kw)

    monkeypatch.setattr(_embed_parallel, "embed_jobs", counted)
    two = stexp.pp.embed_images(adata, encoder=_pool_encoder(), devices=2, copy=True, **EMBED)
    assert jobs == [2]
    np.testing.assert_allclose(two.obsm[EMBED_KEY], one.obsm[EMBED_KEY], rtol=0, atol=1e-6)
    assert np.isfinite(two.obsm[EMBED_KEY]).all() and two.obsm[EMBED_KEY].std(0).mean() > 0
    assert two.uns["stexp"]["features"][EMBED_KEY] == one.uns["stexp"]["features"][EMBED_KEY]
    # both libraries were cached by the calling process: a new call loads them and starts no process
    files = sorted(cache_dir().glob("*.npy"))
    assert len(files) == 2
    again = stexp.pp.embed_images(adata, encoder=_pool_encoder(), devices=2, copy=True, **EMBED)
    assert jobs == [2]
    np.testing.assert_array_equal(again.obsm[EMBED_KEY], two.obsm[EMBED_KEY])
    # one library's cache gone: only that one is embedded again
    files[0].unlink()
    part = stexp.pp.embed_images(adata, encoder=_pool_encoder(), devices=2, copy=True, **EMBED)
    assert jobs == [2, 1]
    np.testing.assert_allclose(part.obsm[EMBED_KEY], one.obsm[EMBED_KEY], rtol=0, atol=1e-6)
