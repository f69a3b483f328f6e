"""Lazy attribute loading for the public namespaces (keeps ``import stexp`` fast)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_namespace(package: str, attributes: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose attributes live in submodules.

    Parameters
    ----------
    package
        The package's ``__name__``.
    attributes
        Public name -> relative module that defines it (e.g. ``{"fit": "._fit"}``).
    """

    def __getattr__(name: str):
        if name not in attributes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(attributes[name], package), name)
        import sys

        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(attributes)

    return __getattr__, __dir__, sorted(attributes)
