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

from typing import Any as _Any

from pipeline.jobs._caller import build_caller as build_caller
from pipeline.jobs._caller import preflight as preflight
from pipeline.jobs._caller import release_caller as release_caller
from pipeline.jobs._caller import setup_failure as setup_failure
from pipeline.jobs._estimate import JobEstimate as JobEstimate
from pipeline.jobs._estimate import estimate_job as estimate_job
from pipeline.jobs._journal import Journal as Journal
from pipeline.jobs._journal import ResumeError as ResumeError
from pipeline.jobs._lock import JobLock as JobLock
from pipeline.jobs._lock import JobLockedError as JobLockedError
from pipeline.jobs._progress import JobFailedError as JobFailedError
from pipeline.jobs._progress import JobProgress as JobProgress
from pipeline.jobs._progress import JobSummary as JobSummary
from pipeline.jobs._run import run_job as run_job
from pipeline.jobs._settings import JobSettings as JobSettings
from pipeline.jobs._settings import read_job_file as read_job_file

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


def __getattr__(name: str) -> _Any:
    """Load the Ray engine's entry point on first use (a local job never imports its modules)."""
    if name != "run_job_on_ray":
        raise AttributeError(f"module 'pipeline.jobs' has no attribute {name!r}")
    from pipeline.jobs._ray import run_job_on_ray

    globals()[name] = run_job_on_ray
    return run_job_on_ray
