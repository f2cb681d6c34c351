"""The simulator's canned bodies and error responses, shaped like the providers' own."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from pipeline._errors import ConfigError

__all__ = [
    "ANTHROPIC_ERRORS",
    "ANTHROPIC_STREAM_ERROR",
    "DONE",
    "HTML",
    "JSON",
    "QUOTA",
    "RATE_LIMITED",
    "SERVER_ERRORS",
    "SSE_HEADERS",
    "STREAM_ERROR",
    "UNAUTHORIZED",
    "Aborted",
    "anthropic_error",
    "dumps",
    "openai_error",
    "read_config",
]

C = TypeVar("C")


class Aborted(web.Response):
    """Returned after the connection was aborted on purpose; aiohttp's write fails quietly."""


JSON = "application/json"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
SERVER_ERRORS = {
    500: b'{"error":{"message":"The server had an error while processing your request. Sorry '
    b'about that!","type":"server_error","param":null,"code":null}}',
    502: b'{"error":{"message":"Bad gateway.","type":"server_error","param":null,"code":null}}',
    503: b'{"error":{"message":"The engine is currently overloaded, please try again later.",'
    b'"type":"server_error","param":null,"code":null}}',
}
RATE_LIMITED = (
    b'{"error":{"message":"Rate limit reached for requests. Please try again later.",'
    b'"type":"requests","param":null,"code":"rate_limit_exceeded"}}'
)
QUOTA = (
    b'{"error":{"message":"You exceeded your current quota, please check your plan and billing '
    b'details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}'
)
UNAUTHORIZED = (
    b'{"error":{"message":"Incorrect API key provided. You can find your API key at '
    b'https://platform.openai.com/account/api-keys.","type":"invalid_request_error",'
    b'"param":null,"code":"invalid_api_key"}}'
)
ANTHROPIC_ERRORS = {
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "error_5xx": (500, "api_error", "Internal server error"),
    "error_429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "throttled": (429, "rate_limit_error", "Number of requests has exceeded your rate limit."),
    "quota_429": (
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits.",
    ),
    "unauthorized": (401, "authentication_error", "invalid x-api-key"),
}
STREAM_ERROR = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","code":"server_error"}}\n\n'
)
ANTHROPIC_STREAM_ERROR = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
    b'"message":"Overloaded"}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    """Encode a response body: compact JSON, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def openai_error(
    status: int,
    message: str,
    headers: Any = None,
    *,
    code: str | None = None,
    param: str | None = None,
) -> web.Response:
    """Return an OpenAI-style error response (``invalid_request_error``; 5xx ``server_error``)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(status=status, body=dumps(body), content_type=JSON, headers=headers)


def anthropic_error(status: int, kind: str, message: str, headers: Any = None) -> web.Response:
    """Return an Anthropic-style error response of type ``kind`` with ``message``."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(status=status, body=dumps(body), content_type=JSON, headers=headers)


async def read_config(
    request: web.Request, build: Callable[[dict[str, Any]], C], what: str
) -> C | web.Response:
    """Build a configuration from a request's JSON object, or return the 400 saying why not.

    Args:
        request: A ``POST`` of configuration fields.
        build: Makes the configuration from the fields (``SimConfig.from_dict``).
        what: How the error names the configuration (``"simulator config"``).
    """
    try:
        data = json.loads(await request.read())
        if not isinstance(data, dict):
            raise ConfigError(f"the body must be a JSON object of {what} fields")
        return build(data)
    except (ValueError, TypeError) as error:
        return openai_error(400, f"invalid {what}: {error}")
