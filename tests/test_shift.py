"""The shift score (``stexp.models._shift``) and per-slide feature normalisation (``stexp.models._feature_norm``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _features import STATS_KEY, stat_features

import stexp
from stexp.models import Recipe
from stexp.models._shift import FLAG_FACTOR, expected_pcc_factor
from stexp.tl._keys import PredictionKeys


@pytest.fixture
def split(synth):
    """Two training slides (two patients) and a held-out slide, with cheap image features."""
    stat_features(synth)
    synth.obs["patient"] = synth.obs["library_id"].map({"slide_0": "P0", "slide_1": "P1", "slide_2": "P2"})
    train = synth[synth.obs["library_id"] != "slide_2"].copy()
    test = synth[synth.obs["library_id"] == "slide_2"].copy()
    return train, test


def _shifted(adata, amount: float):
    """A copy whose features moved as a stain change would move them: scaled and offset, then noised."""
    out = adata.copy()
    X = np.asarray(out.obsm[STATS_KEY], dtype=np.float32)
    rng = np.random.default_rng(1)
    out.obsm[STATS_KEY] = X * (1 + amount) + amount * X.std(axis=0) * (2.0 + rng.normal(size=X.shape))
    return out


def test_expected_pcc_factor_is_one_within_range_and_falls_beyond():
    assert expected_pcc_factor(0.5, 1.2) == 1.0
    assert expected_pcc_factor(1.2, 1.2) == 1.0
    values = [expected_pcc_factor(s, 1.2) for s in (1.3, 1.8, 3.0)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    assert np.isnan(expected_pcc_factor(float("nan"), 1.2))


def test_predict_writes_shift_and_warns_on_a_shifted_slide(split, caplog):
    train, test = split
    model = stexp.tl.fit(train, features_key=STATS_KEY)
    reference = model.shift
    assert reference is not None and set(reference.slide_scores) == {"slide_0", "slide_1"}
    assert reference.info["folds"].endswith("by patients")
    keys = PredictionKeys("stexp_pred")

    stexp.tl.predict(test, model)
    clean = test.uns["stexp"]["stexp_pred"]["shift"]["slides"]["slide_2"]
    assert test.obs[keys.shift].notna().all() and (test.obs[keys.shift] > 0).all()

    shifted = _shifted(test, 1.0)
    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(shifted, model)
    far = shifted.uns["stexp"]["stexp_pred"]["shift"]["slides"]["slide_2"]
    assert far["score"] > clean["score"]
    assert far["flagged"] and far["score"] > FLAG_FACTOR * reference.range_max
    assert "looks unlike the model's training slides" in caplog.text
    # a flagged slide is expected to be predicted worse than a clean one, gene by gene
    expected_clean = test.var[keys.expected_pcc].dropna()
    expected_far = shifted.var[keys.expected_pcc].dropna()
    assert far["expected_pcc_factor"] < 1.0
    np.testing.assert_allclose(
        expected_far, expected_clean * far["expected_pcc_factor"] / clean["expected_pcc_factor"], rtol=1e-4
    )


def test_shift_score_grows_with_the_shift(split):
    train, test = split
    model = stexp.tl.fit(train, model=Recipe("knn", {"k": 20}), features_key=STATS_KEY)
    data_scores = []
    for amount in (0.0, 0.3, 1.0, 3.0):
        a = _shifted(test, amount)
        stexp.tl.predict(a, model)
        data_scores.append(a.uns["stexp"]["stexp_pred"]["shift"]["slides"]["slide_2"]["score"])
    assert data_scores == sorted(data_scores) and data_scores[-1] > 2 * data_scores[0]


def test_shift_reference_survives_save_and_load(split, tmp_path):
    train, test = split
    model = stexp.tl.fit(train, model="ridge", features_key=STATS_KEY)  # every model gets one, not only kNN
    model.save(tmp_path / "m")
    loaded = stexp.models.load(tmp_path / "m")
    a, b = test.copy(), test.copy()
    stexp.tl.predict(a, model)
    stexp.tl.predict(b, loaded)
    np.testing.assert_array_equal(a.obs["stexp_pred_shift"], b.obs["stexp_pred_shift"])
    assert loaded.shift.slide_scores == model.shift.slide_scores


def test_cross_validate_reports_shift_per_slide(split):
    train, test = split
    adata = stexp.datasets.synthetic(n_slides=3, n_spots=144, n_genes=60, seed=0)
    stat_features(adata)
    adata.obsm["X_far"] = _shifted(adata, 2.0).obsm[STATS_KEY]
    result = stexp.tl.cross_validate(
        adata,
        model=Recipe("knn", {"k": 20}),
        split_by="library_id",
        features_key=STATS_KEY,
        test_features={"far": "X_far"},
        genes=list(adata.var_names[:20]),
    )
    rows = result.per_fold.set_index(["model", "library_id"])
    assert {"shift_score", "shift_flagged", "shift_range_max"} <= set(rows.columns)
    clean, far = rows.loc["knn", "shift_score"], rows.loc["knn@far", "shift_score"]
    assert (far.to_numpy() > clean.reindex(far.index).to_numpy()).all()
    assert rows.loc["knn@far", "shift_flagged"].all()


def test_slide_centring_cancels_a_common_offset_of_the_query(split):
    train, test = split
    recipe = Recipe("knn", {"k": 20}, feature_norm="slide_centre")
    model = stexp.tl.fit(train, model=recipe, features_key=STATS_KEY)
    assert model.feature_norm == "slide_centre"
    moved = test.copy()
    moved.obsm[STATS_KEY] = np.asarray(moved.obsm[STATS_KEY]) + np.linspace(0.1, 0.5, moved.obsm[STATS_KEY].shape[1])
    stexp.tl.predict(test, model)
    stexp.tl.predict(moved, model)
    np.testing.assert_allclose(test.layers["stexp_pred"], moved.layers["stexp_pred"], atol=1e-4)
    np.testing.assert_allclose(test.obs["stexp_pred_shift"], moved.obs["stexp_pred_shift"], rtol=1e-3)
    raw = stexp.tl.fit(train, model=Recipe("knn", {"k": 20}), features_key=STATS_KEY)
    a, b = test.copy(), moved.copy()
    stexp.tl.predict(a, raw)
    stexp.tl.predict(b, raw)
    assert not np.allclose(a.layers["stexp_pred"], b.layers["stexp_pred"], atol=1e-4)  # the lever does something


def test_feature_norm_is_checked():
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        Recipe("knn", feature_norm="per_slide")
    assert "feature_norm='slide_centre'" in str(Recipe("knn", feature_norm="slide_centre"))


def test_prediction_report_names_trusted_genes_and_the_shift(split):
    from stexp.tl._report import prediction_report

    train, test = split
    model = stexp.tl.fit(train, features_key=STATS_KEY)
    stexp.tl.predict(test, model)
    expected = test.var["stexp_pred_expected_pcc"]
    threshold = float(expected.quantile(0.8))
    lines = prediction_report(test, "stexp_pred", min_expected_pcc=threshold)
    assert lines[0].startswith("shift     slide_2:") and "within the training range" in lines[0]
    assert f"{int((expected >= threshold).sum())} of {int(expected.notna().sum())} genes" in lines[1]
    assert str(expected.idxmax()) in lines[1]
    far = _shifted(test, 1.0)
    stexp.tl.predict(far, model)
    lines = prediction_report(far, "stexp_pred", min_expected_pcc=1.0)
    assert "BEYOND the training range" in lines[0] and lines[1].startswith("trusted   none of")


def _coarser(adata, factor: int):
    """A copy whose only image is ``factor`` times coarser (an export of the slide at lower resolution)."""
    out = adata.copy()
    for entry in out.uns["spatial"].values():
        image = np.asarray(entry["images"]["hires"])
        entry["images"] = {"hires": np.ascontiguousarray(image[::factor, ::factor])}
        entry["scalefactors"] = {
            **entry["scalefactors"],
            "tissue_hires_scalef": entry["scalefactors"]["tissue_hires_scalef"] / factor,
        }
    return out


def test_predict_reports_a_slide_coarser_than_the_training_slides(split, caplog, tmp_path):
    from stexp.tl._report import prediction_report
    from stexp.tl._resolution import COARSER_FACTOR

    train, test = split
    model = stexp.tl.fit(train, model="ridge", features_key=STATS_KEY)
    trained = model.card.training_data["libraries"]
    assert {lib: v["detail_um_per_px"] > 0 for lib, v in trained.items()} == {"slide_0": True, "slide_1": True}
    model.save(tmp_path / "m")
    model = stexp.models.load(tmp_path / "m")  # the card keeps what the check needs

    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(test, model)
    same = test.uns["stexp"]["stexp_pred"]["resolution"]["slides"]["slide_2"]
    assert not same["coarser"] and same["times_coarser"] <= COARSER_FACTOR
    assert "coarser than the model's training slides" not in caplog.text

    coarse = _coarser(test, 4)
    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(coarse, model)
    record = coarse.uns["stexp"]["stexp_pred"]["resolution"]
    slide = record["slides"]["slide_2"]
    assert slide["coarser"] and slide["times_coarser"] == pytest.approx(4 * same["times_coarser"], rel=1e-3)
    assert "4.0 times coarser than the model's training slides" in caplog.text and "mpp=" in caplog.text
    assert any(line.startswith("detail    slide_2:") for line in prediction_report(coarse, "stexp_pred"))
    # a model fitted on features embedded at the coarse slide's resolution sees no difference
    model.card.training_data["libraries"] = {
        lib: {**v, "detail_um_per_px": slide["detail_um_per_px"]} for lib, v in trained.items()
    }
    stexp.tl.predict(coarse, model)
    assert not coarse.uns["stexp"]["stexp_pred"]["resolution"]["slides"]["slide_2"]["coarser"]


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` saved as JPEG at ``quality`` and read back (what ``embed_images(jpeg_quality=)`` does to a slide)."""
    from PIL import Image

    from stexp.images._views import jpeg_slide

    return np.asarray(jpeg_slide(Image.fromarray(image), quality))


def test_jpeg_blockiness_grows_with_compression_and_is_lost_by_resizing(synth):
    from PIL import Image

    from stexp.images._quality import jpeg_blockiness

    image = np.asarray(synth.uns["spatial"]["slide_0"]["images"]["hires"])
    values = [jpeg_blockiness(image)] + [jpeg_blockiness(_jpeg(image, q)) for q in (50, 8)]
    assert values[0] == pytest.approx(1.0, abs=0.1)
    assert values == sorted(values) and values[-1] > 1.5
    resized = np.asarray(Image.fromarray(_jpeg(image, 8)).resize((image.shape[1] * 3 // 4, image.shape[0] * 3 // 4)))
    assert jpeg_blockiness(resized) < 1.2  # the block grid no longer lines up: nothing to measure
    assert jpeg_blockiness(image.astype(np.float32) / 255) == pytest.approx(values[0], rel=1e-4)  # any dtype
    assert jpeg_blockiness(image[:20, :20]) is None and jpeg_blockiness(np.full((64, 64, 3), 200, np.uint8)) is None


def test_predict_reports_a_slide_with_heavy_jpeg_artefacts(split, caplog):
    from stexp.tl._compression import HEAVY
    from stexp.tl._report import prediction_report

    train, test = split
    model = stexp.tl.fit(train, model="ridge", features_key=STATS_KEY)
    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(test, model)
    clean = test.uns["stexp"]["stexp_pred"]["compression"]["slides"]["slide_2"]
    assert not clean["heavy"] and clean["jpeg_blockiness"] < HEAVY and "JPEG block artefacts" not in caplog.text

    compressed = test.copy()
    entry = compressed.uns["spatial"]["slide_2"]
    entry["images"] = {"hires": _jpeg(np.asarray(entry["images"]["hires"]), 8)}
    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(compressed, model)
    heavy = compressed.uns["stexp"]["stexp_pred"]["compression"]["slides"]["slide_2"]
    assert heavy["heavy"] and heavy["jpeg_blockiness"] > HEAVY
    assert not heavy["deblocked"]  # features recorded without the deblock view option (deblocked: test_deblock.py)
    assert "slide 'slide_2': its image shows heavy JPEG block artefacts" in caplog.text
    assert "the model's features are not deblocked" in caplog.text
    (line,) = [x for x in prediction_report(compressed, "stexp_pred") if x.startswith("jpeg      slide_2:")]
    assert "not deblocked" in line
    np.testing.assert_array_equal(compressed.obsm[STATS_KEY], test.obsm[STATS_KEY])  # the features were not touched
