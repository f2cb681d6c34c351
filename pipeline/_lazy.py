"""Package faces that import each public name on first use (a module ``__getattr__``, PEP 562).

A face keeps a table of where each of its names is defined; a plain JSONL job then imports
only the modules it uses (see ``tests/test_fast_start.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["load"]


def load(name: str, where: Mapping[str, str], namespace: MutableMapping[str, Any]) -> Any:
    """Return ``name`` from the module ``where`` gives for it, and keep it in ``namespace``.

    Args:
        name: The attribute asked of the package.
        where: Each public name's defining module.
        namespace: The package's ``globals()``: the name is found there from then on.

    Raises:
        AttributeError: The package has no such name.
    """
    module = where.get(name)
    if module is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value
