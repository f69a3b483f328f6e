"""The model registry: every model ``stexp.tl.fit`` can train is registered here by name."""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, type] = {}

#: Built-in models and the module that registers each (imported on first use, keeping imports cheap).
_BUILTIN: dict[str, str] = {
    "mean": "stexp.models._baselines",
    "ridge": "stexp.models._baselines",
    "knn": "stexp.models._baselines",
    "mlp": "stexp.models._mlp",
    "mclstexp": "stexp.models._mclstexp",
    "nh2st": "stexp.models._nh2st",
}


def register_model(name: str):
    """Class decorator that registers an :class:`~stexp.models.ExpressionModel` under ``name``."""

    def decorator(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_model_class(name: str) -> type:
    """The model class registered under ``name``.

    Raises
    ------
    KeyError
        If no model has that name; the message lists the registry.
    """
    key = name.lower()
    if key not in _REGISTRY and key in _BUILTIN:
        importlib.import_module(_BUILTIN[key])
    if key not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {available_models()}.")
    return _REGISTRY[key]


def available_models() -> list[str]:
    """Names of all registered models (built-in and user-registered)."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))
