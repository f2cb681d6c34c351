"""The caller a job's settings describe: building it, checking its server, releasing it.

Every engine builds its :class:`~stages.llm._caller.LLMCaller` with :func:`build_caller` (the
local engine once, the Ray engine in every actor, the HTTP server for each job), so a job
behaves the same wherever it runs. :func:`preflight` checks the server accepts connections
before any row is sent; :func:`setup_failure` is the rule that stops a job whose first requests
fail as every row would; :func:`release_caller` closes what :func:`build_caller` opened.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio

from pipeline._envelope import Failed
from pipeline._errors import ConfigError, FatalError
from pipeline._stage import Stage
from pipeline.jobs._checks import prompt_template
from pipeline.jobs._settings import JobSettings, safe_url
from stages._batch import Batcher
from stages.llm._cache import ResponseCache
from stages.llm._caller import HTTP, Limits, LLMCaller, Output, Retry
from stages.llm._limits import Limiter
from stages.llm._routing import Routing


def create_limiter(settings: JobSettings, caller: LLMCaller | None = None) -> Limiter | None:
    """Return the rate limiter ``settings.limiter`` names (Redis), shared with other processes.

    The limiter's key is the provider, the API key's fingerprint and the model, so every job
    and process on one key shares one budget. ``None`` without ``settings.limiter``.

    Args:
        settings: The job's settings.
        caller: The caller the limiter is for, whose provider names the API key's variable
            when ``settings.api_key_env`` does not.
    """
    if not settings.limiter:
        return None
    from stages.llm._redis_limiter import RedisRateLimiter  # only a job with a limiter loads it

    key_env = settings.api_key_env or (caller.key_env() if caller is not None else None)
    return RedisRateLimiter.from_url(
        settings.limiter,
        rpm=settings.rpm,
        tpm=settings.tpm,
        itpm=settings.itpm,
        otpm=settings.otpm,
        burst_s=settings.burst,
        provider=settings.provider,
        api_key=os.environ.get(key_env) if key_env else None,
        model=settings.model,
    )


def build_caller(
    settings: JobSettings,
    *,
    cache: Any = None,
    limiter: Any = None,
    open_resources: bool = True,
    schema: Any = None,
    endpoint_limiters: Sequence[Limiter] | None = None,
) -> LLMCaller:
    """Return the :class:`~stages.llm._caller.LLMCaller` that ``settings`` describe.

    Every engine builds its caller here, so a job behaves the same wherever it runs.

    Args:
        settings: The job's settings.
        cache: A :class:`~stages.llm._cache.ResponseCache` to use instead of opening
            ``settings.cache``.
        limiter: A limiter to use instead of building one from ``settings.limiter``.
        open_resources: Open the cache and Redis limiter the settings name (when not given);
            release them with :func:`release_caller`.
        schema: A JSON schema dict or pydantic model every answer must satisfy (structured
            output; see ``Output(schema=...)``).
        endpoint_limiters: One limiter per ``[[endpoints]]`` table, in order, to use instead.

    Raises:
        ConfigError: The settings do not make a valid caller.
    """
    params = dict(settings.params)
    if (
        settings.json_output
        and settings.provider in ("openai", "azure")
        and "response_format" not in params
    ):
        params["response_format"] = {"type": "json_object"}
    price = settings.price()
    if cache is None and open_resources and settings.cache:
        cache = ResponseCache(settings.cache)
    caller = LLMCaller(
        model=settings.model,
        prompt=prompt_template(settings),
        system=settings.system,
        params=params,
        endpoint=settings.endpoint,
        provider=_routing(settings, open_resources and limiter is None, endpoint_limiters)
        or settings.provider,
        base_url=settings.base_url,
        limits=Limits(
            rpm=settings.rpm,
            tpm=settings.tpm,
            itpm=settings.itpm,
            otpm=settings.otpm,
            burst_s=settings.burst,
            limiter=limiter,
            concurrency=settings.concurrency,
            max_concurrency=settings.max_concurrency,
        ),
        retry=Retry(
            max_retries=settings.max_retries,
            deadline_s=settings.deadline,
            max_retry_after=settings.max_retry_after,
        ),
        output=Output(
            field=settings.output_field,
            json_output=settings.json_output,
            schema=schema,
            stream=settings.stream,
            prices={settings.model: price} if price is not None else None,
            budget_usd=settings.budget,
        ),
        http=HTTP(
            api_key_env=settings.api_key_env,
            headers=settings.headers,
            timeout=settings.timeout,
            max_response_bytes=round(settings.max_response_mb * 1_000_000),
            cache=cache,
        ),
    )
    if limiter is None and open_resources and settings.limiter:
        caller.limiter = create_limiter(settings, caller)
    return caller


def _routing(
    settings: JobSettings, open_resources: bool, given: Sequence[Limiter] | None = None
) -> Routing | None:
    """The routing of a job with ``[[endpoints]]``; each endpoint's own Redis limiter if shared.

    An endpoint's shared limiter is keyed by its provider, its key's fingerprint and its model,
    so every process of the job (and every job on that key) shares that endpoint's quota.
    """
    if not settings.endpoints:
        return None
    if given is not None:
        return settings.routing(list(given))
    if not (open_resources and settings.limiter):
        return settings.routing()
    from stages.llm._redis_limiter import RedisRateLimiter

    limiters = [
        RedisRateLimiter.from_url(
            settings.limiter,
            rpm=d.rpm,
            tpm=d.tpm,
            itpm=d.itpm,
            otpm=d.otpm,
            burst_s=settings.burst,
            provider=d.provider,
            api_key=os.environ.get(d.key_env()),
            model=d.model,
        )
        for d in settings.deployments()
    ]
    return settings.routing(limiters)


def answer_stages(settings: JobSettings, caller: LLMCaller) -> list[Stage[Any, Any]]:
    """Return the stages that answer a job's rows: the caller, after a batcher for embeddings."""
    stages: list[Stage[Any, Any]] = []
    if settings.endpoint == "embeddings":
        stages.append(Batcher(max_items=settings.batch_size, max_wait=0.02))
    stages.append(caller)
    return stages


async def release_caller(caller: LLMCaller) -> None:
    """Close the response cache and shared limiter of a caller made by :func:`build_caller`."""
    if caller.cache is not None:
        await caller.cache.aclose()
    limiters = [caller.limiter]
    if caller.routing is not None:
        limiters += [d.limiter for d in caller.routing.endpoints]
    for limiter in limiters:
        aclose = getattr(limiter, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


async def preflight(caller: LLMCaller, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Check that the caller's server accepts TCP connections.

    A wrong ``base_url`` would otherwise be retried and then dead-letter every row.

    It first checks the caller has the API key its server needs
    (:meth:`~stages.llm._caller.LLMCaller.check_key`).

    Raises:
        ConfigError: No API key where one is needed.
        FatalError: ``cannot reach http://host:port: connection refused`` (or the reason).
    """
    caller.check_key()
    if caller.routing is not None:
        await _preflight_routes(caller.routing, timeout)
        return
    provider = caller.provider
    if provider is None:
        return
    await _reach(provider.base_url, timeout)


async def _preflight_routes(routing: Routing, timeout: float) -> None:  # noqa: ASYNC109
    """Check that at least one endpoint is reachable (the others fail over at run time)."""
    reasons = []
    for deployment in routing.endpoints:
        try:
            await _reach(deployment.make_provider().base_url, timeout)
        except FatalError as error:
            reasons.append(f"{deployment.label()}: {error}")
        else:
            return
    raise FatalError("no endpoint can be reached (" + "; ".join(reasons) + ")")


async def _reach(base_url: str, timeout: float) -> None:  # noqa: ASYNC109
    """Connect to ``base_url``'s host and port once.

    Raises:
        FatalError: The host cannot be reached.
    """
    parts = urlsplit(base_url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        raise ConfigError(f"base URL {safe_url(base_url)!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"{parts.scheme}://{host}:{port}"
    reason: str | None = None
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(host, port)
        await stream.aclose()
    except TimeoutError:
        reason = f"no answer within {timeout:g}s"
    except OSError as error:
        reason = _os_reason(error)
    if reason is not None:
        raise FatalError(f"cannot reach {shown}: {reason}")


def _os_reason(error: BaseException) -> str:
    inner = error
    while isinstance(inner, OSError) and not inner.strerror and inner.__cause__ is not None:
        inner = inner.__cause__
    # anyio reports "all connection attempts failed" with the causes in a group
    for candidate in getattr(inner, "exceptions", ()) or ():
        if isinstance(candidate, OSError) and candidate.strerror:
            inner = candidate
            break
    if isinstance(inner, OSError) and not isinstance(inner, socket.gaierror) and inner.errno:
        text = os.strerror(inner.errno)  # asyncio words it "Connect call failed (...)"
    elif isinstance(inner, OSError) and inner.strerror:
        text = inner.strerror
    else:
        text = str(inner) or type(inner).__name__
    return text[0].lower() + text[1:]


def setup_failure(failed: Failed) -> FatalError | None:
    """Return the error that stops a job whose first requests fail as every row would.

    Before any row of a run succeeded, an HTTP 404/405 (a wrong URL path or model) or a
    connection failure (after the caller's retries) is the setup's fault, not the row's:
    dead-lettering it would dead-letter the whole file. ``None`` when ``failed`` is a row's own.
    Both engines apply it (the Ray engine per actor) until their caller answered a row.
    """
    if failed.status in (404, 405):
        return FatalError(
            f"the first requests fail with HTTP {failed.status} before any succeeded"
            f" ({failed.message}): check the base URL and the model name"
        )
    connection = ("connection error", "could not connect")
    if failed.status is None and any(word in failed.message for word in connection):
        if not any(word in failed.message for word in _NOT_CONNECTED):
            # connected, then the exchange broke: the server is there but its answers are not
            return FatalError(
                "the server accepted the connection but the first requests failed before any"
                " succeeded: the connection was closed or reset, or the answer could not be"
                f" read ({failed.message}); check the base URL points at an LLM API"
            )
        return FatalError(
            f"the server cannot be reached: the first requests failed before any succeeded"
            f" ({failed.message})"
        )
    return None


_NOT_CONNECTED = ("could not connect", "ClientConnector", "ClientProxyConnectionError", "refused")
"""What the caller's message says when no connection was made (else the server answered)."""


__all__ = [
    "answer_stages",
    "build_caller",
    "create_limiter",
    "preflight",
    "release_caller",
    "setup_failure",
]
