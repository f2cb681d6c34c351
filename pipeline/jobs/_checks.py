"""What a job checks before it sends anything: formats, a finished output, the template.

:func:`check_job` runs before any engine starts (see :func:`~pipeline.jobs.run_job`), so a
mistake costs the user one line of error, not a request per row:

- the input and output extensions name formats (``.jsonl``, ``.csv.gz``...), or the formats
  are given;
- a finished output is not replaced without ``overwrite`` (or ``resume``): the message names
  the file and how many rows it holds;
- the prompt template is checked against the input's first row (JSON Lines) or its columns
  (CSV header, Parquet schema): an unknown field gets a did-you-mean and the fields there are.
"""

from __future__ import annotations

import os

from pipeline._errors import ConfigError
from pipeline.jobs._journal import MANIFEST_SUFFIX
from pipeline.jobs._settings import JobSettings, check_files
from stages.files import count_rows, file_format, sample_fields
from stages.files._pipes import is_stream
from stages.llm._template import PromptTemplate

__all__ = ["check_job", "prompt_template"]


def prompt_template(settings: JobSettings) -> PromptTemplate | None:
    """Return the job's prompt template (nulls render empty with ``null_as_empty``)."""
    if settings.prompt is None:
        return None
    return PromptTemplate(settings.prompt, null="empty" if settings.null_as_empty else "error")


def check_job(settings: JobSettings) -> None:
    """Refuse, before anything is sent, a job that would fail on every row or lose a file.

    Blocking (it reads the input's first row): run it in a thread.

    Raises:
        ConfigError: What :func:`~pipeline.jobs._settings.check_files` refuses, an unknown
            file extension, a finished output without ``overwrite``, or a
            template naming a field the input does not have.
    """
    assert settings.input is not None and settings.output is not None
    check_files(settings)
    file_format(settings.input, settings.input_format)
    file_format(settings.output, settings.output_format)
    _check_finished_output(settings)
    template = prompt_template(settings)
    if template is None or is_stream(settings.input):
        return  # a pipe or a device: reading a row here would take it from the job (or hang)
    try:
        sample = sample_fields(
            settings.input, fmt=settings.input_format, delimiter=settings.csv_delimiter
        )
    except OSError:
        return  # the source says what is wrong with the input
    if sample is not None:
        template.check(sample)


def _check_finished_output(settings: JobSettings) -> None:
    output = settings.output
    assert output is not None
    if settings.overwrite or settings.resume or not os.path.isfile(output):
        return
    if os.path.exists(output + MANIFEST_SUFFIX):
        return  # an interrupted job: its journal says what to do
    try:
        rows = count_rows(output, fmt=settings.output_format)
    except (OSError, ValueError, ConfigError):
        rows = None
    held = "" if rows is None else f" ({rows:,} row{'s' if rows != 1 else ''})"
    raise ConfigError(
        f"output {output!r} already exists{held}: use --overwrite to replace it"
        " (overwrite = true in a job file), or choose another output file"
    )
