"""The ASGI middleware in front of every route: the bearer token and the body size limit."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pipeline.server._config import ServerConfig

__all__ = ["Guard", "TooLargeError"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TooLargeError(Exception):
    """A request body larger than the server's upload limit (answered with 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than the limit of {_mb(limit)}")


def _mb(limit: int) -> str:
    return f"{limit / (1 << 20):g} MB" if limit >= 1 << 20 else f"{limit} bytes"


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: Any = ()) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class Guard:
    """ASGI middleware: the bearer token on every route, and the request body size limit.

    Args:
        app: The application behind it.
        config: Where the token and ``max_upload_bytes`` come from.
        public: Paths served without the token (the dashboard's page and assets: no data).
    """

    def __init__(
        self, app: ASGIApp, config: ServerConfig, public: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.token = config.token.encode() if config.token else None
        self.limit = config.max_upload_bytes
        self.public = public

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        given = headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a request without the token (401) or with a too large body (413)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if scope.get("path") not in self.public and not self._authorized(headers):
            detail = {"detail": "missing or wrong bearer token"}
            await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, {"detail": str(TooLargeError(self.limit))})
            return
        seen = 0
        limit = self.limit

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLargeError(limit)
            return message

        await self.app(scope, limited, send)
