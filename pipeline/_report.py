"""The report a run returns: what every stage did, and whether every item is accounted for."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._channels import StageStats
from ._envelope import Failed


@dataclasses.dataclass(slots=True)
class RunReport:
    """What happened in one run.

    Attributes:
        name: The pipeline's name.
        stages: Per-stage counters, in pipeline order (the dead-letter sink last, if any).
        elapsed_s: Wall time of the run.
        rows_in: Items that entered the pipeline (emitted or rejected by the source).
        ok: Items that left the last stage.
        failed: Items sent to the dead letter.
        dropped: Items discarded on purpose (filters).
        created: Extra items made by 1:n stages (``flat_map``).
        complete: False when the caller left early or the run was cancelled.
        stopped: Why the run stopped reading input early (a budget, Ctrl-C), if it did.
        failures: The :class:`Failed` records, when no dead-letter sink was given.
    """

    name: str
    stages: tuple[StageStats, ...]
    elapsed_s: float
    rows_in: int
    ok: int
    failed: int
    dropped: int
    created: int
    complete: bool
    stopped: str | None = None
    failures: list[Failed] = dataclasses.field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """Whether ``rows_in + created == ok + failed + dropped``."""
        return self.rows_in + self.created == self.ok + self.failed + self.dropped

    def _sum(self, field: str) -> Any:
        return sum(getattr(s, field) for s in self.stages)

    @property
    def requests(self) -> int:
        """Requests sent to servers by all stages."""
        return int(self._sum("requests"))

    @property
    def retries(self) -> int:
        """Retries made by all stages."""
        return int(self._sum("retries"))

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens reported by servers."""
        return int(self._sum("prompt_tokens"))

    @property
    def completion_tokens(self) -> int:
        """Completion tokens reported by servers."""
        return int(self._sum("completion_tokens"))

    @property
    def cost_usd(self) -> float:
        """Cost of the tokens per the callers' price tables."""
        return float(self._sum("cost_usd"))

    def stage(self, name: str) -> StageStats:
        """Return the counters of the stage called ``name``."""
        for stats in self.stages:
            if stats.name == name:
                return stats
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data."""
        return {
            "name": self.name,
            "rows_in": self.rows_in,
            "ok": self.ok,
            "failed": self.failed,
            "dropped": self.dropped,
            "created": self.created,
            "complete": self.complete,
            "stopped": self.stopped,
            "requests": self.requests,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "elapsed_s": round(self.elapsed_s, 4),
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    def __str__(self) -> str:
        head = f"{'stage':<24}{'workers':>8}{'in':>10}{'out':>10}{'failed':>8}"
        head += f"{'dropped':>9}{'busy s':>9}{'blocked s':>11}"
        lines = [head, "-" * len(head)]
        for s in self.stages:
            lines.append(
                f"{s.name[:23]:<24}{s.workers:>8}{s.received:>10}{s.emitted:>10}{s.failed:>8}"
                f"{s.dropped:>9}{s.busy_s:>9.2f}{s.blocked_s:>11.2f}"
            )
        rate = self.rows_in / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines.append(
            f"{self.rows_in} in, {self.ok} ok, {self.failed} failed, {self.dropped} dropped"
            f" in {self.elapsed_s:.2f} s ({rate:,.0f} items/s)"
            + (f"; stopped: {self.stopped}" if self.stopped else "")
        )
        return "\n".join(lines)
