"""The model registry: every model ``stexp.tl.fit`` can train is registered here by name, by its decorator."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._base import ExpressionModel

_REGISTRY: dict[str, type] = {}

#: The built-in models and the modules that define them; a module registers its models with
#: :func:`register_model` when imported. A look-up imports only the module of the name asked for, so the
#: numpy models never import torch (``import stexp`` and ``stexp.models`` stay fast).
_BUILTIN_MODELS = {
    "mean": "stexp.models._baselines",
    "ridge": "stexp.models._baselines",
    "knn": "stexp.models._baselines",
    "ridge_knn": "stexp.models._ensemble",
    "mlp": "stexp.models._mlp",
    "mclstexp": "stexp.models._mclstexp",
    "mclstexp_plus": "stexp.models._mclstexp_plus",
    "nh2st": "stexp.models._nh2st",
}
_BUILTIN_MODULES = tuple(dict.fromkeys(_BUILTIN_MODELS.values()))
_loaded = False


def register_model(name: str):
    """Class decorator that registers an :class:`~stexp.models.ExpressionModel` under ``name``."""

    def decorator(cls):
        cls.name = name
        _REGISTRY[name.lower()] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def get_model_class(name: str) -> type[ExpressionModel]:
    """The model class registered under ``name``.

    Raises
    ------
    KeyError
        If no model has that name; the message lists the registry.
    """
    key = str(name).lower()
    if key not in _REGISTRY and key in _BUILTIN_MODELS:
        importlib.import_module(_BUILTIN_MODELS[key])
    if key not in _REGISTRY:
        _load_builtins()
    if key not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {available_models()}.")
    return _REGISTRY[key]


def available_models() -> list[str]:
    """Names of all registered models (built-in and user-registered)."""
    _load_builtins()
    return sorted(_REGISTRY)
