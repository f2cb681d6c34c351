"""The stage library: sources, the LLM caller, SSE parsing, batching, sinks, limits.

Each stage's whole story is in one private module; this package lists the public names.
Names from optional extras (LangChain) load on first use, so ``import stages`` needs none.
"""

from typing import Any as _Any

from ._batch import Batcher as Batcher
from ._batch import Unbatch as Unbatch
from ._batch import split_batch as split_batch
from ._cache import ResponseCache as ResponseCache
from ._cache import request_key as request_key
from ._files import BadRowError as BadRowError
from ._files import CsvSink as CsvSink
from ._files import CsvSource as CsvSource
from ._files import DeadLetterSink as DeadLetterSink
from ._files import FileSink as FileSink
from ._files import FileSource as FileSource
from ._files import JsonlSink as JsonlSink
from ._files import JsonlSource as JsonlSource
from ._files import ParquetSink as ParquetSink
from ._files import ParquetSource as ParquetSource
from ._files import count_rows as count_rows
from ._files import open_sink as open_sink
from ._files import open_source as open_source
from ._llm import AuthenticationError as AuthenticationError
from ._llm import CallerTotals as CallerTotals
from ._llm import Completion as Completion
from ._llm import DeadlineExceededError as DeadlineExceededError
from ._llm import InvalidOutputError as InvalidOutputError
from ._llm import LLMCaller as LLMCaller
from ._llm import LLMCallError as LLMCallError
from ._llm import Price as Price
from ._redis_limiter import RedisRateLimiter as RedisRateLimiter
from ._redis_limiter import RedisUnavailableError as RedisUnavailableError
from ._redis_limiter import key_fingerprint as key_fingerprint
from ._sse import AnthropicStreamAssembler as AnthropicStreamAssembler
from ._sse import ChatStreamAssembler as ChatStreamAssembler
from ._sse import MalformedChunkError as MalformedChunkError
from ._sse import ServerSentEvent as ServerSentEvent
from ._sse import SSEDecoder as SSEDecoder
from ._sse import SSEParse as SSEParse
from ._sse import StreamError as StreamError
from ._sse import StreamErrorEvent as StreamErrorEvent
from ._sse import TruncatedStreamError as TruncatedStreamError

_LAZY = {
    "ItemFailedError": "stages._langchain",
    "PipelineRunnable": "stages._langchain",
    "RunnableStage": "stages._langchain",
}


def __getattr__(name: str) -> _Any:
    """Import a name of an optional extra on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stages' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AnthropicStreamAssembler",
    "AuthenticationError",
    "BadRowError",
    "Batcher",
    "CallerTotals",
    "ChatStreamAssembler",
    "Completion",
    "CsvSink",
    "CsvSource",
    "DeadLetterSink",
    "DeadlineExceededError",
    "FileSink",
    "FileSource",
    "InvalidOutputError",
    "ItemFailedError",
    "JsonlSink",
    "JsonlSource",
    "LLMCallError",
    "LLMCaller",
    "MalformedChunkError",
    "ParquetSink",
    "ParquetSource",
    "PipelineRunnable",
    "Price",
    "RedisRateLimiter",
    "RedisUnavailableError",
    "ResponseCache",
    "RunnableStage",
    "SSEDecoder",
    "SSEParse",
    "ServerSentEvent",
    "StreamError",
    "StreamErrorEvent",
    "TruncatedStreamError",
    "Unbatch",
    "count_rows",
    "key_fingerprint",
    "open_sink",
    "open_source",
    "request_key",
    "split_batch",
]
