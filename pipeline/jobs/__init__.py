"""File-to-file jobs: settings, the crash-safe journal, and the local and Ray engines.

A job reads an input file, sends each row through the LLM caller and writes the same rows with
the answers to an output file, the failures to a dead-letter file, and can resume after a crash
with every row exactly once::

    from pipeline.jobs import JobSettings, run_job

    summary = await run_job(JobSettings(input="in.jsonl", output="out.jsonl", prompt="{text}"))

The modules: ``_settings`` (:class:`JobSettings`, job files), ``_caller`` (the caller settings
describe), ``_journal`` (resume and atomic publish), ``_lock`` (:class:`JobLock`: one process
per job), ``_progress`` (progress and summary, one implementation for every engine), ``_local``
and ``_ray`` (the engines; ``_parts`` holds the Ray engine's files), ``_run``
(:func:`run_job`, which takes the lock and picks the engine) and ``_estimate``
(:func:`estimate_job`: what a job would cost, before anything is sent).
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from pipeline._lazy import load as _load

if _TYPE_CHECKING:
    from ._caller import build_caller as build_caller
    from ._caller import preflight as preflight
    from ._caller import release_caller as release_caller
    from ._caller import setup_failure as setup_failure
    from ._estimate import JobEstimate as JobEstimate
    from ._estimate import estimate_job as estimate_job
    from ._journal import Journal as Journal
    from ._journal import ResumeError as ResumeError
    from ._lock import JobLock as JobLock
    from ._lock import JobLockedError as JobLockedError
    from ._progress import JobFailedError as JobFailedError
    from ._progress import JobProgress as JobProgress
    from ._progress import JobSummary as JobSummary
    from ._ray import run_job_on_ray as run_job_on_ray
    from ._run import run_job as run_job
    from ._settings import JobSettings as JobSettings
    from ._settings import read_job_file as read_job_file

_LAZY = {
    "build_caller": "pipeline.jobs._caller",
    "preflight": "pipeline.jobs._caller",
    "release_caller": "pipeline.jobs._caller",
    "setup_failure": "pipeline.jobs._caller",
    "estimate_job": "pipeline.jobs._estimate",
    "JobEstimate": "pipeline.jobs._estimate",
    "Journal": "pipeline.jobs._journal",
    "ResumeError": "pipeline.jobs._journal",
    "JobLock": "pipeline.jobs._lock",
    "JobLockedError": "pipeline.jobs._lock",
    "JobFailedError": "pipeline.jobs._progress",
    "JobProgress": "pipeline.jobs._progress",
    "JobSummary": "pipeline.jobs._progress",
    "run_job_on_ray": "pipeline.jobs._ray",
    "run_job": "pipeline.jobs._run",
    "JobSettings": "pipeline.jobs._settings",
    "read_job_file": "pipeline.jobs._settings",
}
"""Where each public name is defined; the module is imported when the name is first used."""


def __getattr__(name: str) -> _Any:
    """Import the module that defines ``name`` on first use, then keep the name here."""
    return _load(name, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "JobEstimate",
    "JobFailedError",
    "JobLock",
    "JobLockedError",
    "JobProgress",
    "JobSettings",
    "JobSummary",
    "Journal",
    "ResumeError",
    "build_caller",
    "estimate_job",
    "preflight",
    "read_job_file",
    "release_caller",
    "run_job",
    "run_job_on_ray",
    "setup_failure",
]
