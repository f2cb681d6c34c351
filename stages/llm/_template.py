"""Prompt templates: data, not code.

A template is text with ``{field}`` placeholders over a row's fields, the same syntax as
``str.format`` but deliberately smaller, because templates come from users of a service as
well as from the programmer:

- a placeholder names one field of the row: no attribute access (``{a.b}``), no indexing
  (``{a[0]}``), no positional fields (``{0}``, ``{}``) and no conversions (``{a!r}``);
  a row that is not a mapping is reachable as ``{value}``;
- a format spec is optional and bounded: ``[[fill]align][sign][z][#][0][width][grouping]
  [.precision][type]`` with ``width`` at most :data:`MAX_WIDTH` and ``precision`` at most
  :data:`MAX_PRECISION`, and no nested ``{}`` inside a spec;
- the rendered prompt is bounded (``max_chars``): a row whose prompt would be larger is that
  row's error, not the process's memory.

Everything that can be checked without a row is checked when the template is made
(:class:`~pipeline._errors.ConfigError` naming the problem); :meth:`PromptTemplate.check`
checks it against a sample row or the input's column names before anything is sent, with a
did-you-mean for a mistyped field.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pipeline._errors import ConfigError, ItemError, MissingFieldError

MAX_WIDTH = 1_000
"""The widest field a format spec may ask for (``{name:>1000}``)."""
MAX_PRECISION = 100_000
"""The largest precision a format spec may ask for (``{text:.100000}`` truncates)."""
DEFAULT_MAX_CHARS = 1_000_000
"""The largest prompt a template renders by default, in characters."""

NullPolicy = Literal["error", "empty"]

_SPEC = re.compile(
    r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?z?#?0?(?P<width>\d+)?[,_]?"
    r"(?:\.(?P<precision>\d+))?(?P<type>[bcdeEfFgGnosxX%])?",
    re.DOTALL,
)
_NUMERIC_TYPES = frozenset("bcdeEfFgGnxX%o")


def _check_spec(template: str, name: str, spec: str) -> None:
    if "{" in spec or "}" in spec:
        raise ConfigError(
            f"prompt template {template!r}: field {{{name}}} has a nested field in its format "
            "spec; only a plain spec such as :>10 or :.200 is allowed"
        )
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(f"prompt template {template!r}: {{{name}:{spec}}} is not a format spec")
    width, precision = match.group("width"), match.group("precision")
    if width is not None and int(width) > MAX_WIDTH:
        raise ConfigError(
            f"prompt template {template!r}: {{{name}:{spec}}} asks for a width of {width}; "
            f"at most {MAX_WIDTH:,} is allowed"
        )
    if precision is not None and int(precision) > MAX_PRECISION:
        raise ConfigError(
            f"prompt template {template!r}: {{{name}:{spec}}} asks for a precision of "
            f"{precision}; at most {MAX_PRECISION:,} is allowed"
        )


def _check_name(template: str, name: str, conversion: str | None) -> None:
    if name == "" or name.isdigit():
        raise ConfigError(
            f"prompt template {template!r}: positional field {{{name}}} is not allowed; "
            "name a field of the row, e.g. {text} (a row that is not a mapping is {value})"
        )
    if "." in name or "[" in name:
        raise ConfigError(
            f"prompt template {template!r}: {{{name}}} reaches into a value "
            "(attribute or index access is not allowed); name a field of the row only"
        )
    if conversion is not None:
        raise ConfigError(
            f"prompt template {template!r}: {{{name}!{conversion}}} uses a conversion, "
            "which is not allowed; write {" + name + "}"
        )


class PromptTemplate:
    """A checked prompt template over a row's fields.

    Args:
        text: The template, e.g. ``"Summarise: {text}"``.
        null: What a ``null``/``None`` field renders as: ``"error"`` (the row is a dead letter,
            the default: a prompt saying "None" is rarely what anyone meant) or ``"empty"``.
        max_chars: The largest prompt a row may render to; a larger one is that row's error.

    Raises:
        ConfigError: The template is malformed or uses something outside the language above.
    """

    __slots__ = ("_parts", "fields", "max_chars", "null", "text")

    def __init__(
        self,
        text: str,
        *,
        null: NullPolicy = "error",
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if not isinstance(text, str):
            raise ConfigError(f"prompt template must be text, not {type(text).__name__}")
        if null not in ("error", "empty"):
            raise ConfigError(f"null must be 'error' or 'empty', not {null!r}")
        if max_chars < 1:
            raise ConfigError(f"max_chars must be at least 1, not {max_chars}")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"prompt template {text!r} is malformed: {exc}") from None
        parts: list[tuple[str, str | None, str]] = []
        for literal, name, spec, conversion in parsed:
            if name is not None:
                _check_name(text, name, conversion)
                _check_spec(text, name, spec or "")
            parts.append((literal, name, spec or ""))
        self.text = text
        self.null: NullPolicy = null
        self.max_chars = max_chars
        self._parts = tuple(parts)
        self.fields = tuple(dict.fromkeys(name for _, name, _ in parts if name is not None))

    def __repr__(self) -> str:
        return f"PromptTemplate({self.text!r}, null={self.null!r}, max_chars={self.max_chars})"

    def render(self, record: Any) -> str:
        """Fill the template from ``record`` (a mapping, or any other value as ``{value}``).

        Raises:
            MissingFieldError: A field the template names is missing from the record.
            ItemError: A field is null (with ``null="error"``), its value does not fit its
                format spec, or the prompt would exceed ``max_chars``.
        """
        plain = type(record) is dict  # the usual row: its text fields are read directly
        values: Mapping[str, Any] = (
            record if plain or isinstance(record, Mapping) else {"value": record}
        )
        out: list[str] = []
        size = 0
        for literal, name, spec in self._parts:
            out.append(literal)
            size += len(literal)
            if name is None:
                continue
            piece = values.get(name) if plain and not spec else None
            if type(piece) is not str:  # missing, null, not text, or formatted: checked
                piece = self._field(values, name, spec)
            size += len(piece)
            if size > self.max_chars:
                raise ItemError(
                    f"the prompt for this row would be over {self.max_chars:,} characters "
                    f"(field {name!r} alone is {len(piece):,})"
                )
            out.append(piece)
        return "".join(out)

    def _field(self, values: Mapping[str, Any], name: str, spec: str) -> str:
        try:
            value = values[name]
        except KeyError:
            raise MissingFieldError(name, list(values)) from None
        except TypeError:  # a mapping with unhashable or odd keys
            raise MissingFieldError(name, list(values)) from None
        if value is None:
            if self.null == "empty":
                return ""
            raise ItemError(
                f"field {name!r} is null; fill it, or render nulls as empty text "
                "(null='empty', --null-as-empty)"
            )
        if not spec:
            return value if isinstance(value, str) else str(value)
        try:
            return format(value, spec)
        except (ValueError, TypeError) as exc:
            raise ItemError(
                f"field {name!r} = {_short(value)} does not fit the format spec {spec!r}: {exc}"
            ) from None

    def check(self, sample: Mapping[str, Any] | Iterable[str]) -> None:
        """Check the template against a sample row, or the input's column names, before sending.

        With a row, each field is also rendered, so a value that cannot take its format spec
        (``{name:d}`` over text) is found now rather than on every row.

        Raises:
            ConfigError: A field is not among the columns (with a did-you-mean and the list of
                available fields), or the sample row's value does not fit its spec.
        """
        columns = [str(c) for c in sample]
        for name in self.fields:
            if name not in columns:
                raise ConfigError(_unknown_field(self.text, name, columns))
        if not isinstance(sample, Mapping):
            return
        for _, field, spec in self._parts:
            if field is None or not spec or sample.get(field) is None:
                continue
            try:
                format(sample[field], spec)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"prompt template {self.text!r}: field {field!r} of the first row is "
                    f"{_short(sample[field])}, which does not fit {{{field}:{spec}}}: {exc}"
                ) from None


def _unknown_field(text: str, name: str, columns: Sequence[str]) -> str:
    message = f"prompt template {text!r} names field {name!r}, which the input does not have"
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {{{close[0]}}}?"
    shown = ", ".join(columns[:30]) + (", ..." if len(columns) > 30 else "")
    return f"{message} (available fields: {shown or 'none'})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
