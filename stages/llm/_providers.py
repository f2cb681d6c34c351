"""What each LLM provider expects and answers: URLs, headers, bodies, answers and errors.

The caller (:mod:`stages.llm._caller`) speaks to three families of HTTP APIs:

- ``"openai"``: the OpenAI-compatible ``/chat/completions`` and ``/embeddings`` endpoints, also
  served by LightOn Paradigm, vLLM, Ollama, LiteLLM and most gateways (``Authorization: Bearer``);
- ``"azure"``: Azure OpenAI, the same bodies at
  ``{endpoint}/openai/deployments/{deployment}/{chat/completions|embeddings}?api-version=...``
  with an ``api-key`` header;
- ``"anthropic"``: Anthropic Messages (``/messages``, ``x-api-key`` and ``anthropic-version``
  headers, a top-level ``system``, typed streaming events, ``529 overloaded_error``).

Everything here is pure: no I/O, no clock. A provider builds requests and reads answers and
error bodies; deciding what to do about an error (retry, pause, stop) is the caller's job, from
the :class:`HTTPFailure` this module returns.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from pipeline._errors import ConfigError
from stages.llm._sse import AnthropicStreamAssembler, ChatStreamAssembler, Usage

ProviderName = Literal["openai", "azure", "anthropic"]
Endpoint = Literal["chat", "embeddings"]

ANTHROPIC_VERSION = "2023-06-01"
AZURE_API_VERSION = "2024-10-21"
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024

QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "enforced_spend_limit_reached",
    }
)
"""Error codes of a 429 that mean money, not speed: retrying cannot help."""

RETRY_STATUSES = frozenset({408, 409, 429})
"""Statuses below 500 worth retrying (every 5xx, including Anthropic's 529, is too)."""

SENSITIVE_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})
"""Lower-case names of the headers that carry credentials: never logged, shown or stored.

The one list of them: the caller redacts their values, job settings and the service mask them.
"""


@dataclasses.dataclass(slots=True)  # not frozen: one per request, built 5x faster
class Answer:
    """A provider's answer reduced to what the caller needs.

    Attributes:
        text: The generated text (chat), or ``None`` for embeddings.
        finish_reason: Why generation stopped (``"stop"``, ``"length"``, ``"end_turn"``...).
        usage: Tokens used, or ``None`` when the server did not say (never guessed as zero).
        model: The model the server says answered.
        embeddings: One vector per input, in input order (embeddings only).
    """

    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    embeddings: list[list[float]] | None = None

    def to_bytes(self) -> bytes:
        """Serialise the answer for the response cache."""
        data = dataclasses.asdict(self)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Answer:
        """Read an answer written by :meth:`to_bytes`.

        Raises:
            ValueError: The bytes are not a serialised answer.
        """
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("cached answer is not a JSON object")
        usage = data.get("usage")
        return cls(
            text=data.get("text"),
            finish_reason=data.get("finish_reason"),
            usage=Usage(**usage) if isinstance(usage, dict) else None,
            model=data.get("model"),
            embeddings=data.get("embeddings"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class HTTPFailure:
    """What an error response means for the caller.

    Attributes:
        status: The HTTP status.
        code: The provider's error code or type (``"insufficient_quota"``, ``"overloaded_error"``).
        message: The provider's own message, or a short description of the body.
        retryable: Whether sending the same request again may succeed.
        quota: Whether the account is out of money or quota (stop the job).
        overload: Whether the server asks us to slow down (429, 503, 529).
    """

    status: int
    code: str | None
    message: str
    retryable: bool
    quota: bool = False
    overload: bool = False

    def describe(self) -> str:
        """Return ``"HTTP 429 rate_limit_exceeded: <message>"`` for errors and logs."""
        code = f" {self.code}" if self.code else ""
        return f"HTTP {self.status}{code}: {self.message}"


class ResponseFormatError(ValueError):
    """A 200 response whose body is not what the endpoint promises.

    Args:
        message: What is wrong with it.
        retryable: Whether another attempt may get a good answer (a cut or garbled body); a
            well-formed answer with nothing usable in it (``content`` a number, or null with
            no tool call and no refusal) is not retried: the model was paid for it.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _truncate(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _usage_openai(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt_tokens")
    completion = data.get("completion_tokens", 0)
    if not isinstance(prompt, int):
        return None
    return Usage(prompt, completion if isinstance(completion, int) else 0)


def usage_anthropic(data: Any) -> Usage | None:
    """Read an Anthropic ``usage`` object (input counts cache reads and writes)."""
    if not isinstance(data, dict):
        return None
    prompt = 0
    seen = False
    for field in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        value = data.get(field)
        if isinstance(value, int):
            prompt += value
            seen = True
    output = data.get("output_tokens")
    if not seen and not isinstance(output, int):
        return None
    return Usage(prompt, output if isinstance(output, int) else 0)


class Provider:
    """The OpenAI-compatible API: the shape most servers speak.

    Args:
        base_url: Everything before ``/chat/completions``, e.g. ``https://api.openai.com/v1``
            or ``https://paradigm.lighton.ai/api/v2``.
    """

    name: ProviderName = "openai"
    key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    default_base_url = "https://api.openai.com/v1"
    supports_embeddings = True

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- requests ------------------------------------------------------------------------------

    def url(self, endpoint: Endpoint, model: str) -> str:
        """Return the URL to POST to."""
        return f"{self.base_url}/{'chat/completions' if endpoint == 'chat' else 'embeddings'}"

    def auth_headers(self, key: str | None) -> dict[str, str]:
        """Return the headers that carry the API key (none when there is no key)."""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def needs_key(self) -> bool:
        """Whether the server certainly wants a key: the provider's own public host.

        A server at another URL (vLLM, Ollama, a gateway, the simulator) may take none.
        """
        default = urlsplit(self.default_base_url).hostname
        return default is not None and urlsplit(self.base_url).hostname == default

    def not_found_hint(self) -> str:
        """Return what a 404 suggests about the base URL (empty when nothing stands out)."""
        if re.search(r"/v\d+[a-z]*$", urlsplit(self.base_url).path):
            return "check the model name, and that the base URL is the API root"
        return (
            f"the base URL {self.base_url!r} does not end in a version such as /v1:"
            " OpenAI-compatible servers usually serve /v1/chat/completions, so try"
            f" {self.base_url + '/v1'!r}"
        )

    def base_headers(self) -> dict[str, str]:
        """Return the headers every request carries, besides authentication."""
        return {"Content-Type": "application/json", "Accept": "application/json"}

    def chat_body(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        system: str | None,
        params: Mapping[str, Any],
        stream: bool,
    ) -> dict[str, Any]:
        """Return the JSON body of a chat request."""
        full = [{"role": "system", "content": system}, *messages] if system else list(messages)
        body: dict[str, Any] = {"model": model, "messages": full, **params}
        if stream:
            body["stream"] = True
            options = dict(body.get("stream_options") or {})
            options.setdefault("include_usage", True)
            body["stream_options"] = options
        return body

    def structured_params(
        self, params: Mapping[str, Any], schema: Mapping[str, Any] | None, *, json_mode: bool
    ) -> dict[str, Any]:
        """Return ``params`` asking the server for JSON, or JSON valid against ``schema``.

        OpenAI-compatible servers get ``response_format``: ``json_schema`` with the schema,
        else ``json_object`` when ``json_mode`` (which OpenAI allows only when the messages say
        "JSON"). Params that already hold a ``response_format`` are left as they are.
        """
        if "response_format" in params:
            return dict(params)
        if schema is not None:
            spec = {"name": schema_name(schema), "schema": dict(schema)}
            return {**params, "response_format": {"type": "json_schema", "json_schema": spec}}
        if json_mode:
            return {**params, "response_format": {"type": "json_object"}}
        return dict(params)

    def embeddings_body(
        self, model: str, inputs: Sequence[str], params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the JSON body of an embeddings request for all ``inputs`` at once."""
        return {"model": model, "input": list(inputs), **params}

    def stream_assembler(self) -> ChatStreamAssembler | AnthropicStreamAssembler:
        """Return a fresh assembler for one streamed chat answer (``chat.completion.chunk``)."""
        return ChatStreamAssembler()

    # -- answers -------------------------------------------------------------------------------

    def parse_chat(self, data: Any) -> Answer:
        """Read a (non-streaming) chat answer.

        Raises:
            ResponseFormatError: The body is not a chat completion.
        """
        if not isinstance(data, dict):
            raise ResponseFormatError("chat completion body is not a JSON object")
        if data.get("error"):
            raise ResponseFormatError(f"error in a 200 response: {_error_text(data['error'])}")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ResponseFormatError("chat completion has no choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise ResponseFormatError("chat completion choice has no message")
        content = message.get("content")
        text = content if isinstance(content, str) else _join_parts(content)
        finish = choices[0].get("finish_reason")
        if text is None:
            _check_no_text(content, message, finish)
        return Answer(
            text=text,
            finish_reason=finish,
            usage=_usage_openai(data.get("usage")),
            model=data.get("model"),
        )

    def parse_embeddings(self, data: Any, count: int) -> Answer:
        """Read an embeddings answer, vectors in input order.

        Raises:
            ResponseFormatError: The body is not an embeddings list of ``count`` vectors.
        """
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ResponseFormatError("embeddings body has no 'data' list")
        items = data["data"]
        if len(items) != count:
            raise ResponseFormatError(f"asked for {count} embeddings, got {len(items)}")
        vectors: list[list[float] | None] = [None] * count
        for position, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("embedding"), list):
                raise ResponseFormatError("embeddings item has no 'embedding' list")
            index = item.get("index", position)
            if not isinstance(index, int) or not 0 <= index < count or vectors[index] is not None:
                raise ResponseFormatError(f"embeddings item has a bad index {index!r}")
            vectors[index] = item["embedding"]
        usage = data.get("usage")
        return Answer(
            usage=_usage_openai(usage) if isinstance(usage, dict) else None,
            model=data.get("model"),
            embeddings=[v for v in vectors if v is not None],
        )

    # -- errors --------------------------------------------------------------------------------

    def error_fields(self, data: Any) -> tuple[str | None, str | None]:
        """Return ``(code, message)`` from an error body (OpenAI: ``{"error": {...}}``)."""
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            message = error.get("message")
            return (str(code) if code else None, str(message) if message else None)
        if isinstance(error, str):
            return None, error
        if isinstance(data, dict) and isinstance(data.get("detail"), str):  # FastAPI-style
            return None, data["detail"]
        return None, None

    def is_quota(self, data: Any, code: str | None) -> bool:
        """Return whether an error body says the account is out of money or quota."""
        if code in QUOTA_CODES:
            return True
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            return any(error.get(field) in QUOTA_CODES for field in ("code", "type"))
        return False

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> HTTPFailure:
        """Decide what an error response means; honour ``x-should-retry`` like the SDKs."""
        try:
            data: Any = json.loads(body) if body else None
        except ValueError:
            data = None
        code, message = self.error_fields(data)
        if message is None:
            text = body.decode("utf-8", "replace").strip()
            message = _truncate(text) if text else "empty body"
        quota = status in (400, 402, 403, 429) and self.is_quota(data, code)
        retryable = not quota and (status in RETRY_STATUSES or status >= 500)
        should = headers.get("x-should-retry", "").strip().lower()
        if not quota and should == "true":
            retryable = True
        elif should == "false":
            retryable = False
        overload = status in (429, 503, 529) and not quota
        return HTTPFailure(status, code, _truncate(message, 500), retryable, quota, overload)


class AzureProvider(Provider):
    """Azure OpenAI: OpenAI bodies, deployment URLs, ``api-version`` and an ``api-key`` header.

    Args:
        base_url: The resource endpoint, ``https://<resource>.openai.azure.com``.
        deployment: The deployment name (defaults to the model name in :meth:`url`).
        api_version: The data-plane API version.
    """

    name: ProviderName = "azure"
    key_env = "AZURE_OPENAI_API_KEY"
    base_url_env = "AZURE_OPENAI_ENDPOINT"
    default_base_url = ""

    def __init__(
        self, base_url: str, *, deployment: str | None = None, api_version: str = AZURE_API_VERSION
    ) -> None:
        super().__init__(base_url)
        self.deployment = deployment
        self.api_version = api_version

    def __repr__(self) -> str:
        return (
            f"AzureProvider(base_url={self.base_url!r}, deployment={self.deployment!r}, "
            f"api_version={self.api_version!r})"
        )

    def url(self, endpoint: Endpoint, model: str) -> str:
        """Return ``{base}/openai/deployments/{deployment}/{path}?api-version=...``."""
        path = "chat/completions" if endpoint == "chat" else "embeddings"
        deployment = quote(self.deployment or model, safe="")
        version = quote(self.api_version, safe="")
        return f"{self.base_url}/openai/deployments/{deployment}/{path}?api-version={version}"

    def auth_headers(self, key: str | None) -> dict[str, str]:
        """Azure takes the key in an ``api-key`` header."""
        return {"api-key": key} if key else {}


class AnthropicProvider(Provider):
    """Anthropic Messages: ``/messages``, ``x-api-key``, top-level ``system``, typed events."""

    name: ProviderName = "anthropic"
    key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com/v1"
    supports_embeddings = False

    def url(self, endpoint: Endpoint, model: str) -> str:
        """Return the Messages URL, with or without ``/v1`` at the end of the base URL.

        ``{base}/messages`` for a base ending in a version (``/v1``), else
        ``{base}/v1/messages``: ``ANTHROPIC_BASE_URL=https://api.anthropic.com`` works as it
        does for the official SDK.
        """
        if re.search(r"/v\d+$", self.base_url):
            return f"{self.base_url}/messages"
        return f"{self.base_url}/v1/messages"

    def not_found_hint(self) -> str:
        """Return what a 404 suggests: the Messages API lives at ``/v1/messages``."""
        return (
            "check the model name, and that the base URL is the API root that serves"
            " /v1/messages (as ANTHROPIC_BASE_URL for the official SDK: https://api.anthropic.com)"
        )

    def structured_params(
        self, params: Mapping[str, Any], schema: Mapping[str, Any] | None, *, json_mode: bool
    ) -> dict[str, Any]:
        """Return ``params`` forcing a tool whose input schema is ``schema`` (an object schema).

        Anthropic's way to structured output: the answer is a ``tool_use`` block whose input
        is the JSON (:meth:`parse_chat` reads it as the answer's text). Without a schema, or
        with ``tools``/``tool_choice`` already in the params, nothing is added (Messages have
        no JSON mode).
        """
        if schema is None or "tools" in params or "tool_choice" in params:
            return dict(params)
        if schema.get("type", "object") != "object":
            return dict(params)
        name = schema_name(schema)
        tool = {
            "name": name,
            "description": "Answer by calling this tool with the requested JSON object.",
            "input_schema": dict(schema),
        }
        return {**params, "tools": [tool], "tool_choice": {"type": "tool", "name": name}}

    def auth_headers(self, key: str | None) -> dict[str, str]:
        """Anthropic takes the key in an ``x-api-key`` header."""
        return {"x-api-key": key} if key else {}

    def base_headers(self) -> dict[str, str]:
        """Every request names the API version it was written for."""
        return {**super().base_headers(), "anthropic-version": ANTHROPIC_VERSION}

    def stream_assembler(self) -> ChatStreamAssembler | AnthropicStreamAssembler:
        """Return a fresh assembler for one streamed answer (typed Messages events)."""
        return AnthropicStreamAssembler()

    def chat_body(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        system: str | None,
        params: Mapping[str, Any],
        stream: bool,
    ) -> dict[str, Any]:
        """Return a Messages body: ``max_tokens`` is required, ``system`` is top-level."""
        body: dict[str, Any] = {"model": model, "messages": list(messages), **params}
        body.setdefault("max_tokens", ANTHROPIC_DEFAULT_MAX_TOKENS)
        if system:
            body["system"] = system
        if stream:
            body["stream"] = True
        return body

    def parse_chat(self, data: Any) -> Answer:
        """Read a Messages answer: the text blocks joined, ``stop_reason`` and usage.

        Raises:
            ResponseFormatError: The body is not a message.
        """
        if not isinstance(data, dict):
            raise ResponseFormatError("message body is not a JSON object")
        if data.get("type") == "error":
            raise ResponseFormatError(f"error in a 200 response: {_error_text(data.get('error'))}")
        content = data.get("content")
        if not isinstance(content, list):
            raise ResponseFormatError("message has no content list")
        text = "".join(
            block.get("text", "")
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
        tools = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
        if not text and tools:  # structured output through a forced tool: its input is the JSON
            text = json.dumps(tools[0].get("input"), ensure_ascii=False)
        return Answer(
            text=text,
            finish_reason=data.get("stop_reason"),
            usage=usage_anthropic(data.get("usage")),
            model=data.get("model"),
        )

    def is_quota(self, data: Any, code: str | None) -> bool:
        """Out of money: ``enforced_spend_limit_reached``, or a 400 "credit balance is too low"."""
        if super().is_quota(data, code):
            return True
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str):
            return False
        lowered = message.lower()
        return "credit balance" in lowered or any(code in message for code in QUOTA_CODES)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = error.get("message") or ""
        return f"{code}: {message}" if code else str(message)
    return str(error)


def schema_name(schema: Mapping[str, Any]) -> str:
    """Return a name for a schema in a request: its title, made safe (``answer`` without)."""
    title = schema.get("title")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", title)[:64] if isinstance(title, str) else ""
    return name or "answer"


def _check_no_text(content: Any, message: dict[str, Any], finish: Any) -> None:
    """Refuse a chat message whose ``content`` is not text, unless it holds something else.

    A message may have no text when it calls a tool or refuses (``refusal``); anything else
    (a number, an object, or null with neither) is not an answer.

    Raises:
        ResponseFormatError: The message holds no answer (not retryable).
    """
    if content is None:
        if message.get("tool_calls") or message.get("function_call") or message.get("refusal"):
            return
        raise ResponseFormatError(
            f"the answer's content is null, with no tool call and no refusal "
            f"(finish_reason {finish!r})",
            retryable=False,
        )
    raise ResponseFormatError(
        f"the answer's content is not text: {type(content).__name__} "
        f"{_truncate(repr(content), 60)}",
        retryable=False,
    )


def _join_parts(content: Any) -> str | None:
    """Join a content given as a list of parts (``[{"type": "text", "text": ...}]``)."""
    if not isinstance(content, list):
        return None
    return "".join(
        part.get("text", "") for part in content if isinstance(part, dict) and "text" in part
    )


def make_provider(
    name: ProviderName,
    base_url: str | None,
    *,
    deployment: str | None = None,
    api_version: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Provider:
    """Return the provider called ``name``, its base URL from the argument or the environment.

    Raises:
        ValueError: An unknown provider, or Azure without an endpoint.
    """
    import os

    env = os.environ if environ is None else environ
    classes: dict[str, type[Provider]] = {
        "openai": Provider,
        "azure": AzureProvider,
        "anthropic": AnthropicProvider,
    }
    cls = classes.get(name)
    if cls is None:
        raise ValueError(f"unknown provider {name!r}: expected one of {', '.join(classes)}")
    url = base_url or env.get(cls.base_url_env) or cls.default_base_url
    if not url:
        raise ValueError(
            f"provider {name!r} needs base_url= (or ${cls.base_url_env}), "
            "e.g. https://<resource>.openai.azure.com"
        )
    if cls is AzureProvider:
        return AzureProvider(
            url, deployment=deployment, api_version=api_version or AZURE_API_VERSION
        )
    return cls(url)


def provider_for(provider: ProviderName | Provider, base_url: str | None) -> Provider:
    """Return the provider adapter named by ``provider`` (or ``provider`` itself).

    Raises:
        ConfigError: An unknown name, a missing base URL, or ``base_url`` beside an adapter.
    """
    if isinstance(provider, Provider):
        if base_url is not None:
            raise ConfigError("base_url= is for a provider given by name; set it on the Provider")
        return provider
    try:
        return make_provider(provider, base_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
