"""The public surface, pinned name by name: any change to it is a visible diff in this file.

Adding or removing a public name means editing the list below in the same commit, where a
reviewer sees it. Each face's ``__all__`` is sorted, holds no private name, every name in it
resolves, and the face exposes nothing public that ``__all__`` does not list.
"""

from __future__ import annotations

import importlib
import types

import pytest

PINNED: dict[str, list[str]] = {
    "pipeline": [
        "ConfigError",
        "Envelope",
        "Failed",
        "FatalError",
        "Inbox",
        "ItemError",
        "ItemStage",
        "IterSource",
        "LedgerError",
        "MissingFieldError",
        "NotStartedError",
        "Outbox",
        "Pipeline",
        "PipelineError",
        "QuotaExhaustedError",
        "Results",
        "RunReport",
        "Source",
        "Stage",
        "StageFilter",
        "StageStats",
        "configure_logging",
        "filter",
        "flat_map",
        "map",
    ],
    "stages": [
        "AnthropicProvider",
        "AnthropicStreamAssembler",
        "AuthenticationError",
        "AzureProvider",
        "BadRowError",
        "Batcher",
        "CallerTotals",
        "ChatStreamAssembler",
        "Completion",
        "CsvSink",
        "CsvSource",
        "DeadLetterSink",
        "DeadlineExceededError",
        "Deployment",
        "FileSink",
        "FileSource",
        "HTTP",
        "InvalidOutputError",
        "ItemFailedError",
        "JsonlSink",
        "JsonlSource",
        "LLMCallError",
        "LLMCaller",
        "Limits",
        "MalformedChunkError",
        "NoEndpointLeftError",
        "Output",
        "ParquetSink",
        "ParquetSource",
        "PipelineRunnable",
        "Price",
        "PromptTemplate",
        "Provider",
        "RayTransform",
        "RedisRateLimiter",
        "RedisUnavailableError",
        "ResponseCache",
        "Retry",
        "Routing",
        "RunnableStage",
        "SSEDecoder",
        "SSEParse",
        "ServerSentEvent",
        "StreamError",
        "StreamErrorEvent",
        "TruncatedStreamError",
        "Unbatch",
        "count_rows",
        "key_fingerprint",
        "open_sink",
        "open_source",
        "ray_transform",
        "request_key",
        "split_batch",
    ],
    "stages.llm": [
        "AnthropicProvider",
        "AnthropicStreamAssembler",
        "AuthenticationError",
        "AzureProvider",
        "CallerTotals",
        "ChatStreamAssembler",
        "Completion",
        "DeadlineExceededError",
        "Deployment",
        "HTTP",
        "InvalidOutputError",
        "LLMCallError",
        "LLMCaller",
        "Limits",
        "MalformedChunkError",
        "NoEndpointLeftError",
        "Output",
        "Price",
        "PromptTemplate",
        "Provider",
        "RedisRateLimiter",
        "RedisUnavailableError",
        "ResponseCache",
        "Retry",
        "Routing",
        "SSEDecoder",
        "SSEParse",
        "ServerSentEvent",
        "StreamError",
        "StreamErrorEvent",
        "TruncatedStreamError",
        "key_fingerprint",
        "request_key",
    ],
    "stages.files": [
        "KNOWN_EXTENSIONS",
        "BadRowError",
        "CsvSink",
        "CsvSource",
        "DeadLetterSink",
        "FileSink",
        "FileSource",
        "JournalFile",
        "JsonlSink",
        "JsonlSource",
        "ParquetSink",
        "ParquetSource",
        "count_rows",
        "dead_letter_record",
        "encode_record",
        "file_format",
        "open_sink",
        "open_source",
        "parse_record",
        "sample_fields",
    ],
    "pipeline.jobs": [
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
    ],
    "pipeline.server": ["ServerConfig", "create_app", "main"],
    "pipeline.testing": [
        "BatchSim",
        "BatchSimConfig",
        "SimConfig",
        "Simulator",
        "embedding_for",
        "serve",
    ],
    "pipeline.cli": ["main"],
    "pipeline.frames": ["EnrichOptions", "RowFailedError", "aenrich", "astream", "enrich"],
}


@pytest.mark.parametrize("face", sorted(PINNED))
def test_public_names_are_exactly_the_pinned_list(face: str) -> None:
    module = importlib.import_module(face)
    names = list(module.__all__)
    pinned = PINNED[face]
    added, removed = sorted(set(names) - set(pinned)), sorted(set(pinned) - set(names))
    assert (added, removed) == ([], []), (
        f"{face}.__all__ changed: added {added}, removed {removed}; a change to the public API"
        " is deliberate: update PINNED in tests/test_public_api.py in the same commit"
    )
    assert names == pinned, f"{face}.__all__ is not sorted"


@pytest.mark.parametrize("face", sorted(PINNED))
def test_every_public_name_resolves_and_nothing_else_is_public(face: str) -> None:
    module = importlib.import_module(face)
    for name in module.__all__:
        assert not name.startswith("_")
        assert getattr(module, name) is not None, name
    public = {n for n in vars(module) if not n.startswith("_")}
    submodules = {n for n in public if isinstance(getattr(module, n), types.ModuleType)}
    assert public - submodules == set(module.__all__)


def test_stages_loads_optional_extras_lazily() -> None:
    stages = importlib.import_module("stages")
    lazy = {"ItemFailedError", "PipelineRunnable", "RunnableStage"}
    assert lazy <= set(stages.__all__)
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        _ = stages.NotAName
