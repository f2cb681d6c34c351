"""The command line: ``python -m pipeline run|demo|sim|serve``."""

from pipeline.cli._main import main as main

__all__ = ["main"]
