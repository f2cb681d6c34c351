"""The HTTP job service (``python -m pipeline serve``): FastAPI routes over the job engine."""

try:
    import fastapi  # noqa: F401
except ImportError as exc:  # pragma: no cover - the [server] extra
    raise ImportError("the server needs FastAPI: pip install 'llm-pipeline[server]'") from exc

from pipeline.server._app import create_app as create_app
from pipeline.server._cli import main as main
from pipeline.server._config import ServerConfig as ServerConfig

__all__ = ["ServerConfig", "create_app", "main"]
