"""One JSON codec for the whole library: orjson when installed, exact with the stdlib.

Rows, journal records, provider bodies and dead letters all pass through :func:`dumps` and
:func:`loads`, so every part of the library agrees on how a date, a big integer or a lone
surrogate is written.
"""

from __future__ import annotations

import datetime
import importlib
import json
import re
import sys
from typing import Any

_orjson: Any
try:
    _orjson = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - orjson is an optional speed-up
    _orjson = None


def _default(obj: Any) -> Any:
    """Encode the non-JSON values that file inputs produce (Parquet dates, decimals, bytes)."""
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def dumps(value: Any) -> bytes:
    """Return ``value`` as compact UTF-8 JSON on one line (orjson when installed).

    Dates become ISO strings, decimals and other objects their ``str()``.

    Raises:
        TypeError: The value cannot be written as JSON (a circular or unencodable structure).
        ValueError: The value contains a circular reference, or nests too deeply
            (:class:`NestingError`).
    """
    if _orjson is not None:
        try:
            data: bytes = _orjson.dumps(value, default=_default, option=_orjson.OPT_NON_STR_KEYS)
            return data
        except TypeError:  # big ints, lone surrogates, odd keys: the stdlib copes
            pass
    try:
        text = json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise NestingError(
            "cannot write as JSON: nested too deeply (over about "
            f"{sys.getrecursionlimit():,} levels of lists or dicts)"
        ) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: escape them so the file stays valid UTF-8
        return json.dumps(value, default=_default, separators=(",", ":")).encode("ascii")


_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
_LONG_DIGITS_STR = re.compile(r"\d{19}")


def _has_long_digits(data: bytes | str) -> bool:
    """Return whether ``data`` holds a run of 19 or more digits.

    For bytes (every response body the LLM caller reads) this maps each digit to ``0`` and
    looks for nineteen of them in a row: a few times faster than the regular expression, which
    costs more than orjson's whole parse of a typical answer.
    """
    if isinstance(data, bytes):
        return _LONG_RUN in data.translate(_DIGITS_AS_ZERO)
    return _LONG_DIGITS_STR.search(data) is not None


def loads(data: bytes | str) -> Any:
    """Parse JSON text exactly (orjson when installed, the stdlib for what orjson refuses).

    orjson reads integers beyond 64 bits as floats; text with a run of 19 or more digits
    goes to the stdlib so big integers keep every digit.

    Raises:
        NestingError: The text nests deeper than the parser can follow (a ``ValueError``).
        ValueError: The text is not valid JSON.
    """
    if _orjson is not None and not _has_long_digits(data):
        try:
            return _orjson.loads(data)
        except ValueError:
            pass
    try:
        return json.loads(data)
    except RecursionError:
        raise NestingError(
            "invalid JSON: nested too deeply for this parser (over about "
            f"{sys.getrecursionlimit():,} levels of arrays or objects)"
        ) from None


def loads_api(data: bytes) -> Any:
    """Parse a provider's answer: like :func:`loads`, without looking for big integers.

    An answer's integers are token counts, indexes and timestamps, all within 64 bits (its
    texts are strings, read exactly either way), so the scan :func:`loads` makes for long
    runs of digits is skipped: it is a row's ids that must keep every digit.

    Raises:
        NestingError: The text nests deeper than the parser can follow (a ``ValueError``).
        ValueError: The text is not valid JSON.
    """
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except ValueError:
            pass  # the stdlib says why (or reads what orjson refuses, such as NaN)
    return loads(data)


class NestingError(ValueError):
    """A JSON text nests arrays or objects deeper than the parser can follow.

    orjson refuses past 1,024 levels and the stdlib recurses; either way this is a property
    of one document (a row, a body), so it is a :class:`ValueError` like any malformed JSON
    and never a :class:`RecursionError` that would stop a whole job.
    """
