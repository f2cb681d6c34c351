"""Checking configuration dataclasses against their type hints.

Settings objects (a job's settings, the simulator's config) are dataclasses built from
untrusted data: a TOML file, a JSON request body, CLI flags. :func:`check_fields` checks each
field's value against the field's annotation and normalises it (an ``int`` where a ``float`` is
annotated becomes a float, a path object where a ``str`` is annotated becomes a string), so a
wrong value is refused at construction with a :class:`~pipeline._errors.ConfigError` that
names the field, instead of failing later somewhere else::

    @dataclasses.dataclass
    class Config:
        rate: float = 1.0
        mode: Literal["a", "b"] = "a"

        def __post_init__(self) -> None:
            check_fields(self)

Supported annotations: ``bool``, ``int``, ``float`` (finite), ``str``, ``Literal[...]``,
``dict[...]`` (any mapping, copied to a dict with string keys), ``list[...]`` (any sequence
but a string, copied to a list), each optionally ``| None``.
A field with another annotation needs a checker of its own (``checkers=``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pipeline._errors import ConfigError

FieldChecker = Callable[[Any], Any]
"""Checks one field's value (after the generic check) and returns it, possibly normalised."""


def type_name(value: Any) -> str:
    """Return how an error message names the type of ``value`` (``null`` for ``None``)."""
    return "null" if value is None else type(value).__name__


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def check_fields(
    instance: Any,
    *,
    label: Callable[[str], str] | None = None,
    checkers: Mapping[str, FieldChecker] | None = None,
) -> None:
    """Check and normalise every field of a dataclass instance against its type hint.

    Args:
        instance: The dataclass instance (usually ``self`` in ``__post_init__``).
        label: How an error message names a field (default ``ClassName.field``).
        checkers: Field-specific checks run after the generic one, by field name, for what
            the annotation does not say (the values of a mapping, a range).

    Raises:
        ConfigError: A value does not match its field's annotation; the message names the
            field and what was given.
        TypeError: An annotation this function does not support (a programming error).
    """
    cls = type(instance)
    name_of = label or (lambda name: f"{cls.__name__}.{name}")
    hints = _hints(cls)
    for field in dataclasses.fields(instance):
        value = check_value(name_of(field.name), getattr(instance, field.name), hints[field.name])
        if checkers is not None and field.name in checkers and value is not None:
            value = checkers[field.name](value)
        object.__setattr__(instance, field.name, value)


def check_value(what: str, value: Any, hint: Any) -> Any:
    """Check one value against a type hint; return it normalised.

    Args:
        what: How the error message names the value (``"setting 'rpm'"``).
        value: The value.
        hint: The annotation (resolved: a type, ``Literal[...]``, ``X | None``...).

    Raises:
        ConfigError: The value does not match.
    """
    container = typing.get_origin(hint) in (list, dict, Literal)
    args = () if container else typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{what} cannot be null")
    base = [a for a in args if a is not type(None)] if args else [hint]
    kind = base[0] if len(base) == 1 else hint
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(
                f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{what} must be a table, got {type_name(value)}")
        return {str(k): v for k, v in value.items()}
    if origin is list:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {type_name(value)}")
        return list(value)
    checker = _SCALARS.get(kind)
    if checker is None:
        raise TypeError(f"check_value: no check for {what} annotated {hint!r}")
    return checker(what, value)


def _check_bool(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


def _check_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {type_name(value)}")
    return value


def _check_float(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _check_str(what: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {type_name(value)}")
    return value


_SCALARS: dict[Any, Callable[[str, Any], Any]] = {
    bool: _check_bool,
    int: _check_int,
    float: _check_float,
    str: _check_str,
}

__all__ = ["FieldChecker", "check_fields", "check_value", "type_name"]
