"""Progress for frame jobs: a notebook widget in Jupyter, a bar in a terminal, or your callback.

``tqdm`` draws the bar when it is installed (the ``pandas`` and ``polars`` extras bring it):
its notebook widget when running in a Jupyter kernel with ``ipywidgets``, its text bar
otherwise. Without tqdm a one-line counter is rewritten on standard error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from pipeline.jobs import JobProgress

Hook = Callable[[JobProgress], Any]


def in_notebook() -> bool:
    """Return whether this code runs in a Jupyter kernel (without importing IPython)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_hook(option: bool | Hook | None, label: str = "rows") -> Hook | None:
    """Return the progress callback an option asks for.

    Args:
        option: A callable (used as is), ``True`` (a bar), ``False`` (none) or ``None``: a bar
            when in a notebook or when standard error is a terminal.
        label: What the bar counts.
    """
    if callable(option):
        return option
    if option is False:
        return None
    if option is None and not (in_notebook() or _is_terminal()):
        return None
    return _Bar(label)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Bar:
    """A progress bar fed with :class:`JobProgress` snapshots."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._made = False

    def _make(self, total: int | None) -> Any:
        self._made = True
        if importlib.util.find_spec("tqdm") is None:
            return None
        module = "tqdm.std"
        if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
            module = "tqdm.notebook"
        tqdm = importlib.import_module(module).tqdm
        return tqdm(total=total, unit=self.label, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, progress: JobProgress) -> None:
        if not self._made:
            self._bar = self._make(progress.rows_total)
        bar = self._bar
        if bar is None:
            self._line(progress)
            return
        if progress.rows_total is not None and bar.total != progress.rows_total:
            bar.total = progress.rows_total
        bar.n = progress.rows_done
        postfix: dict[str, Any] = {"failed": progress.failed, "requests": progress.requests}
        if progress.cost_usd:
            postfix["usd"] = round(progress.cost_usd, 4)
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()
        if progress.final:
            bar.close()

    def _line(self, progress: JobProgress) -> None:
        total = f"/{progress.rows_total}" if progress.rows_total is not None else ""
        text = (
            f"\r{progress.rows_done}{total} {self.label}, {progress.failed} failed,"
            f" {progress.rows_per_s:.0f}/s"
        )
        end = "\n" if progress.final else ""
        sys.stderr.write(text + end)
        sys.stderr.flush()
