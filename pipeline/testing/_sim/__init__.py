"""A simulated OpenAI-compatible (and Anthropic, Azure, Paradigm) LLM server with fault injection.

Used by the tests, the demo, the benchmarks and ``python -m pipeline sim``: a real aiohttp server
on a real socket, cheap enough to be the baseline's server in benchmarks (pre-encoded constant
bytes, templated stream chunks, no per-request logging).

Routes:

* ``POST /v1/chat/completions``: JSON, or server-sent events with ``"stream": true``
  (``chat.completion.chunk`` objects: a role chunk, one chunk per word, a ``finish_reason``
  chunk, a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``).
* ``POST /v1/embeddings``: ``input`` a string, a list of strings or token arrays;
  ``encoding_format`` ``float`` or ``base64``; ``dimensions``.
* ``GET /v1/models``.
* ``POST /v1/messages``: the Anthropic Messages API (JSON or typed SSE events, ``x-api-key``).
* ``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` and
  ``.../embeddings``: Azure OpenAI style (``api-key`` header; ``api-version`` required).
* The OpenAI routes again under ``/api/v2`` instead of ``/v1`` (LightOn Paradigm).
* ``GET /sim/counters``, ``POST /sim/reset``, ``GET``/``POST /sim/config``: observe, zero, and
  replace the configuration live (``POST`` a JSON object of :class:`SimConfig` fields; fields
  left out take their defaults).

The answer is a deterministic function of the request, so tests can check correctness:

* content is ``"echo: " + <text of the last user message>`` (message content may be a string or
  a list of ``{"type": "text"}`` parts); with ``response_format`` of type ``json_object`` or
  ``json_schema`` it is the JSON object ``{"echo": <text>}`` instead;
* tokens are counted as ``max(1, len(text) // 4)``; prompt tokens are that rule applied to the
  total length of every message's text (plus ``system`` for Anthropic), completion tokens to
  the answer, embedding tokens to each input;
* ``max_tokens`` (or ``max_completion_tokens``) cuts the answer at a word boundary so that its
  completion tokens do not exceed it (the first word is always kept); the finish reason is then
  ``"length"`` (Anthropic ``"max_tokens"``), otherwise ``"stop"`` (``"end_turn"``). A cut JSON
  answer is invalid JSON, as it would be from a real model;
* an embedding is the unit vector of ``dim`` little-endian int16 values taken from the
  SHAKE-256 digest of the UTF-8 text (:func:`embedding_for`).

Faults: for request number ``n`` (counted from 0 in arrival order, all routes but ``/sim``), one
uniform draw of ``random.Random(seed * 1_000_003 + n)`` picks at most one fault, each kind
taking its rate's share of [0, 1) in this order: ``reset`` (connection aborted with a TCP RST,
no response), ``error_5xx`` (500/502/503), ``error_429`` (rate limit with ``retry-after`` of
``retry_after_s``), ``quota_429`` (429 ``insufficient_quota``, no ``retry-after`` since waiting
will not help; Anthropic: 400 "credit balance is too low"), ``overloaded`` (Anthropic 529
``overloaded_error``; not applied on other routes), ``non_json`` (200 with an HTML page),
``truncate`` (a stream ends cleanly but before ``finish_reason``/``[DONE]``/``message_stop``; a
JSON body is cut: full ``Content-Length``, half the bytes, then the connection closes),
``malformed`` (a stream gets one non-JSON chunk half-way, then goes on; a JSON body is
syntactically broken), ``stall`` (half the response is sent, then nothing for ``stall_s``
seconds, then the connection closes), ``stream_error`` (a stream carries an error event half-way
and ends: ``{"error": ...}`` for OpenAI, ``event: error`` overloaded for Anthropic; streams only).
A fault drawn for a route it does not apply to is not injected. The same draw then gives the
latency jitter, uniform in ``latency_ms +/- jitter_ms`` (never below zero), applied before the
first byte of every admitted response. A run is therefore deterministic given the request order.

Quotas: ``rpm`` and ``tpm`` are token buckets holding ``burst_s`` seconds of quota, refilled
continuously (providers enforce limits over short windows, not per minute). A request costs one
request and its prompt plus completion tokens; it is admitted when each bucket holds at least
``min(cost, capacity)`` (so an oversized request waits for a full bucket rather than forever,
and then drives the bucket negative). A refused request gets a 429 ``rate_limit_exceeded`` with
``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``. Authentication (401 when
``require_key`` is set and the key differs) is checked before quotas, quotas before faults.

Headers: when ``rpm`` (``tpm``) is set, every response of the LLM routes (errors included,
aborted connections aside) carries
``x-ratelimit-limit-requests`` (``-tokens``) with the per-minute quota,
``x-ratelimit-remaining-requests`` with what the bucket holds now, and
``x-ratelimit-reset-requests`` with the time until it is full again in OpenAI's duration format
(``120ms``, ``1.5s``, ``6m0s``); Anthropic routes use ``anthropic-ratelimit-requests-limit``,
``-remaining`` and ``-reset`` (an RFC 3339 time). Without quotas these headers are omitted.

Enforcement modes (``_enforcement``): ``burst_s=60`` is a fresh key's full-minute bucket;
``window_s`` also enforces every quota over short windows the headers do not show (600 RPM as
10 a second, as providers that quantize do); ``itpm``/``otpm`` are Anthropic's separate input
and output token quotas (prompt tokens, completion tokens; headers
``anthropic-ratelimit-input-tokens-*``/``-output-tokens-*`` on Anthropic routes); the
``error_429`` fault is an isolated 429 whose headers show the capacity left, a refusal by a
quota a 429 with the headers showing it empty and the real wait in ``retry-after-ms``; with
``price_prompt``/``price_completion`` the counters add up ``spent_usd`` (and give
``per_second``: requests arrived in each whole second since the start).

Layout: ``_config`` (:class:`SimConfig`), ``_answers`` (the deterministic answer),
``_quotas`` (the quotas and their headers), ``_enforcement`` (token buckets, short windows,
what requests cost), ``_faults`` (how a drawn fault spoils a
response), ``_core`` (state and plumbing shared by the endpoint families), one module per
endpoint family (``_openai``, ``_embeddings``, ``_anthropic``: each a ``register(core,
router)``), ``_server`` (:class:`Simulator`, :func:`serve`, the list of families) and ``_cli``.
The Batch APIs (OpenAI files and batches, Anthropic Message Batches) are ``_batches``
(:class:`~pipeline.testing._sim._batches.BatchSim`, ``sim.batches``, its own configuration
and faults; also ``GET``/``POST /sim/batches/config``) and ``_batch_objects`` (their shapes).
"""

from pipeline.testing._sim._answers import embedding_for as embedding_for
from pipeline.testing._sim._answers import tokens as tokens
from pipeline.testing._sim._cli import main as main
from pipeline.testing._sim._config import FAULTS as FAULTS
from pipeline.testing._sim._config import SimConfig as SimConfig
from pipeline.testing._sim._quotas import format_duration as format_duration
from pipeline.testing._sim._server import Simulator as Simulator
from pipeline.testing._sim._server import serve as serve

__all__ = [
    "FAULTS",
    "SimConfig",
    "Simulator",
    "embedding_for",
    "format_duration",
    "main",
    "serve",
    "tokens",
]
