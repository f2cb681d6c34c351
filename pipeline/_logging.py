"""Standard ``logging`` with the stage name on every record.

Every worker sets :data:`current_stage` when it starts, and tasks inherit it, so
:class:`StageFilter` can stamp ``record.stage`` on records from any library code a stage calls
(aiohttp, tenacity, user functions), not only on the runtime's own records.
"""

from __future__ import annotations

import contextvars
import logging

current_stage: contextvars.ContextVar[str] = contextvars.ContextVar("pipeline_stage", default="-")


class StageFilter(logging.Filter):
    """A handler filter that sets ``record.stage`` to the stage the record was logged from."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp the stage name (records logged through ``stage.log`` already carry it)."""
        if not hasattr(record, "stage"):
            record.stage = current_stage.get()
        return True


def configure_logging(level: int = logging.WARNING) -> logging.Handler:
    """Install a stderr handler showing the stage of each record; return it."""
    handler = logging.StreamHandler()
    handler.addFilter(StageFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(stage)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
