"""``df.llm.enrich(...)`` for pandas and Polars, registered when this module is imported.

::

    import pipeline.frames.accessors  # noqa: F401 - registers the `llm` accessors

    df = df.llm.enrich(model="gpt-4o-mini", prompt="Summarize: {text}")

Each accessor is a thin shim over :func:`~pipeline.frames.enrich` and
:func:`~pipeline.frames.aenrich` (same options, same results). The pandas accessor is
registered when pandas is installed, the Polars namespace (on DataFrame and LazyFrame) when
Polars is; importing this module imports them.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from pipeline.frames._api import aenrich, enrich

if TYPE_CHECKING:
    from typing import Unpack

    from pipeline.frames._options import EnrichOptions

NAME = "llm"
"""The accessor's attribute name: ``df.llm``."""


class LLMAccessor:
    """The ``llm`` accessor of a pandas or Polars DataFrame (or Polars LazyFrame).

    Args:
        data: The frame it is attached to.
    """

    def __init__(self, data: Any) -> None:
        self._data = data

    def enrich(self, **options: Unpack[EnrichOptions]) -> Any:
        """Return :func:`~pipeline.frames.enrich` of this frame."""
        return enrich(self._data, **options)

    async def aenrich(self, **options: Unpack[EnrichOptions]) -> Any:
        """Return :func:`~pipeline.frames.aenrich` of this frame."""
        return await aenrich(self._data, **options)


def _register() -> list[str]:
    registered = []
    if importlib.util.find_spec("pandas") is not None:
        import pandas as pd

        pd.api.extensions.register_dataframe_accessor(NAME)(LLMAccessor)
        registered.append("pandas")
    if importlib.util.find_spec("polars") is not None:
        import polars as pl

        pl.api.register_dataframe_namespace(NAME)(LLMAccessor)
        pl.api.register_lazyframe_namespace(NAME)(LLMAccessor)
        registered.append("polars")
    return registered


REGISTERED = _register()
"""The libraries that got the accessor (``["pandas", "polars"]`` with both installed)."""

__all__ = ["NAME", "REGISTERED", "LLMAccessor"]
