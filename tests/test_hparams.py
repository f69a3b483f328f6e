"""Hyper-parameters are typed keyword arguments of each model's ``__init__`` (the scvi-tools way), checked there."""

import inspect
import json
import re

import numpy as np
import pytest

import stexp
from stexp.models import ExpressionModel, Recipe, available_models, get_model_class
from stexp.models._hparams import BASE_KWARGS

FEATURES = "X_test_domain"
BUILTIN = ["mean", "ridge", "knn", "ridge_knn", "mlp", "mclstexp", "mclstexp_plus", "nh2st"]

#: Per model, values outside a hyper-parameter's range (of the right type).
OUT_OF_RANGE = {
    "ridge": [("n_components", 0), ("alphas", []), ("alphas", [1.0, -1.0]), ("cv_folds", 1)],
    "knn": [("k", 0), ("temperature", 0.0), ("chunk_size", -5)],
    "ridge_knn": [("ridge_weight", 1.5), ("k", 0), ("cv_folds", 1)],
    "mlp": [("dropout", 1.0), ("hidden_dim", 0), ("n_hidden", -1), ("max_epochs", 0), ("lr", 0.0)],
    "mclstexp": [("n_heads", 0), ("mlp_dim", 0), ("hed_jitter", 1.0), ("encoder_lr", -1.0), ("batch_size", 0)],
    "mclstexp_plus": [("retrieval_temperature", -1.0), ("top_k", 0), ("weight_decay", -0.1)],
    "nh2st": [("temperature_query", 0.0), ("mc_samples", -1), ("early_stopping_patience", -1), ("dim", 0)],
}


def _signature_defaults(cls) -> dict:
    """Keyword-only arguments with defaults of ``__init__`` over the MRO (the nearest declaration wins)."""
    out: dict = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not issubclass(klass, ExpressionModel):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in BASE_KWARGS:
                out.setdefault(p.name, list(p.default) if isinstance(p.default, tuple) else p.default)
    return out


def _own_parameters(cls) -> set[str]:
    return set(inspect.signature(cls.__dict__["__init__"]).parameters) - {"self", "genes", "kwargs"}


def test_every_builtin_model_is_covered():
    assert set(BUILTIN) <= set(available_models())
    assert set(OUT_OF_RANGE) == set(BUILTIN) - {"mean"}


@pytest.mark.parametrize("name", BUILTIN)
def test_default_hparams_are_the_signature_defaults(name):
    cls = get_model_class(name)
    defaults = cls.default_hparams
    assert defaults == _signature_defaults(cls)
    assert json.loads(json.dumps(defaults)) == defaults  # JSON-serialisable, as saved
    model = cls(["g1", "g2"])
    assert model.hparams == defaults and model.default_hparams == defaults
    defaults.clear()  # a fresh mapping each time: callers cannot change the class's defaults
    assert cls.default_hparams == model.hparams


def test_subclasses_declare_only_their_own_hyper_parameters():
    from stexp.models._finetune import FinetunableExpressionModel
    from stexp.models._mclstexp import MclSTExp
    from stexp.models._mclstexp_plus import MclSTExpPlus
    from stexp.models._mlp import MLPModel
    from stexp.models._nh2st import NH2ST

    training = _own_parameters(stexp.models.TorchExpressionModel)
    finetuning = _own_parameters(FinetunableExpressionModel)
    assert training == {"max_epochs", "batch_size", "lr", "weight_decay", "early_stopping_patience", "seed"}
    assert finetuning == {"finetune_encoder", "augment", "hed_jitter", "encoder_lr"}
    assert _own_parameters(MclSTExpPlus) == {"retrieval_temperature"}
    assert _own_parameters(MLPModel) == {"hidden_dim", "n_hidden", "dropout"}
    # a model re-declares a training option only to change its default, never the fine-tuning ones
    assert _own_parameters(MclSTExp) & training == {"max_epochs", "lr", "weight_decay"}
    assert _own_parameters(NH2ST) & training == {"max_epochs", "lr", "weight_decay", "early_stopping_patience"}
    assert not (_own_parameters(MclSTExp) | _own_parameters(NH2ST)) & finetuning
    plus, paper = MclSTExpPlus.default_hparams, MclSTExp.default_hparams
    assert plus.pop("retrieval_temperature") == "auto" and plus == paper
    # ridge_knn's ridge part takes the ridge's hyper-parameters with the ridge's defaults
    ridge = get_model_class("ridge").default_hparams
    assert {k: v for k, v in get_model_class("ridge_knn").default_hparams.items() if k in ridge} == ridge


@pytest.mark.parametrize("name", BUILTIN[1:])
def test_a_wrong_type_raises_naming_model_parameter_and_value(name):
    cls = get_model_class(name)
    for param in cls.default_hparams:
        with pytest.raises(TypeError, match=rf"^{name}: {param} must be .*, got <object object"):
            cls(["g"], **{param: object()})
    int_param = next(k for k, v in cls.default_hparams.items() if type(v) is int)
    with pytest.raises(TypeError, match=rf"^{name}: {int_param} must be an integer.*, got 'many' \(str\)"):
        cls(["g"], **{int_param: "many"})


@pytest.mark.parametrize("name", BUILTIN[1:])
def test_an_out_of_range_value_raises_naming_model_parameter_and_value(name):
    cls = get_model_class(name)
    for param, value in OUT_OF_RANGE[name]:
        with pytest.raises(ValueError, match=rf"^{name}: {param} must be .*, got {re.escape(repr(value))}"):
            cls(["g"], **{param: value})


def test_values_are_typed_at_the_boundary():
    knn = get_model_class("knn")
    hp = knn(["g"], k=200.0, chunk_size=np.int64(64), temperature=np.float32(0.5)).hparams
    assert hp["k"] == 200 and type(hp["k"]) is int and type(hp["chunk_size"]) is int
    assert type(hp["temperature"]) is float and hp["temperature"] == 0.5
    assert knn(["g"], temperature="auto").hparams["temperature"] == "auto"
    assert knn(["g"], temperature=None).temperature_ is None
    ridge = get_model_class("ridge")(["g"], alphas=np.array([1, 10]), n_components=None)
    assert ridge.hparams["alphas"] == [1.0, 10.0] and type(ridge.hparams["alphas"][0]) is float
    mcl = get_model_class("mclstexp")(["g"], temperature=1, max_epochs=3.0)
    assert type(mcl.hparams["temperature"]) is float and type(mcl.hparams["max_epochs"]) is int
    for bad in ({"k": 2.5}, {"k": True}, {"standardize": 1}, {"temperature": [0.1]}):
        with pytest.raises(TypeError, match=f"knn: {next(iter(bad))} must be"):
            knn(["g"], **bad)
    with pytest.raises(ValueError, match=r"knn: temperature must be a number, 'auto' or None, got 'sharp'"):
        knn(["g"], temperature="sharp")  # a string, but not one the type allows
    recipe = Recipe("knn", {"k": np.int64(20), "temperature": 1})
    assert recipe.hparams == {"k": 20, "temperature": 1.0} and type(recipe.hparams["k"]) is int
    json.dumps(recipe.to_dict())
    with pytest.raises(TypeError, match="knn: k must be an integer"):
        Recipe("knn", {"k": "many"})


@pytest.mark.parametrize("name", BUILTIN)
def test_an_unknown_option_raises_listing_what_the_model_takes(name):
    cls = get_model_class(name)
    accepted = ", ".join(
        f"{k}: {p.annotation} = {p.default!r}"
        for k, p in ((k, _parameter(cls, k)) for k in cls.default_hparams)  # as written in the signatures
    )
    accepted = accepted or "no options"
    with pytest.raises(TypeError, match=re.escape(f"model {name!r} does not take ['n_trees']; it takes {accepted}.")):
        Recipe(name, {"n_trees": 3})
    with pytest.raises(TypeError, match=re.escape(f"unknown hyper-parameter(s) ['n_trees']; it takes {accepted}.")):
        cls(["g"], n_trees=3)
    with pytest.raises(TypeError, match=re.escape("['device'] are runtime options")):
        cls(["g"], device="cpu")


def _parameter(cls, name):
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and name in inspect.signature(init).parameters:
            return inspect.signature(init).parameters[name]
    raise KeyError(name)


def test_knn_message_reads_like_its_signature():
    with pytest.raises(TypeError) as info:
        Recipe("knn", {"neighbours": 5})
    assert str(info.value) == (
        "model 'knn' does not take ['neighbours']; it takes k: int = 50, "
        "temperature: float | Literal['auto'] | None = 0.1, standardize: bool = True, chunk_size: int = 256, "
        "search: Literal['auto', 'exact', 'approximate'] = 'auto'."
    )


@pytest.fixture
def featured(synth):
    adata = synth.copy()
    rng = np.random.default_rng(0)
    codes = adata.obs["domain"].cat.codes.to_numpy()
    loadings = rng.normal(size=(codes.max() + 1, 16))
    adata.obsm[FEATURES] = (loadings[codes] + 0.5 * rng.normal(size=(adata.n_obs, 16))).astype(np.float32)
    adata.uns.setdefault("stexp", {}).setdefault("features", {})[FEATURES] = {"encoder": "test_domain"}
    return adata


def test_fit_refuses_options_the_model_does_not_take(featured):
    with pytest.raises(TypeError, match=r"model 'ridge' does not take \['max_epochs'\]; it takes n_components: int"):
        stexp.tl.fit(featured, model="ridge", features_key=FEATURES, max_epochs=5)
    with pytest.raises(TypeError, match="knn: k must be an integer, got 'many'"):
        stexp.tl.fit(featured, model="knn", features_key=FEATURES, k="many")


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("mean", {}),
        ("ridge", {"alphas": (1.0, 100.0), "n_components": 8.0}),
        ("knn", {"k": 20.0, "temperature": "auto"}),
        ("ridge_knn", {"k": 20, "ridge_weight": 1}),
        ("mlp", {"max_epochs": 1, "hidden_dim": 16, "device": "cpu"}),
    ],
)
def test_save_load_round_trip(featured, tmp_path, name, hparams):
    is_test = (featured.obs["library_id"] == "slide_2").to_numpy()
    train, test = featured[~is_test].copy(), featured[is_test].copy()
    model = stexp.tl.fit(train, model=name, features_key=FEATURES, **hparams)
    assert model.hparams == {**model.default_hparams, **model.recipe.hparams}
    stexp.tl.predict(test, model, key_added="pred")
    loaded = stexp.models.load(model.save(tmp_path / name), genes=model.genes)
    assert type(loaded) is type(model) and loaded.hparams == model.hparams
    assert json.loads((tmp_path / name / "model.json").read_text())["hparams"] == model.hparams
    stexp.tl.predict(test, loaded, key_added="again")
    np.testing.assert_allclose(test.layers["again"], test.layers["pred"], rtol=1e-5, atol=1e-6)


def test_old_model_folders_load_and_unknown_keys_still_raise(featured, tmp_path):
    model = stexp.tl.fit(featured, model="knn", features_key=FEATURES, k=20, smoothing=None, calibrate=False)
    path = model.save(tmp_path / "knn")
    config = json.loads((path / "model.json").read_text())
    config.pop("content_sha256")  # an older (format 1) folder: model.json not checksummed
    config["format_version"] = 1
    config["hparams"]["k"] = 20.0  # as an older writer might have stored it
    (path / "model.json").write_text(json.dumps(config))
    assert stexp.models.load(path).hparams["k"] == 20
    config["hparams"]["n_trees"] = 3  # a hyper-parameter this version does not know
    (path / "model.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"cannot build: KNNModel got unknown hyper-parameter\(s\) \['n_trees'\]"):
        stexp.models.load(path)


def test_a_model_declaring_a_dict_still_works():
    """The older way (``default_hparams = {...}``, untyped) keeps working, also over a typed parent."""
    from stexp.models._torch import TorchExpressionModel, training_hparams

    class Legacy(ExpressionModel):
        default_hparams = {"alpha": 1.0, "names": ["a"]}

        def _fit(self, train, validation=None): ...
        def _predict(self, data): ...
        def _state(self): ...
        def _load_state(self, state): ...

    assert Legacy.default_hparams == {"alpha": 1.0, "names": ["a"]}
    assert Legacy(["g"]).hparams == Legacy.default_hparams and Legacy(["g"], alpha=2).hparams["alpha"] == 2
    Legacy(["g"]).hparams["names"].append("b")
    assert Legacy(["g"]).hparams["names"] == ["a"]
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        Legacy(["g"], beta=1)

    class LegacyNet(TorchExpressionModel):
        default_hparams = training_hparams(max_epochs=30, lr=1e-2, weight_decay=1e-4, early_stopping_patience=5)

        def build_network(self, *, n_features, encoder, **sizes): ...
        def _predict(self, data): ...

    assert LegacyNet.default_hparams["max_epochs"] == 30 and LegacyNet(["g"]).hparams["max_epochs"] == 30
    assert LegacyNet(["g"], max_epochs=4.0).hparams["max_epochs"] == 4  # typed by the parent's declaration
    with pytest.raises(ValueError, match="max_epochs must be a positive integer"):
        LegacyNet(["g"], max_epochs=0)


def test_a_hyper_parameter_not_passed_on_is_caught():
    class Forgetful(get_model_class("knn")):
        def __init__(self, genes, *, extra: int = 1, **kwargs):
            super().__init__(genes, **kwargs)  # extra is not passed on

    assert "extra" in Forgetful.default_hparams
    with pytest.raises(TypeError, match=r"\['extra'\] of its __init__ signature did not reach"):
        Forgetful(["g"])
