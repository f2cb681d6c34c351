"""File-to-file jobs: settings, the crash-safe journal, and the local and Ray engines.

A job reads an input file, sends each row through the LLM caller and writes the same rows with
the answers to an output file, the failures to a dead-letter file, and can resume after a crash
with every row exactly once::

    from pipeline.jobs import JobSettings, run_job

    summary = await run_job(JobSettings(input="in.jsonl", output="out.jsonl", prompt="{text}"))
"""

from pipeline.jobs._job import JobFailedError as JobFailedError
from pipeline.jobs._job import JobProgress as JobProgress
from pipeline.jobs._job import JobSettings as JobSettings
from pipeline.jobs._job import JobSummary as JobSummary
from pipeline.jobs._job import build_caller as build_caller
from pipeline.jobs._job import preflight as preflight
from pipeline.jobs._job import read_job_file as read_job_file
from pipeline.jobs._job import release_caller as release_caller
from pipeline.jobs._job import run_job as run_job
from pipeline.jobs._job import setup_failure as setup_failure
from pipeline.jobs._journal import Journal as Journal
from pipeline.jobs._journal import ResumeError as ResumeError

__all__ = [
    "JobFailedError",
    "JobProgress",
    "JobSettings",
    "JobSummary",
    "Journal",
    "ResumeError",
    "build_caller",
    "preflight",
    "read_job_file",
    "release_caller",
    "run_job",
    "setup_failure",
]
