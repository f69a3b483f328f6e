"""Hyper-parameters declared as typed keyword arguments of a model's ``__init__``, and the one checker.

A model declares each hyper-parameter as a keyword-only argument with a type hint and a default
(``def __init__(self, genes, *, k: int = 50, **kwargs)``), passes it on to ``super().__init__`` and checks
its range with :func:`check_hparams`. :func:`hparam_specs` reads the declarations from the ``__init__``
signatures of the class and its bases (a subclass that re-declares a parameter changes its default), so
``default_hparams`` is derived, never written by hand. :meth:`HParam.check` types a value at the boundary:
an ``int`` parameter given ``200.0`` holds ``200``, a ``float`` one given ``1`` holds ``1.0``, a sequence
holds a list; a value of another type raises a TypeError naming the model, the parameter and the value.
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ._base import ExpressionModel

#: Keyword arguments of every model that are not hyper-parameters (they describe the features).
BASE_KWARGS = ("features_key", "encoder_spec")

_NO = object()  # "the value does not have this type"


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a model: its name, default and declared type.

    Attributes
    ----------
    name
        The keyword.
    default
        The default as declared in the signature.
    annotation
        The declared type (``typing.Any`` when undeclared).
    text
        The type as written in the signature (``""`` when undeclared), for messages.
    """

    name: str
    default: Any
    annotation: Any = Any
    text: str = ""

    def check(self, model: str, value: Any) -> Any:
        """``value`` typed as declared (``200.0`` for an ``int``: ``200``; a sequence: a list).

        Raises
        ------
        TypeError
            If ``value`` is not of the declared type; ValueError if it has the type of one of the allowed
            literals but is none of them (e.g. ``"sharp"`` for ``float | Literal["auto"]``). Both name
            ``model``, the parameter and the value.
        """
        out = _convert(value, self.annotation)
        if out is not _NO:
            return out
        literals = [a for a in _literals(self.annotation) if type(a) is type(value)]
        error = ValueError if literals else TypeError
        raise error(
            f"{model}: {self.name} must be {_describe(self.annotation)}, got {value!r} ({type(value).__name__})."
        )

    @property
    def default_value(self) -> Any:
        """The default as the model holds it (typed like a given value; a fresh copy)."""
        out = _convert(self.default, self.annotation)
        return copy.deepcopy(self.default if out is _NO else out)

    def __str__(self) -> str:
        return f"{self.name}: {self.text} = {self.default!r}" if self.text else f"{self.name}={self.default!r}"


def hparam_specs(cls: type) -> dict[str, HParam]:
    """Every hyper-parameter of model class ``cls``, by name, from the ``__init__`` signatures of its MRO.

    A hyper-parameter is a keyword-only argument with a default (except ``features_key`` and
    ``encoder_spec``). Walking from ``cls`` to its bases, the first declaration of a name gives its default
    and type (so a subclass re-declaring ``max_epochs: int = 90`` changes the default of its parent's); the
    subclass's own names come first. A class that still declares ``default_hparams`` as a dict (the older
    way) contributes its keys and defaults, typed by a base that declares the name, else untyped.
    """
    cached = cls.__dict__.get("_hparam_specs_")
    if cached is not None:
        return cached
    specs: dict[str, HParam] = {}
    legacy: dict[str, Any] = {}  # older-style defaults, typed later by a base's declaration
    for klass in cls.__mro__:
        declared = klass.__dict__.get("_declared_hparams_")
        if declared is not None:
            for name, default in declared.items():
                if name not in specs and name not in legacy:
                    legacy[name] = default
        init = klass.__dict__.get("__init__")
        if init is None or getattr(init, "_stexp_legacy_hparams_", False):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is not p.KEYWORD_ONLY or p.default is p.empty or p.name in BASE_KWARGS or p.name in specs:
                continue
            text = p.annotation if isinstance(p.annotation, str) else _text(p.annotation)
            annotation = _evaluate(p.annotation, init, cls, p.name)
            default = legacy.pop(p.name) if p.name in legacy else p.default
            specs[p.name] = HParam(p.name, default, annotation, text if p.annotation is not p.empty else "")
    for name, default in legacy.items():
        specs[name] = HParam(name, default)
    type.__setattr__(cls, "_hparam_specs_", specs)
    return specs


def describe_hparams(cls: type) -> str:
    """``"k: int = 50, temperature: float | Literal['auto'] | None = 0.1, ..."`` (or ``"no options"``)."""
    specs = hparam_specs(cls)
    return ", ".join(str(s) for s in specs.values()) if specs else "no options"


def typed_hparams(cls: type, hparams: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """``hparams`` (names known to ``cls``) typed as declared; see :meth:`HParam.check`."""
    specs = hparam_specs(cls)
    name = model or str(getattr(cls, "name", cls.__name__))
    return {k: specs[k].check(name, v) if k in specs else v for k, v in hparams.items()}


def check_hparams(
    model: ExpressionModel | str,
    hparams: Mapping[str, Any] | None = None,
    *,
    positive_int: tuple[str, ...] = (),
    non_negative_int: tuple[str, ...] = (),
    min_int: Mapping[str, int] | None = None,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    fraction: tuple[str, ...] = (),
    unit_interval: tuple[str, ...] = (),
) -> None:
    """Raise a ValueError naming the model, the first hyper-parameter outside its range and its value.

    ``positive_int``: integers >= 1; ``non_negative_int``: integers >= 0; ``min_int``: integers >= the
    given bound; ``positive``: numbers > 0; ``non_negative``: numbers >= 0; ``fraction``: numbers in
    [0, 1); ``unit_interval``: numbers in [0, 1]. A list value must be non-empty with every item in range.

    ``model`` is the model (its ``hparams`` are checked unless ``hparams`` is given, and a ``None`` or a
    string that its declared type allows, such as ``temperature="auto"``, is not a number to check), or a
    model name with ``hparams`` (every value checked).
    """
    name = model if isinstance(model, str) else model.name
    if hparams is None:
        if isinstance(model, str):
            raise TypeError("check_hparams: pass the hyper-parameters with a model name.")
        hparams = model.hparams
    typed = {} if isinstance(model, str) else hparam_specs(type(model))

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer, float)) and not isinstance(v, bool) and float(v).is_integer()

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and bool(np.isfinite(v))

    rules = [
        (positive_int, lambda v, _: is_int(v) and v >= 1, "a positive integer"),
        (non_negative_int, lambda v, _: is_int(v) and v >= 0, "a non-negative integer"),
        (tuple(min_int or ()), lambda v, key: is_int(v) and v >= (min_int or {})[key], "an integer >= {bound}"),
        (positive, lambda v, _: is_number(v) and v > 0, "a positive number"),
        (non_negative, lambda v, _: is_number(v) and v >= 0, "a number >= 0"),
        (fraction, lambda v, _: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        (unit_interval, lambda v, _: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ]
    for keys, ok, what in rules:
        for key in keys:
            value = hparams[key]
            if key in typed and (value is None or isinstance(value, str)):
                continue  # allowed by the declared type (checked when the model was made)
            must = what.format(bound=(min_int or {}).get(key))
            if isinstance(value, (list, tuple, np.ndarray)):
                good = len(value) > 0 and all(ok(v, key) for v in value)
                must = f"a non-empty list, each {must}"
            else:
                good = ok(value, key)
            if not good:
                raise ValueError(f"{name}: {key} must be {must}, got {value!r}.")


# -- types ------------------------------------------------------------------------------------------
def _evaluate(annotation: Any, init: Any, cls: type, name: str) -> Any:
    """The type an annotation string names, in the namespace of the module that wrote it."""
    if annotation is inspect.Parameter.empty:
        return Any
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, init.__globals__)  # the class's own source text, as typing.get_type_hints does
    except Exception as err:  # a name it uses is missing, or the text is not an expression
        raise TypeError(
            f"{cls.__name__}: the type of hyper-parameter {name} ({annotation}) cannot be evaluated in "
            f"{init.__module__} ({err}); import the names it uses at run time, not under TYPE_CHECKING."
        ) from err


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _literals(tp: Any) -> list[Any]:
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    if _is_union(tp):
        return [lit for arg in get_args(tp) for lit in _literals(arg)]
    return []


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int-valued floats to int, ints to float, sequences to lists), or ``_NO``."""
    if tp is Any:
        return value
    if tp is None or tp is type(None):
        return None if value is None else _NO
    if _is_union(tp):
        for arg in get_args(tp):
            out = _convert(value, arg)
            if out is not _NO:
                return out
        return _NO
    origin = get_origin(tp)
    if origin is Literal:
        return value if any(type(value) is type(a) and value == a for a in get_args(tp)) else _NO
    if isinstance(value, (bool, np.bool_)):
        return bool(value) if tp is bool else _NO
    if tp is bool:
        return _NO
    if tp is int:
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        return _NO
    if tp is float:
        return float(value) if isinstance(value, (int, float, np.integer, np.floating)) else _NO
    if origin in (list, tuple, Sequence) or tp in (list, tuple, Sequence):
        if isinstance(value, np.ndarray) and value.ndim == 1:
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            return _NO
        args = get_args(tp)
        item = args[0] if args else Any
        items = [_convert(v, item) for v in value]
        return _NO if any(v is _NO for v in items) else items
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _NO
    return value  # a form not checked here


def _describe(tp: Any) -> str:
    """``int | None`` -> ``"an integer or None"``."""
    if tp is Any:
        return "any value"
    if tp is None or tp is type(None):
        return "None"
    if _is_union(tp):
        parts = [_describe(a) for a in get_args(tp)]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence) or tp in (list, tuple, Sequence):
        args = get_args(tp)
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _describe(args[0])) if args else 'values'}"
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return inspect.formatannotation(annotation)
