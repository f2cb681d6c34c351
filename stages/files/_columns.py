"""Column types of JSON rows, inferred in plain Python for the Parquet sink.

:class:`Columns` folds rows (decoded JSON objects) into one type per column, with the rules
``pyarrow.array`` applies to Python values, widened across rows the way
``pyarrow.unify_schemas(promote_options="permissive")`` does: null fits anything, an integer
among floats makes the column double, a list's items and a struct's fields widen the same way
(fields in the order first seen), and values that share no type (text and numbers, booleans
and numbers, an integer beyond int64, an integer a double cannot hold exactly among floats)
make the column *mixed*, written as JSON text. A struct with no fields anywhere in a column is
mixed too: Parquet cannot store it.

Why not ``pyarrow.array``: converting Python objects makes pyarrow import pandas (when it is
installed) to ask whether each object is a pandas one, about 60 MB of memory for nothing. The
sink infers here and lets pyarrow's JSON reader build the arrays from the rows' JSON text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MIXED", "Columns", "Kind", "ListKind", "StructKind"]

NULL = "null"
BOOL = "bool"
INT = "int"
BIG = "bigint"
"""An int64 a double cannot hold exactly (beyond 2**53 in magnitude)."""
FLOAT = "float"
STR = "str"
MIXED = "mixed"
"""Values that share no Arrow type: the column is written as JSON text."""

_EXACT = 1 << 53
_INT64 = 1 << 63
_NUMBERS = {
    (INT, FLOAT): FLOAT,
    (FLOAT, INT): FLOAT,
    (INT, BIG): BIG,
    (BIG, INT): BIG,
}


class ListKind:
    """A list column's type: the type its items widen to."""

    __slots__ = ("item",)

    def __init__(self) -> None:
        self.item: Kind = NULL


class StructKind:
    """A struct column's type: each field's type, in the order first seen."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, Kind] = {}


Kind = str | ListKind | StructKind
"""A column's type so far: a scalar name, :data:`MIXED`, or a list or struct kind."""


def widen(kind: Kind, value: Any) -> Kind:
    """Return ``kind`` widened to hold ``value`` (list and struct kinds widen in place)."""
    if value is None or kind is MIXED:
        return kind
    cls = type(value)
    if cls is dict:
        return _widen_struct(kind, value)
    if cls is list:
        return _widen_list(kind, value)
    if cls is int:
        new = INT if -_EXACT <= value <= _EXACT else BIG if -_INT64 <= value < _INT64 else MIXED
    elif cls is float:
        new = FLOAT
    elif cls is str:
        new = STR
    elif cls is bool:
        new = BOOL
    else:  # not a JSON value
        return MIXED
    if kind == new or new is MIXED:
        return new
    if kind == NULL:
        return new
    if isinstance(kind, str):
        return _NUMBERS.get((kind, new), MIXED)
    return MIXED


def _widen_list(kind: Kind, value: list[Any]) -> Kind:
    if kind == NULL:
        kind = ListKind()
    elif not isinstance(kind, ListKind):
        return MIXED
    item = kind.item
    for v in value:
        item = widen(item, v)
        if item is MIXED:
            return MIXED
    kind.item = item
    return kind


def _widen_struct(kind: Kind, value: dict[str, Any]) -> Kind:
    if kind == NULL:
        kind = StructKind()
    elif not isinstance(kind, StructKind):
        return MIXED
    fields = kind.fields
    for name, v in value.items():
        field = widen(fields.get(name, NULL), v)
        if field is MIXED:
            return MIXED
        fields[name] = field
    return kind


def storable(kind: Kind) -> bool:
    """Whether Parquet can store the kind (no struct without fields anywhere inside)."""
    if isinstance(kind, ListKind):
        return storable(kind.item)
    if isinstance(kind, StructKind):
        return bool(kind.fields) and all(storable(k) for k in kind.fields.values())
    return kind is not MIXED


def arrow_type(pa: Any, kind: Kind) -> Any:
    """Return the Arrow type of a storable kind (``pa`` is the ``pyarrow`` module)."""
    if isinstance(kind, ListKind):
        return pa.list_(arrow_type(pa, kind.item))
    if isinstance(kind, StructKind):
        return pa.struct([(name, arrow_type(pa, k)) for name, k in kind.fields.items()])
    scalars = {
        NULL: pa.null(),
        BOOL: pa.bool_(),
        INT: pa.int64(),
        BIG: pa.int64(),
        FLOAT: pa.float64(),
        STR: pa.string(),
    }
    return scalars[kind]


class Columns:
    """The columns of a stream of rows and each one's type (see the module's docstring)."""

    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        """Widen the columns by one row; a field the rows have not had yet is a new column."""
        kinds = self.kinds
        for name, value in row.items():
            kind = kinds.get(name, NULL)
            if kind is not MIXED:
                kinds[name] = widen(kind, value)
            # (a mixed column stays mixed whatever comes)

    def schema(self, pa: Any) -> tuple[Any, list[str]]:
        """Return the Arrow schema and the names of the columns written as JSON text."""
        as_json = [name for name, kind in self.kinds.items() if not storable(kind)]
        fields = [
            (name, pa.string() if name in as_json else arrow_type(pa, kind))
            for name, kind in self.kinds.items()
        ]
        return pa.schema(fields), as_json
