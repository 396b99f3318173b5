"""Type-check (and gently coerce) dataclass configs by their field annotations.

Settings arrive from YAML and the command line as well as from Python, and YAML has quirks:
it reads ``1e-4`` as the *string* "1e-4" (YAML 1.1 wants ``1.0e-4``). One helper, driven by the
annotations that already document every field, turns what is unambiguous into the declared
type and refuses the rest with one line that names the field and the type it wants:

- ``float``: an int or float, or a string that is a plain decimal number ("1e-4");
- ``int``: an int, or a float with an integral value (``1.0e+7``); never a string, so
  ``batch_size: "64"`` (quoted on purpose or by mistake) is an error, not a guess;
- ``bool``: true/false only; ``str``: strings only; ``X | None``: also null;
- ``tuple[T, ...]`` / ``list[T]``: a list or tuple, each element checked; ``dict``: a mapping.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing

from sasa.errors import SasaError

_FLOAT_TEXT = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


class _Bad(Exception):
    pass


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, f"a {getattr(tp, '__name__', tp)}")


def _coerce(value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except _Bad:
                    pass
        raise _Bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise _Bad
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value):
            return float(value)
        raise _Bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Bad
        elem = args[0] if args else typing.Any
        out = [_coerce(v, elem) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Bad
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Bad
    return value  # an annotation this helper does not know: left to the config's own checks


def coerce(value, tp, name: str):
    """``value`` as type ``tp``, or a SasaError naming ``name`` and the type it wants."""
    try:
        return _coerce(value, tp)
    except _Bad:
        raise SasaError(f"{name} must be {_describe(tp)}, got {value!r}") from None


def field_types(cls) -> dict:
    """{field name: resolved annotation} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(obj) -> None:
    """Coerce every field of a dataclass instance to its annotation in place, or raise."""
    for name, tp in field_types(type(obj)).items():
        object.__setattr__(obj, name, coerce(getattr(obj, name), tp, name))


def coerce_mapping(cls, values: dict) -> dict:
    """``values`` (a subset of ``cls``'s fields) coerced to the field types; unknown keys kept."""
    types_ = field_types(cls)
    return {k: coerce(v, types_[k], k) if k in types_ else v for k, v in values.items()}
