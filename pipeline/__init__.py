"""Asynchronous stream-processing pipelines for calling LLM APIs at scale.

Declare a pipeline from stages connected by bounded channels, then run it (the stage library
is the ``stages`` package; the simulated server for tests is :mod:`pipeline.testing`)::

    import pipeline

    async def enrich(row: dict) -> dict:
        return {**row, "shout": row["name"].upper()}

    report = await pipeline.Pipeline([{"name": "ada"}], pipeline.map(enrich)).run()
"""

from typing import Any as _Any

from ._envelope import Envelope as Envelope
from ._envelope import Failed as Failed
from ._errors import ConfigError as ConfigError
from ._errors import FatalError as FatalError
from ._errors import ItemError as ItemError
from ._errors import LedgerError as LedgerError
from ._errors import MissingFieldError as MissingFieldError
from ._errors import PipelineError as PipelineError
from ._errors import QuotaExhaustedError as QuotaExhaustedError
from ._functions import filter as filter
from ._functions import flat_map as flat_map
from ._functions import map as map
from ._logging import StageFilter as StageFilter
from ._logging import configure_logging as configure_logging
from ._report import RunReport as RunReport
from ._runner import IterSource as IterSource
from ._runner import Pipeline as Pipeline
from ._runner import Results as Results
from ._stage import Inbox as Inbox
from ._stage import ItemStage as ItemStage
from ._stage import Outbox as Outbox
from ._stage import Source as Source
from ._stage import Stage as Stage
from ._stage import StageStats as StageStats

_LAZY = {
    "JobFailedError": "pipeline._job",
    "JobProgress": "pipeline._job",
    "JobSettings": "pipeline._job",
    "JobSummary": "pipeline._job",
    "run_job": "pipeline._job",
}


def __getattr__(name: str) -> _Any:
    """Load the file-job API (and the HTTP stack it needs) on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ConfigError",
    "Envelope",
    "Failed",
    "FatalError",
    "Inbox",
    "ItemError",
    "ItemStage",
    "IterSource",
    "JobFailedError",
    "JobProgress",
    "JobSettings",
    "JobSummary",
    "LedgerError",
    "MissingFieldError",
    "Outbox",
    "Pipeline",
    "PipelineError",
    "QuotaExhaustedError",
    "Results",
    "RunReport",
    "Source",
    "Stage",
    "StageFilter",
    "StageStats",
    "configure_logging",
    "filter",
    "flat_map",
    "map",
    "run_job",
]
