"""The LLM caller and its parts: providers, SSE parsing, rate limits, the response cache."""

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
