"""Dataclass fields checked against their annotations: what makes any value from a JSON, YAML or TOML file a clear
error naming its field (config.py, training/config.py) before a validation rule compares it with a number.

Supported annotations: int (not bool), float (int or float, finite), bool, str, None, unions of these,
list[T], tuple[T, ...], tuple[T1, T2], dict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of a dataclass."""
    return typing.get_type_hints(cls)


def check_field_types(obj: Any, error: type[Exception] = TypeError) -> None:
    """`error` naming the first field of the dataclass `obj` whose value does not have the annotated type."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise error(f"{f.name} must be {_type_words(hints[f.name])}, got {value!r} ({type(value).__name__})")


def default_value(f: dataclasses.Field) -> Any:
    """The value a field gets when it is not given."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def admits_none(hint: Any) -> bool:
    return hint is type(None) or (isinstance(hint, types.UnionType) and type(None) in hint.__args__)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _matches(v: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_matches(v, h) for h in hint.__args__)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(v, list) and all(_matches(x, item) for x in v)
    if origin is tuple:  # JSON, YAML and TOML give lists
        items = typing.get_args(hint)
        if not isinstance(v, list | tuple):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_matches(x, items[0]) for x in v)
        return len(v) == len(items) and all(_matches(x, h) for x, h in zip(v, items, strict=True))
    if origin is dict or hint is dict:
        return isinstance(v, dict)
    return {type(None): v is None, int: is_int(v), float: is_number(v), bool: isinstance(v, bool),
            str: isinstance(v, str)}[hint]


_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               type(None): "null"}


def _type_words(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_words(h) for h in hint.__args__)
    if typing.get_origin(hint) in (list, tuple):
        items = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and items[-1] is not Ellipsis:
            return f"a list of {len(items)} values ({', '.join(_type_words(h) for h in items)})"
        return f"a list of {_type_words(items[0]).removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(hint) is dict or hint is dict:
        return "an object"
    return _TYPE_WORDS[hint]
