"""The stage library: sources, the LLM caller, SSE parsing, batching, sinks, limits.

Each capability's whole story is in one place (``stages.llm``, ``stages.files``, one module each
for batching, LangChain and Ray); this package lists the public names.
Names from optional extras (LangChain, Ray) load on first use, so ``import stages`` needs none.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from pipeline._lazy import load as _load

if _TYPE_CHECKING:
    from ._batch import Batcher as Batcher
    from ._batch import Unbatch as Unbatch
    from ._batch import split_batch as split_batch
    from ._langchain import ItemFailedError as ItemFailedError
    from ._langchain import PipelineRunnable as PipelineRunnable
    from ._langchain import RunnableStage as RunnableStage
    from ._ray import RayTransform as RayTransform
    from ._ray import ray_transform as ray_transform
    from .files._csv import CsvSink as CsvSink
    from .files._csv import CsvSource as CsvSource
    from .files._dead_letters import DeadLetterSink as DeadLetterSink
    from .files._formats import count_rows as count_rows
    from .files._formats import open_sink as open_sink
    from .files._formats import open_source as open_source
    from .files._jsonl import JsonlSink as JsonlSink
    from .files._jsonl import JsonlSource as JsonlSource
    from .files._parquet import ParquetSink as ParquetSink
    from .files._parquet import ParquetSource as ParquetSource
    from .files._rows import BadRowError as BadRowError
    from .files._sinks import FileSink as FileSink
    from .files._sources import FileSource as FileSource
    from .llm._admission import Limits as Limits
    from .llm._cache import ResponseCache as ResponseCache
    from .llm._cache import request_key as request_key
    from .llm._caller import AuthenticationError as AuthenticationError
    from .llm._caller import CallerTotals as CallerTotals
    from .llm._caller import Completion as Completion
    from .llm._caller import DeadlineExceededError as DeadlineExceededError
    from .llm._caller import InvalidOutputError as InvalidOutputError
    from .llm._caller import LLMCaller as LLMCaller
    from .llm._caller import LLMCallError as LLMCallError
    from .llm._caller import Price as Price
    from .llm._output import Output as Output
    from .llm._providers import AnthropicProvider as AnthropicProvider
    from .llm._providers import AzureProvider as AzureProvider
    from .llm._providers import Provider as Provider
    from .llm._redis_limiter import RedisRateLimiter as RedisRateLimiter
    from .llm._redis_limiter import RedisUnavailableError as RedisUnavailableError
    from .llm._redis_limiter import key_fingerprint as key_fingerprint
    from .llm._retry import Retry as Retry
    from .llm._router import NoEndpointLeftError as NoEndpointLeftError
    from .llm._routing import Deployment as Deployment
    from .llm._routing import Routing as Routing
    from .llm._sse import AnthropicStreamAssembler as AnthropicStreamAssembler
    from .llm._sse import ChatStreamAssembler as ChatStreamAssembler
    from .llm._sse import MalformedChunkError as MalformedChunkError
    from .llm._sse import ServerSentEvent as ServerSentEvent
    from .llm._sse import SSEDecoder as SSEDecoder
    from .llm._sse import SSEParse as SSEParse
    from .llm._sse import StreamError as StreamError
    from .llm._sse import StreamErrorEvent as StreamErrorEvent
    from .llm._sse import TruncatedStreamError as TruncatedStreamError
    from .llm._template import PromptTemplate as PromptTemplate
    from .llm._transport import HTTP as HTTP

_LAZY = {
    "Batcher": "stages._batch",
    "split_batch": "stages._batch",
    "Unbatch": "stages._batch",
    "ItemFailedError": "stages._langchain",
    "PipelineRunnable": "stages._langchain",
    "RunnableStage": "stages._langchain",
    "ray_transform": "stages._ray",
    "RayTransform": "stages._ray",
    "CsvSink": "stages.files._csv",
    "CsvSource": "stages.files._csv",
    "DeadLetterSink": "stages.files._dead_letters",
    "count_rows": "stages.files._formats",
    "open_sink": "stages.files._formats",
    "open_source": "stages.files._formats",
    "JsonlSink": "stages.files._jsonl",
    "JsonlSource": "stages.files._jsonl",
    "ParquetSink": "stages.files._parquet",
    "ParquetSource": "stages.files._parquet",
    "BadRowError": "stages.files._rows",
    "FileSink": "stages.files._sinks",
    "FileSource": "stages.files._sources",
    "Limits": "stages.llm._admission",
    "request_key": "stages.llm._cache",
    "ResponseCache": "stages.llm._cache",
    "AuthenticationError": "stages.llm._caller",
    "CallerTotals": "stages.llm._caller",
    "Completion": "stages.llm._caller",
    "DeadlineExceededError": "stages.llm._caller",
    "InvalidOutputError": "stages.llm._caller",
    "LLMCaller": "stages.llm._caller",
    "LLMCallError": "stages.llm._caller",
    "Price": "stages.llm._caller",
    "Output": "stages.llm._output",
    "AnthropicProvider": "stages.llm._providers",
    "AzureProvider": "stages.llm._providers",
    "Provider": "stages.llm._providers",
    "key_fingerprint": "stages.llm._redis_limiter",
    "RedisRateLimiter": "stages.llm._redis_limiter",
    "RedisUnavailableError": "stages.llm._redis_limiter",
    "Retry": "stages.llm._retry",
    "NoEndpointLeftError": "stages.llm._router",
    "Deployment": "stages.llm._routing",
    "Routing": "stages.llm._routing",
    "AnthropicStreamAssembler": "stages.llm._sse",
    "ChatStreamAssembler": "stages.llm._sse",
    "MalformedChunkError": "stages.llm._sse",
    "ServerSentEvent": "stages.llm._sse",
    "SSEDecoder": "stages.llm._sse",
    "SSEParse": "stages.llm._sse",
    "StreamError": "stages.llm._sse",
    "StreamErrorEvent": "stages.llm._sse",
    "TruncatedStreamError": "stages.llm._sse",
    "PromptTemplate": "stages.llm._template",
    "HTTP": "stages.llm._transport",
}
"""Where each public name is defined; the module is imported when the name is first used."""


def __getattr__(name: str) -> _Any:
    """Import the module that defines ``name`` on first use, then keep the name here."""
    return _load(name, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
