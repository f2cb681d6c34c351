"""What a job would cost, worked out before anything is sent (``--estimate``).

:func:`estimate_job` reads the job's input the way a run does, renders each row's request
exactly as the caller would send it, and adds up the worst case the budget reserves for it
(:class:`~stages.llm._output.Ledger`): the request's bytes / 4 as its prompt tokens, and
``max_tokens`` (256 when not set) for its answer. With the model's price that is the most the
job can cost; nothing is sent and no job file is written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline import Pipeline
from pipeline._envelope import Failed
from pipeline.jobs._caller import build_caller
from pipeline.jobs._settings import JobSettings
from stages.files import open_source
from stages.llm._budget import answer_reserve
from stages.llm._prompt import chat_messages, embedding_text
from stages.llm._transport import encode_body


@dataclasses.dataclass(frozen=True, slots=True)
class JobEstimate:
    """The preflight estimate of a whole job.

    Attributes:
        rows: Input rows whose request could be rendered (each is one request).
        bad_rows: Input rows that would be dead-lettered before any request (unreadable, or a
            template field missing).
        prompt_tokens: Prompt tokens of all requests, counted as their bytes / 4 (an upper
            bound for English text and the simulator; what the budget reserves).
        answer_tokens: Answer tokens at most: ``max_tokens`` per chat row (0 for embeddings).
        max_tokens: Answer tokens reserved per row.
        price: USD per 1M prompt and completion tokens, ``None`` when the model has none.
        cost_usd: The most the job can cost at that price (``None`` without a price).
        budget_usd: The job's budget, if it has one.
    """

    rows: int
    bad_rows: int
    prompt_tokens: int
    answer_tokens: int
    max_tokens: int
    price: tuple[float, float] | None
    cost_usd: float | None
    budget_usd: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return the estimate as JSON-ready data."""
        return dataclasses.asdict(self)

    def lines(self, model: str) -> list[str]:
        """Return the estimate as lines for people."""
        out = [
            f"estimate for {self.rows:,} rows (model {model!r}; nothing sent):",
            f"  prompt tokens  {self.prompt_tokens:,} (request bytes / 4)",
            f"  answer tokens  at most {self.answer_tokens:,} ({self.max_tokens:,} per row)",
        ]
        if self.bad_rows:
            out.append(f"  bad rows       {self.bad_rows:,} (dead-lettered without a request)")
        if self.cost_usd is None or self.price is None:
            out.append(f"  cost           unknown: no price for model {model!r}")
        else:
            out.append(
                f"  cost           at most ${self.cost_usd:,.4f} "
                f"(${self.price[0]:g} / ${self.price[1]:g} per 1M prompt / answer tokens)"
            )
        if self.budget_usd is not None and self.cost_usd is not None:
            verdict = "fits" if self.cost_usd <= self.budget_usd else "does not fit"
            out.append(f"  budget         ${self.budget_usd:g}: the worst case {verdict}")
        return out


async def estimate_job(settings: JobSettings) -> JobEstimate:
    """Return what the job ``settings`` describe would cost, without sending anything.

    Raises:
        ConfigError: The settings do not make a job (no input, a bad template...).
        OSError: The input cannot be read.
    """
    settings.require_paths()
    assert settings.input is not None
    caller = build_caller(settings, open_resources=False)
    provider = caller.provider
    embeddings = settings.endpoint == "embeddings"
    max_tokens = answer_reserve(caller) or 0
    rows = bad = prompt_tokens = 0

    def size(record: Any) -> int:
        if provider is None:
            return len(str(record).encode())
        if embeddings:
            text = embedding_text(caller.template, record)
            return len(encode_body(provider.embeddings_body(caller.model, [text], caller.params)))
        messages = chat_messages(caller.template, record)
        body = provider.chat_body(
            caller.model, messages, caller.system, caller.params, caller.output.stream
        )
        return len(encode_body(body))

    def failed(record: Failed) -> None:
        nonlocal bad
        bad += 1

    source = open_source(settings.input, fmt=settings.input_format, id_field=settings.id_field)
    async with Pipeline(source, dead_letter=failed, name="estimate").open() as results:
        async for record in results:
            try:
                request = size(record)
            except (KeyError, IndexError, AttributeError, ValueError, TypeError):
                bad += 1  # the caller dead-letters a row its template cannot render
                continue
            rows += 1
            prompt_tokens += max(1, request // 4)
    price = settings.price()
    answer_tokens = rows * max_tokens
    cost = None
    if price is not None:
        cost = (prompt_tokens * price[0] + answer_tokens * price[1]) / 1e6
    return JobEstimate(
        rows=rows,
        bad_rows=bad,
        prompt_tokens=prompt_tokens,
        answer_tokens=answer_tokens,
        max_tokens=max_tokens,
        price=price,
        cost_usd=cost,
        budget_usd=settings.budget,
    )


__all__ = ["JobEstimate", "estimate_job"]
