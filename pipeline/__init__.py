"""Asynchronous stream-processing pipelines for calling LLM APIs at scale.

Declare a pipeline from stages connected by bounded channels, then run it (the stage library
is the ``stages`` package; file jobs are :mod:`pipeline.jobs`, the HTTP service
:mod:`pipeline.server`, the command line :mod:`pipeline.cli`, and the simulated server for
tests :mod:`pipeline.testing`)::

    import pipeline

    async def enrich(row: dict) -> dict:
        return {**row, "shout": row["name"].upper()}

    report = await pipeline.Pipeline([{"name": "ada"}], pipeline.map(enrich)).run()
"""

from ._channels import Inbox as Inbox
from ._channels import Outbox as Outbox
from ._channels import StageStats as StageStats
from ._envelope import Envelope as Envelope
from ._envelope import Failed as Failed
from ._errors import ConfigError as ConfigError
from ._errors import FatalError as FatalError
from ._errors import ItemError as ItemError
from ._errors import LedgerError as LedgerError
from ._errors import MissingFieldError as MissingFieldError
from ._errors import NotStartedError as NotStartedError
from ._errors import PipelineError as PipelineError
from ._errors import QuotaExhaustedError as QuotaExhaustedError
from ._functions import filter as filter
from ._functions import flat_map as flat_map
from ._functions import map as map
from ._logging import StageFilter as StageFilter
from ._logging import configure_logging as configure_logging
from ._report import RunReport as RunReport
from ._runner import Results as Results
from ._stage import ItemStage as ItemStage
from ._stage import IterSource as IterSource
from ._stage import Pipeline as Pipeline
from ._stage import Source as Source
from ._stage import Stage as Stage

__all__ = [
    "ConfigError",
    "Envelope",
    "Failed",
    "FatalError",
    "Inbox",
    "ItemError",
    "ItemStage",
    "IterSource",
    "LedgerError",
    "MissingFieldError",
    "NotStartedError",
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
]
