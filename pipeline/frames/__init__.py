"""LLM answers for tables: pandas, Polars and Arrow, in scripts, pipelines and notebooks.

One function family with the file jobs' options (:class:`EnrichOptions`)::

    from pipeline.frames import enrich

    df = enrich(df, model="gpt-4o-mini", prompt="Summarize: {text}")   # adds 'response', 'error'

:func:`enrich` blocks (and works inside Jupyter's running event loop), :func:`aenrich` is its
async twin for in-memory tables, and :func:`astream` streams any table (a Polars LazyFrame, an
Arrow ``RecordBatchReader``) in bounded batches. Failed rows get a null answer and an error;
``checkpoint=`` makes a re-run send only the rows not yet answered. ``import
pipeline.frames.accessors`` adds ``df.llm.enrich(...)`` to pandas and Polars. pandas, Polars and
pyarrow are imported only when given: install the ``pandas`` or ``polars`` extra.
"""

from pipeline.frames._api import aenrich as aenrich
from pipeline.frames._api import astream as astream
from pipeline.frames._api import enrich as enrich
from pipeline.frames._engine import RowFailedError as RowFailedError
from pipeline.frames._options import EnrichOptions as EnrichOptions

__all__ = ["EnrichOptions", "RowFailedError", "aenrich", "astream", "enrich"]
