"""stexp calls leave the user's process as they found it, and an interrupt leaves nothing half done."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from _features import stat_features

import stexp


@pytest.fixture
def data():
    adata = stexp.datasets.synthetic(n_slides=3, n_spots=48, n_genes=16, seed=1)
    return adata, stat_features(adata)


def _state():
    return {
        "numpy": np.random.get_state()[1].copy(),
        "torch": torch.random.get_rng_state().clone(),
        "python": random.getstate(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "environ": dict(os.environ),
        "sigint": signal.getsignal(signal.SIGINT),
    }


def _assert_same(before, after):
    changed = [
        k for k in before if not (torch.equal(before[k], after[k]) if k == "torch" else np.all(before[k] == after[k]))
    ]
    assert not changed, f"the call changed the process state: {changed}"


class TinyEncoder(torch.nn.Module):
    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.calls, self.fail_on_call = 0, fail_on_call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        return self.conv(x).mean((2, 3))


ENCODER = TinyEncoder()  # built here: its random init is the test's own draw, not stexp's
CALLS = {
    "fit-mlp": lambda a, k: stexp.tl.fit(a, model="mlp", features_key=k, max_epochs=2, device="cpu"),
    "fit-mclstexp": lambda a, k: stexp.tl.fit(
        a, model="mclstexp", features_key=k, max_epochs=1, top_k=3, projection_dim=8, n_layers=1, device="cpu"
    ),
    "predict": lambda a, k: stexp.tl.predict(a, stexp.tl.fit(a, model="ridge", features_key=k)),
    "embed_images": lambda a, k: stexp.pp.embed_images(a, encoder=ENCODER, device="cpu"),
    "cross_validate": lambda a, k: stexp.tl.cross_validate(
        a, model=["ridge", "mlp"], split_by="library_id", features_key=k, max_epochs=1, batch_size=64
    ),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_calls_leave_the_process_as_found(call, data):
    adata, key = data
    np.random.seed(7)
    torch.manual_seed(7)
    random.seed(7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = _state()
        CALLS[call](adata, key)
        _assert_same(before, _state())
    finally:
        torch.set_num_threads(threads)


def test_same_seed_same_result(data):
    adata, key = data
    preds = []
    for _ in range(2):
        model = stexp.tl.fit(adata, model="mlp", features_key=key, max_epochs=3, seed=3, device="cpu")
        preds.append(model.predict(stexp.tl._inputs.spot_data(adata, features_key=key, library_key="library_id"))[0])
    np.testing.assert_array_equal(preds[0], preds[1])


def test_interrupted_fit_raises_keyboardinterrupt_and_changes_nothing(data, monkeypatch):
    from stexp.models._mlp import MLPNetwork

    adata, key = data
    snapshot = (adata.X.toarray().copy(), adata.obs.copy(), dict(adata.obsm), sorted(adata.uns))
    calls = {"n": 0}
    original = MLPNetwork.losses

    def interrupting(self, batch, data, gather):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch, data, gather)

    monkeypatch.setattr(MLPNetwork, "losses", interrupting)
    before = _state()
    with pytest.raises(KeyboardInterrupt):
        stexp.tl.fit(adata, model="mlp", features_key=key, max_epochs=5, batch_size=16, device="cpu")
    # Lightning ignores SIGINT after a Ctrl+C and exits; stexp gives the interrupt back and restores the handler
    _assert_same(before, _state())
    np.testing.assert_array_equal(snapshot[0], adata.X.toarray())
    assert (
        snapshot[1].equals(adata.obs) and snapshot[2].keys() == adata.obsm.keys() and snapshot[3] == sorted(adata.uns)
    )


def test_interrupted_embedding_leaves_no_features_and_a_valid_cache(data):
    adata, _ = data
    uns_before = {k: dict(v) for k, v in adata.uns["stexp"].items()}
    # 48 spots per slide, batch 16: the 5th forward pass is on the second slide
    with pytest.raises(KeyboardInterrupt):
        stexp.pp.embed_images(adata, encoder=TinyEncoder(fail_on_call=5), batch_size=16, device="cpu", cache=True)
    assert "X_stexp_callable_TinyEncoder" not in adata.obsm and not any(k.startswith("X_stexp_c") for k in adata.obsm)
    assert {k: dict(v) for k, v in adata.uns["stexp"].items()} == uns_before
    cache = stexp.settings.cachedir / "features"
    leftovers = [p.name for p in cache.glob("*")] if cache.exists() else []
    assert not [n for n in leftovers if "tmp" in n]  # no partial file
    for path in cache.glob("*.npy") if cache.exists() else []:
        assert np.isfinite(np.load(path)).all()
