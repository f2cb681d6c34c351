"""The stage library: sources, the LLM caller, SSE parsing, batching, sinks, limits.

Each capability's whole story is in one place (``stages.llm``, ``stages.files``, one module each
for batching, LangChain and Ray); this package lists the public names.
Names from optional extras (LangChain, Ray) load on first use, so ``import stages`` needs none.
"""

from typing import Any as _Any

from ._batch import Batcher as Batcher
from ._batch import Unbatch as Unbatch
from ._batch import split_batch as split_batch
from .files import BadRowError as BadRowError
from .files import CsvSink as CsvSink
from .files import CsvSource as CsvSource
from .files import DeadLetterSink as DeadLetterSink
from .files import FileSink as FileSink
from .files import FileSource as FileSource
from .files import JsonlSink as JsonlSink
from .files import JsonlSource as JsonlSource
from .files import ParquetSink as ParquetSink
from .files import ParquetSource as ParquetSource
from .files import count_rows as count_rows
from .files import open_sink as open_sink
from .files import open_source as open_source
from .llm import HTTP as HTTP
from .llm import AnthropicProvider as AnthropicProvider
from .llm import AnthropicStreamAssembler as AnthropicStreamAssembler
from .llm import AuthenticationError as AuthenticationError
from .llm import AzureProvider as AzureProvider
from .llm import CallerTotals as CallerTotals
from .llm import ChatStreamAssembler as ChatStreamAssembler
from .llm import Completion as Completion
from .llm import DeadlineExceededError as DeadlineExceededError
from .llm import Deployment as Deployment
from .llm import InvalidOutputError as InvalidOutputError
from .llm import Limits as Limits
from .llm import LLMCaller as LLMCaller
from .llm import LLMCallError as LLMCallError
from .llm import MalformedChunkError as MalformedChunkError
from .llm import NoEndpointLeftError as NoEndpointLeftError
from .llm import Output as Output
from .llm import Price as Price
from .llm import PromptTemplate as PromptTemplate
from .llm import Provider as Provider
from .llm import RedisRateLimiter as RedisRateLimiter
from .llm import RedisUnavailableError as RedisUnavailableError
from .llm import ResponseCache as ResponseCache
from .llm import Retry as Retry
from .llm import Routing as Routing
from .llm import ServerSentEvent as ServerSentEvent
from .llm import SSEDecoder as SSEDecoder
from .llm import SSEParse as SSEParse
from .llm import StreamError as StreamError
from .llm import StreamErrorEvent as StreamErrorEvent
from .llm import TruncatedStreamError as TruncatedStreamError
from .llm import key_fingerprint as key_fingerprint
from .llm import request_key as request_key

_LAZY = {
    "ItemFailedError": "stages._langchain",
    "PipelineRunnable": "stages._langchain",
    "RunnableStage": "stages._langchain",
    "RayTransform": "stages._ray",
    "ray_transform": "stages._ray",
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
    "AnthropicProvider",
    "AnthropicStreamAssembler",
    "AuthenticationError",
    "AzureProvider",
    "BadRowError",
    "Batcher",
    "CallerTotals",
    "ChatStreamAssembler",
    "Completion",
    "CsvSink",
    "CsvSource",
    "DeadLetterSink",
    "DeadlineExceededError",
    "Deployment",
    "FileSink",
    "FileSource",
    "HTTP",
    "InvalidOutputError",
    "ItemFailedError",
    "JsonlSink",
    "JsonlSource",
    "LLMCallError",
    "LLMCaller",
    "Limits",
    "MalformedChunkError",
    "NoEndpointLeftError",
    "Output",
    "ParquetSink",
    "ParquetSource",
    "PipelineRunnable",
    "Price",
    "PromptTemplate",
    "Provider",
    "RayTransform",
    "RedisRateLimiter",
    "RedisUnavailableError",
    "ResponseCache",
    "Retry",
    "Routing",
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
    "ray_transform",
    "request_key",
    "split_batch",
]
