"""Models: the registry, the base classes, saving and loading."""

from stexp._lazy import lazy_namespace

from ._base import ExpressionModel
from ._card import ModelCard, describe
from ._data import SpotData
from ._pretrained import PretrainedModel, load, pretrained, register_pretrained
from ._recipe import DEFAULT_RECIPE, Recipe
from ._registry import available_models, get_model_class, register_model

_lazy_getattr, _lazy_dir, _lazy_all = lazy_namespace(
    __name__,
    {"TorchExpressionModel": "._torch", "TrainingPlan": "._engine", "CALIBRATION_SCORES": "._calibration"},
)


def __getattr__(name: str):
    return _lazy_getattr(name)


__all__ = [
    "CALIBRATION_SCORES",
    "DEFAULT_RECIPE",
    "ExpressionModel",
    "ModelCard",
    "PretrainedModel",
    "Recipe",
    "SpotData",
    "TorchExpressionModel",
    "TrainingPlan",
    "available_models",
    "describe",
    "get_model_class",
    "load",
    "pretrained",
    "register_model",
    "register_pretrained",
]
