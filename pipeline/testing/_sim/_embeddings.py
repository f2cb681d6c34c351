"""The embeddings endpoint family: ``POST /v1/embeddings`` (and the Paradigm and Azure paths).

``input`` is a string, a list of strings or token arrays; ``encoding_format`` ``float`` or
``base64``; ``dimensions``. Each vector is :func:`embedding_for` of its input.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from pipeline.testing._sim._answers import BadRequest, embedding_for, tokens
from pipeline.testing._sim._config import FAULTS, SimConfig
from pipeline.testing._sim._core import SimCore
from pipeline.testing._sim._faults import json_answer
from pipeline.testing._sim._openai import Admitted, gate, route_with_azure
from pipeline.testing._sim._responses import dumps

__all__ = ["register"]

_FAULTS = frozenset(FAULTS) - {"overloaded", "stream_error"}


def register(core: SimCore, router: web.UrlDispatcher) -> None:
    """Add the embeddings routes (OpenAI, Paradigm and Azure paths)."""
    route_with_azure(core, router, "embeddings", _embeddings)


def _texts(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'input' must be a non-empty string or array")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [" ".join(map(str, raw))]  # one token array
    if all(isinstance(x, str) for x in raw):
        return raw
    if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
        return [" ".join(map(str, x)) for x in raw]
    raise BadRequest("'input' must be a string, strings, or token arrays")


def _inputs(req: Any, config: SimConfig) -> tuple[list[str], int, str]:
    """Return the texts, the dimension and the encoding an embeddings request asks for."""
    if not isinstance(req, dict):
        raise BadRequest("the request body must be a JSON object")
    texts = _texts(req.get("input"))
    if len(texts) > config.max_batch:
        raise BadRequest(f"'input' has {len(texts)} items; at most {config.max_batch} per request")
    dim = req.get("dimensions", config.embedding_dim)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
        raise BadRequest(f"'dimensions' must be a positive integer, got {dim!r}")
    encoding = req.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
    return texts, dim, encoding


def _body(texts: list[str], dim: int, encoding: str, model: Any, cost: int) -> bytes:
    data: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        vector = embedding_for(text, dim)
        value: Any = (
            base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            if encoding == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return dumps(
        {
            "object": "list",
            "data": data,
            "model": model if isinstance(model, str) else "sim-embed-1",
            "usage": {"prompt_tokens": cost, "total_tokens": cost},
        }
    )


async def _embeddings(
    core: SimCore, request: web.Request, n: int, deployment: str | None
) -> web.StreamResponse:
    def parse(req: Any) -> tuple[tuple[list[str], int, str, int], int]:
        texts, dim, encoding = _inputs(req, core.config)
        cost = sum(tokens(t) for t in texts)
        return (texts, dim, encoding, cost), cost

    admitted = await gate(core, request, n, parse, lambda req: _FAULTS)
    if not isinstance(admitted, Admitted):
        return admitted
    texts, dim, encoding, cost = admitted.parsed
    core.count_answer(cost)
    body = _body(texts, dim, encoding, deployment or admitted.req.get("model"), cost)
    return await json_answer(core, request, body, admitted.fault, admitted.headers)
