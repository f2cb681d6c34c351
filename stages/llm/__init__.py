"""The LLM caller and its parts: providers, SSE parsing, rate limits, the response cache."""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from pipeline._lazy import load as _load

if _TYPE_CHECKING:
    from ._admission import Limits as Limits
    from ._cache import ResponseCache as ResponseCache
    from ._cache import request_key as request_key
    from ._caller import AuthenticationError as AuthenticationError
    from ._caller import CallerTotals as CallerTotals
    from ._caller import Completion as Completion
    from ._caller import DeadlineExceededError as DeadlineExceededError
    from ._caller import InvalidOutputError as InvalidOutputError
    from ._caller import LLMCaller as LLMCaller
    from ._caller import LLMCallError as LLMCallError
    from ._caller import Price as Price
    from ._output import Output as Output
    from ._providers import AnthropicProvider as AnthropicProvider
    from ._providers import AzureProvider as AzureProvider
    from ._providers import Provider as Provider
    from ._redis_limiter import RedisRateLimiter as RedisRateLimiter
    from ._redis_limiter import RedisUnavailableError as RedisUnavailableError
    from ._redis_limiter import key_fingerprint as key_fingerprint
    from ._retry import Retry as Retry
    from ._router import NoEndpointLeftError as NoEndpointLeftError
    from ._routing import Deployment as Deployment
    from ._routing import Routing as Routing
    from ._sse import AnthropicStreamAssembler as AnthropicStreamAssembler
    from ._sse import ChatStreamAssembler as ChatStreamAssembler
    from ._sse import MalformedChunkError as MalformedChunkError
    from ._sse import ServerSentEvent as ServerSentEvent
    from ._sse import SSEDecoder as SSEDecoder
    from ._sse import SSEParse as SSEParse
    from ._sse import StreamError as StreamError
    from ._sse import StreamErrorEvent as StreamErrorEvent
    from ._sse import TruncatedStreamError as TruncatedStreamError
    from ._template import PromptTemplate as PromptTemplate
    from ._transport import HTTP as HTTP

_LAZY = {
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
    "CallerTotals",
    "ChatStreamAssembler",
    "Completion",
    "DeadlineExceededError",
    "Deployment",
    "HTTP",
    "InvalidOutputError",
    "LLMCallError",
    "LLMCaller",
    "Limits",
    "MalformedChunkError",
    "NoEndpointLeftError",
    "Output",
    "Price",
    "PromptTemplate",
    "Provider",
    "RedisRateLimiter",
    "RedisUnavailableError",
    "ResponseCache",
    "Retry",
    "Routing",
    "SSEDecoder",
    "SSEParse",
    "ServerSentEvent",
    "StreamError",
    "StreamErrorEvent",
    "TruncatedStreamError",
    "key_fingerprint",
    "request_key",
]
