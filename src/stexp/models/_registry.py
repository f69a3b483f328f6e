"""The model registry: every model ``stexp.tl.fit`` can train is registered here by name, by its decorator."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._base import ExpressionModel

_REGISTRY: dict[str, type] = {}

#: Modules that define the built-in models; each registers its models with :func:`register_model` when
#: imported. They are imported on the first look-up of a name not registered yet (``import stexp`` stays fast).
_BUILTIN_MODULES = (
    "stexp.models._baselines",
    "stexp.models._mlp",
    "stexp.models._mclstexp",
    "stexp.models._mclstexp_plus",
    "stexp.models._nh2st",
    "stexp.models._ensemble",
)
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
    if key not in _REGISTRY:
        _load_builtins()
    if key not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {available_models()}.")
    return _REGISTRY[key]


def available_models() -> list[str]:
    """Names of all registered models (built-in and user-registered)."""
    _load_builtins()
    return sorted(_REGISTRY)
