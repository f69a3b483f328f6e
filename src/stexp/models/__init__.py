"""Models: the registry, the base class, saving and loading."""

from ._base import ExpressionModel, load
from ._data import SpotData
from ._registry import available_models, get_model_class, register_model

__all__ = ["ExpressionModel", "SpotData", "available_models", "get_model_class", "load", "register_model"]
