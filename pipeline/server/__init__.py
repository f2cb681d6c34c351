"""The HTTP job service (``python -m pipeline serve``): FastAPI routes over the job engine."""

from pipeline.server._app import ServerConfig as ServerConfig
from pipeline.server._app import create_app as create_app
from pipeline.server._app import main as main

__all__ = ["ServerConfig", "create_app", "main"]
