"""Routing options: the endpoints a caller may send to, and how it chooses among them.

A caller given ``provider=Routing(...)`` spreads its rows over several endpoints (several keys,
deployments, regions or servers), each a :class:`Deployment` with its own URL, key, model
name, provider and limits::

    Routing(
        endpoints=[
            Deployment(name="east", base_url="https://east.example/v1", api_key_env="KEY_E",
                       model="gpt-4o-mini", rpm=300),
            Deployment(name="west", base_url="https://west.example/v1", api_key_env="KEY_W",
                       model="gpt-4o-mini", rpm=300, price=(0.15, 0.6)),
            Deployment(name="small", base_url="https://west.example/v1", api_key_env="KEY_W",
                       model="gpt-4.1-nano"),
        ],
        fallbacks=["gpt-4.1-nano"],
        policy="headroom",
    )

A deployment *serves* a model (its ``serves``, by default its ``model``): the caller's
``model`` names the endpoints a row goes to first, ``fallbacks`` the models it is retried on
when that fails. What happens at run time is in :mod:`stages.llm._router`.

These are plain, frozen, keyword-only values checked when built; :func:`deployment_from_mapping`
reads one from a job file's ``[[endpoints]]`` table, a JSON body or a CLI ``--route`` flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from pipeline._errors import ConfigError
from stages.llm._limits import Limiter
from stages.llm._output import Price
from stages.llm._providers import Provider, ProviderName, make_provider

Policy = Literal["headroom", "cheapest"]
"""How a request chooses among the endpoints that can take it (see :class:`Routing`)."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    """One endpoint a routed caller may send to: a URL, a key, a model and their limits.

    Args:
        model: The model name sent in the request (Azure: the deployment name).
        name: A short unique name for logs, the summary and the output (default: the URL's
            host and the model).
        serves: The model this endpoint answers for (default ``model``): the caller's
            ``model`` and ``fallbacks`` name endpoints by it, so several deployments of one
            model under different names serve the same rows.
        provider: ``"openai"`` (any compatible server), ``"azure"`` or ``"anthropic"``.
        base_url: The API root (default: the provider's).
        api_key_env: The environment variable holding this endpoint's key (its name only:
            the key itself is never configuration). Default: the provider's variable.
        rpm: Requests per minute of this endpoint's quota (a ceiling and a first guess; its
            own headers say what is there).
        tpm: Tokens per minute.
        itpm: Input tokens per minute (Anthropic).
        otpm: Output tokens per minute (Anthropic).
        limiter: A shared limiter for this endpoint (e.g. a ``RedisRateLimiter`` keyed by its
            key), when the job runs in several processes.
        max_concurrency: Most requests in flight to this endpoint at once.
        weight: Relative share of the traffic when endpoints are otherwise equal (>0).
        price: USD per 1M prompt and completion tokens on this endpoint (for ``cheapest``
            and the cost figures; default: the caller's price table).
        headers: Extra HTTP headers for this endpoint.

    Raises:
        ConfigError: A value out of range, a key given instead of a variable name.
    """

    model: str
    name: str | None = None
    serves: str | None = None
    provider: ProviderName = "openai"
    base_url: str | None = None
    api_key_env: str | None = None
    rpm: float | None = None
    tpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None
    limiter: Limiter | None = None
    max_concurrency: int = 64
    weight: float = 1.0
    price: tuple[float, float] | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"endpoint {self.name or self.model!r}"
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"{where}: model must be a non-empty string")
        if self.provider not in ("openai", "azure", "anthropic"):
            raise ConfigError(
                f"{where}: provider must be 'openai', 'azure' or 'anthropic', got {self.provider!r}"
            )
        for field in ("rpm", "tpm", "itpm", "otpm"):
            value = getattr(self, field)
            if value is not None and not (
                isinstance(value, (int, float)) and value > 0 and math.isfinite(value)
            ):
                raise ConfigError(f"{where}: {field} must be a number > 0, got {value!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ConfigError(f"{where}: weight must be > 0, got {self.weight!r}")
        if not isinstance(self.max_concurrency, int) or self.max_concurrency < 1:
            raise ConfigError(f"{where}: max_concurrency must be >= 1, got {self.max_concurrency}")
        env = self.api_key_env
        if env is not None and not _ENV_NAME.match(env):
            # a value that is not a variable name is most likely the key itself: never echo it
            raise ConfigError(
                f"{where}: api_key_env must name an environment variable (like OPENAI_API_KEY),"
                " not hold the key itself"
            )
        if self.price is not None:
            price = tuple(self.price)
            if len(price) != 2 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in price
            ):
                raise ConfigError(
                    f"{where}: price must be [usd_per_1M_prompt, usd_per_1M_completion],"
                    f" got {self.price!r}"
                )
            object.__setattr__(self, "price", (float(price[0]), float(price[1])))
        if self.base_url is not None and urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ConfigError(f"{where}: base_url must be an http(s) URL, got {self.base_url!r}")
        object.__setattr__(self, "headers", dict(self.headers))

    @property
    def group(self) -> str:
        """The model this endpoint serves (``serves``, else ``model``)."""
        return self.serves or self.model

    def label(self) -> str:
        """Return the endpoint's name: ``name``, else the URL's host and the model."""
        if self.name:
            return self.name
        host = urlsplit(self.base_url).netloc if self.base_url else self.provider
        return f"{host}/{self.model}"

    def make_provider(self) -> Provider:
        """Return the provider adapter of this endpoint.

        Raises:
            ConfigError: The provider cannot be built (Azure without a URL).
        """
        try:
            return make_provider(self.provider, self.base_url)
        except ValueError as exc:
            raise ConfigError(f"endpoint {self.label()!r}: {exc}") from None

    def key_env(self) -> str:
        """Return the variable this endpoint's key is read from."""
        return self.api_key_env or self.make_provider().key_env

    def unit_price(self) -> Price | None:
        """Return :attr:`price` as a :class:`~stages.llm._output.Price`, if set."""
        return None if self.price is None else Price(*self.price)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Routing:
    """Several endpoints for one caller, and what to do when one fails.

    Args:
        endpoints: The endpoints (at least one serving the caller's model).
        fallbacks: Models to retry a row on, in order, when it fails on its model after its
            retries, exceeds the model's context window, or finds no endpoint left for it.
        policy: Among the endpoints able to take a request now, ``"headroom"`` sends it to the
            one with the most room (fewest requests pending per request per second of its
            quota, by ``weight``); ``"cheapest"`` to the cheapest with a free slot and no
            queue, spilling to the others only when it is busy.
        failures: Consecutive failures (5xx, connection errors, timeouts) that take an
            endpoint out for a cool-down.
        cooldown_s: The first cool-down; it doubles after each failed probe.
        max_cooldown_s: The longest cool-down.

    Raises:
        ConfigError: No endpoint, two with one name, or a value out of range.
    """

    endpoints: Sequence[Deployment]
    fallbacks: Sequence[str] = ()
    policy: Policy = "headroom"
    failures: int = 3
    cooldown_s: float = 1.0
    max_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        endpoints = tuple(self.endpoints)
        if not endpoints:
            raise ConfigError("routing needs at least one endpoint")
        for item in endpoints:
            if not isinstance(item, Deployment):
                raise ConfigError(f"routing endpoints must be Deployment objects, got {item!r}")
        names = [d.label() for d in endpoints]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"two endpoints are named {twice[0]!r}: give each a unique name")
        if self.policy not in ("headroom", "cheapest"):
            raise ConfigError(f"policy must be 'headroom' or 'cheapest', got {self.policy!r}")
        if self.failures < 1:
            raise ConfigError(f"failures must be >= 1, got {self.failures}")
        if not (0 < self.cooldown_s <= self.max_cooldown_s):
            raise ConfigError("cooldown_s must be > 0 and at most max_cooldown_s")
        fallbacks = tuple(self.fallbacks)
        groups = {d.group for d in endpoints}
        for model in fallbacks:
            if model not in groups:
                raise ConfigError(f"fallback model {model!r} is served by no endpoint")
        object.__setattr__(self, "endpoints", endpoints)
        object.__setattr__(self, "fallbacks", fallbacks)

    def chain(self, model: str) -> tuple[str, ...]:
        """Return the models a row of ``model`` may be answered by, in order.

        Raises:
            ConfigError: No endpoint serves ``model``.
        """
        if model not in {d.group for d in self.endpoints}:
            served = ", ".join(sorted({d.group for d in self.endpoints}))
            raise ConfigError(f"no endpoint serves model {model!r} (they serve: {served})")
        return (model, *(m for m in self.fallbacks if m != model))


DEPLOYMENT_FIELDS = tuple(
    f.name for f in dataclasses.fields(Deployment) if f.name not in ("limiter",)
)
"""What a job file's ``[[endpoints]]`` table (or a ``--route`` flag) may set."""


def deployment_from_mapping(data: Mapping[str, Any], *, where: str) -> Deployment:
    """Build a :class:`Deployment` from a table (keys with ``-`` or ``_``).

    ``key_env`` and ``url`` are accepted for ``api_key_env`` and ``base_url``.

    Raises:
        ConfigError: An unknown key or a wrong value, naming ``where``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    aliases = {"key_env": "api_key_env", "url": "base_url"}
    given: dict[str, Any] = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        key = aliases.get(key, key)
        if key not in DEPLOYMENT_FIELDS:
            close = difflib.get_close_matches(key, DEPLOYMENT_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {raw!r}{hint}")
        given[key] = value
    if "model" not in given:
        raise ConfigError(f"{where}: needs a model")
    try:
        return Deployment(**given)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def parse_route(text: str) -> dict[str, Any]:
    """Parse a CLI ``--route`` value: ``key=value`` pairs separated by commas.

    Numbers become numbers; ``price=0.15/0.6`` is a prompt/completion price pair.

    Raises:
        ConfigError: A pair without ``=``.
    """
    data: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--route {text!r}: expected key=value pairs, got {part!r}")
        key = key.strip()
        value = value.strip()
        if key == "price":
            try:
                data[key] = [float(v) for v in value.split("/")]
            except ValueError:
                raise ConfigError(
                    f"--route: price must be PROMPT/COMPLETION, got {value!r}"
                ) from None
            continue
        data[key] = _number_or_text(value)
    return data


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


__all__ = [
    "DEPLOYMENT_FIELDS",
    "Deployment",
    "Policy",
    "Routing",
    "deployment_from_mapping",
    "parse_route",
]
