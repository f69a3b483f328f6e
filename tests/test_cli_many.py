"""``stexp embed`` / ``stexp predict`` over many slides: paths, globs and list files; one output per slide;
resume after an interruption; progress per slide; a failing slide reported at the end."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
from test_wsi import _he

import stexp
from stexp._batch import expand_slides, parse_shard
from stexp.cli import main

POOL = "test_many_pool"
#: the slides are PNGs (decoded whole, 2 µm/px given) with a coarse grid: a few dozen pseudo-spots each
GRID = ["--mpp", "2", "--spacing-um", "60", "--spot-diameter-um", "40"]


@pytest.fixture(scope="module", autouse=True)
def pool_encoder():
    """A parameter-free registry encoder: the 2x2 mean colour of the patch (12-d)."""
    from stexp.images._encoders import _REGISTRY, register_encoder

    @register_encoder(POOL, out_dim=12, input_px=16)
    def _build(pretrained: bool):
        import torch

        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

    yield POOL
    _REGISTRY.pop(POOL, None)


def _png(path, seed: int):
    from PIL import Image

    Image.fromarray(_he(240, 320, seed=seed)).save(path)
    return path


@pytest.fixture
def slides(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    return [_png(folder / f"s{i}.png", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A ridge model on pool features of pseudo-spots with made-up counts, saved."""
    import scipy.sparse as sp

    tmp = tmp_path_factory.mktemp("model")
    adata = stexp.io.read_wsi(_png(tmp / "train.png", seed=9), mpp=2.0, spacing_um=60, spot_diameter_um=40,
                              genes=["G1", "G2", "G3"])  # fmt: skip
    stexp.pp.embed_images(adata, encoder=POOL, weights=None, patch_um=40.0, device="cpu", cache=False, key_added="X")
    rng = np.random.default_rng(0)
    f = adata.obsm["X"].astype(np.float64)
    mean = np.exp(2 + np.tanh((f - f.mean(0)) / (f.std(0) + 1e-6) @ rng.normal(size=(12, 3)) / 4))
    adata.X = sp.csr_matrix(rng.poisson(mean * 5).astype(np.float32))
    adata.uns["stexp"].pop("unmeasured", None)
    return stexp.tl.fit(adata, model="ridge", features_key="X", calibrate=False).save(tmp / "model")


def _predict(args, out, capsys, *extra):
    status = main(["predict", *map(str, args), "--model", "MODEL", "--out", str(out), "--device", "cpu", "--quiet",
                   *GRID, *extra])  # fmt: skip
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_predict_many_slides_resumes_and_reports_failures(tmp_path, slides, model_dir, capsys, monkeypatch):
    import stexp.cli

    calls = []
    real_load = stexp.models.load

    def load(path, **kw):
        calls.append(path)
        return real_load(model_dir, **kw)

    monkeypatch.setattr(stexp.models, "load", load)
    bad = tmp_path / "slides" / "broken.png"
    bad.write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the cohort\n{slides[2]}\n\n{bad}  # damaged\n")
    out = tmp_path / "pred"
    # an interruption while the second slide's figure is written: its .h5ad is there, the figure is not
    real_plot = stexp.cli._plot
    n_plots = []

    def plot(*a, **k):
        n_plots.append(1)
        if len(n_plots) == 2:
            raise KeyboardInterrupt
        return real_plot(*a, **k)

    monkeypatch.setattr(stexp.cli, "_plot", plot)
    with pytest.raises(KeyboardInterrupt):
        _predict([tmp_path / "slides" / "s[01].png", f"@{listing}"], out, capsys)
    assert (out / "s0.h5ad").exists() and (out / "s0_genes.png").exists()
    assert (out / "s1.h5ad").exists() and not (out / "s1_genes.png").exists()
    monkeypatch.setattr(stexp.cli, "_plot", real_plot)

    status, printed, err = _predict([tmp_path / "slides" / "s[01].png", f"@{listing}"], out, capsys)
    assert status == 1  # the broken slide
    assert len(calls) == 2  # the model is loaded once per run
    assert "[1/4] broken.png: failed" in err and "[2/4] s0.png: skipped" in printed
    for k, name in ((3, "s1"), (4, "s2")):  # s1 was not complete: done again
        n = ad.read_h5ad(out / f"{name}.h5ad").n_obs
        assert re.search(
            rf"\[{k}/4\] {name}\.png: {n} spots in [0-9.]+ s -> {re.escape(str(out))}/{name}\.h5ad", printed
        )
    assert "2 of 4 slide(s) done, 1 skipped (output complete already), 1 failed" in printed
    assert "  failed: broken.png: RuntimeError: " in err and "broken.png" in err.split("failed: broken.png:")[-1]
    for name in ("s0", "s1", "s2"):
        pred = ad.read_h5ad(out / f"{name}.h5ad")
        assert pred.n_obs > 10 and np.isfinite(stexp.tl.get_prediction(pred, "stexp_pred").to_numpy()).all()
        assert (out / f"{name}_genes.png").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial output left behind
    # the same prediction as one slide at a time
    status, _, err = _predict([slides[2]], tmp_path / "one.h5ad", capsys)
    assert status == 0, err
    np.testing.assert_allclose(
        stexp.tl.get_prediction(ad.read_h5ad(tmp_path / "one.h5ad"), "stexp_pred").to_numpy(),
        stexp.tl.get_prediction(ad.read_h5ad(out / "s2.h5ad"), "stexp_pred").to_numpy(),
        rtol=1e-6,
    )
    # everything done: a rerun without the broken slide does nothing and exits 0
    status, printed, _ = _predict([tmp_path / "slides" / "s*.png"], out, capsys)
    assert status == 0 and "0 of 3 slide(s) done, 3 skipped" in printed
    assert len(calls) == 3  # nothing to predict: the model was not loaded


def test_predict_many_stops_when_the_model_cannot_be_loaded(tmp_path, slides, capsys):
    status, printed, err = _predict([tmp_path / "slides" / "s*.png"], tmp_path / "out", capsys)
    assert status == 1 and "stopped after 0 slide(s)" in err
    assert err.strip().splitlines()[-1].startswith("stexp predict: error: ") and "MODEL" in err
    assert not list((tmp_path / "out").iterdir())


def test_embed_many_slides_shards_and_skips(tmp_path, slides, capsys):
    out = tmp_path / "feats"
    argv = ["embed", str(tmp_path / "slides" / "*.png"), "--out", str(out), "--encoder", POOL, "--weights", "none",
            "--patch-um", "40", "--device", "cpu", "--quiet", *GRID]  # fmt: skip
    assert main([*argv, "--shard", "1/2"]) == 0  # sorted s0, s1, s2: shard 1 of 2 is s1
    assert sorted(p.name for p in out.iterdir()) == ["s1.h5ad"]
    assert "[1/1] s1.png: " in capsys.readouterr().out
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "s1.png: skipped" in printed and "2 of 3 slide(s) done, 1 skipped" in printed
    key = f"X_stexp_{POOL}"
    for s in slides:
        feats = ad.read_h5ad(out / f"{s.stem}.h5ad").obsm[key]
        assert feats.shape[1] == 12 and np.isfinite(feats).all()
    # what stexp.pp.embed_images gives (the encoder built once for the run records the same spec)
    ref = stexp.io.read_wsi(slides[2], mpp=2.0, spacing_um=60, spot_diameter_um=40)
    stexp.pp.embed_images(ref, encoder=POOL, weights=None, patch_um=40.0, device="cpu", cache=False)
    cli = ad.read_h5ad(out / "s2.h5ad")
    np.testing.assert_allclose(cli.obsm[key], ref.obsm[key], rtol=1e-6)
    spec = {k: v for k, v in ref.uns["stexp"]["features"][key].items() if k != "versions"}
    assert {k: cli.uns["stexp"]["features"][key][k] for k in spec if k != "n_outside"} == {
        k: v for k, v in spec.items() if k != "n_outside"
    }
    # an .h5ad input is embedded as it is; outputs of another encoder are refused, not taken as done
    one = ad.read_h5ad(out / "s0.h5ad")
    del one.obsm[key]
    one.write_h5ad(tmp_path / "again.h5ad")
    assert main(["embed", str(tmp_path / "again.h5ad"), "--out", str(tmp_path / "again_out.h5ad"), "--encoder",
                 POOL, "--weights", "none", "--patch-um", "40", "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    again = ad.read_h5ad(tmp_path / "again_out.h5ad")
    np.testing.assert_allclose(again.obsm[key], ad.read_h5ad(out / "s0.h5ad").obsm[key], rtol=1e-6)
    # --stain-norm none embeds as embed_images(stain_norm=None) and records it; the default is Macenko
    assert main(["embed", str(tmp_path / "again.h5ad"), "--out", str(tmp_path / "plain.h5ad"), "--encoder",
                 POOL, "--weights", "none", "--patch-um", "40", "--device", "cpu", "--quiet", "--stain-norm", "none"]) == 0  # fmt: skip
    plain = ad.read_h5ad(tmp_path / "plain.h5ad")
    assert plain.uns["stexp"]["features"][key].get("stain_norm") is None
    assert again.uns["stexp"]["features"][key]["stain_norm"] == "macenko"
    assert not np.allclose(plain.obsm[key], again.obsm[key])
    # a rerun with other view options does not take those outputs as done (resume compares them, not the name only)
    for out_name, extra, what in (("plain.h5ad", [], "stain_norm=None (this run: 'macenko')"),
                                  ("again_out.h5ad", ["--adapt-bn"], "adapt_bn=False (this run: True)"),
                                  ("again_out.h5ad", ["--no-deblock"], "deblock=True (this run: False)")):  # fmt: skip
        assert main(["embed", str(tmp_path / "again.h5ad"), "--out", str(tmp_path / out_name), "--encoder", POOL,
                     "--weights", "none", "--patch-um", "40", "--device", "cpu", "--quiet", *extra]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert f"holds features made with {what}" in err and "--overwrite" in err, err
    argv[argv.index(POOL)] = "efficientnet_lite0"
    assert main([*argv, "--key", key]) == 1
    err = capsys.readouterr().err
    assert "holds features of encoder" in err and "--overwrite" in err


def test_slide_lists(tmp_path, slides, capsys):
    listing = tmp_path / "l.txt"
    listing.write_text(f"{slides[1]}\n{slides[0]}\n{slides[1]}\n")
    assert expand_slides([f"@{listing}", str(slides[2])]) == [slides[1], slides[0], slides[2]]  # once each
    with pytest.raises(FileNotFoundError, match=r"2 slide\(s\) not found: .*nope.png, .*none\*.png \(no file"):
        expand_slides([str(tmp_path / "nope.png"), str(tmp_path / "none*.png")])
    assert parse_shard("2/3") == (2, 3)
    # refused before any work, one line: missing slides, a file as --out, two slides with one output name
    (tmp_path / "other").mkdir()
    clash = _png(tmp_path / "other" / "s0.png", seed=5)
    for args, out, match in (
        ([tmp_path / "nope.png", slides[0]], tmp_path / "o", "1 slide(s) not found"),
        ([slides[0], slides[1]], tmp_path / "o.h5ad", "names a file, but 2 slides"),
        ([slides[0], clash], tmp_path / "o", "share an output name"),
    ):
        status, _, err = _predict(args, out, capsys)
        assert status == 1 and err.startswith("stexp predict: error:") and match in err, err
        assert err.strip().count("\n") == 0 and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["embed", str(slides[0]), "--out", "x", "--shard", "2/2"])
    assert "0 <= I < N" in capsys.readouterr().err


def test_under_a_launcher_only_rank_zero_writes_and_reports(tmp_path, slides, capsys, monkeypatch):
    """torchrun / srun run the command on every rank: the others embed with it but write and print nothing."""
    from stexp._batch import is_rank_zero

    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not is_rank_zero()
    argv = ["embed", str(slides[0]), "--out", str(tmp_path / "f"), "--encoder", POOL, "--weights", "none",
            "--patch-um", "40", "--device", "cpu", "--quiet", *GRID]  # fmt: skip
    assert main(argv) == 0
    assert not (tmp_path / "f").exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert is_rank_zero() and main(argv) == 0
    assert (tmp_path / "f" / "s0.h5ad").exists() and "1 of 1 slide(s) done" in capsys.readouterr().out
