"""A wrong setup says what happened and what to do: no key, a wrong URL, nothing succeeded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sim_thread import ThreadSim

from pipeline import ConfigError, FatalError, Pipeline
from pipeline.cli._main import main
from pipeline.testing._sim import SimConfig, Simulator, serve
from stages import LLMCaller
from stages.llm._providers import make_provider


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def server() -> Iterator[Simulator]:
    with ThreadSim() as sim:
        yield sim


@pytest.fixture
def sim(server: Simulator) -> Simulator:
    server.configure(SimConfig())
    server.reset()
    return server


def _input(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- no key -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_key_for_the_public_api_is_said_before_any_request() -> None:
    caller = LLMCaller(model="gpt-4o-mini", prompt="Hi {name}")
    with anyio.fail_after(10), pytest.raises(ConfigError) as info:
        await Pipeline([{"name": "Ada"}], caller).run()
    text = str(info.value)
    assert "no API key found for https://api.openai.com/v1" in text
    assert "$OPENAI_API_KEY is not set: export OPENAI_API_KEY=..." in text
    assert "--api-key-env" in text and "rejected" not in text


def test_no_key_in_the_cli_is_a_usage_error_naming_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _input(tmp_path, [{"name": "Ada"}])
    args = ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", "claude-3-5-haiku"]
    assert main([*args, "--provider", "anthropic", "--prompt", "{name}"]) == 2
    err = capsys.readouterr().err
    assert "$ANTHROPIC_API_KEY is not set: export ANTHROPIC_API_KEY=..." in err
    assert "cannot reach" not in err  # said before trying the network


@pytest.mark.anyio
async def test_a_401_from_a_server_sent_no_key_says_no_key_was_sent() -> None:
    async with serve(SimConfig(require_key="sk-right")) as sim:
        caller = LLMCaller(model="m", prompt="Hi {name}", base_url=sim.url)
        with anyio.fail_after(10), pytest.raises(FatalError) as info:
            await Pipeline([{"name": "Ada"}], caller).run()
    text = str(info.value)
    assert "requires an API key and none was sent" in text
    assert "$OPENAI_API_KEY is not set" in text and "rejected" not in text


# -- wrong URL ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_404_names_the_url_called_and_the_missing_v1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve() as sim:
        root = sim.url.removesuffix("/v1")
        caller = LLMCaller(model="m", prompt="Hi {name}", base_url=root)
        with anyio.fail_after(10), caplog.at_level(logging.WARNING, logger="pipeline"):
            report = await Pipeline([{"name": "Ada"}, {"name": "Bo"}], caller).run()
    assert report.ok == 0 and report.failed == 2
    message = report.failures[0].message
    assert f"POST {root}/chat/completions" in message
    assert "does not end in a version such as /v1" in message and f"{root + '/v1'!r}" in message
    # nothing succeeded: the library says so, loudly, though no dead letter was given
    [record] = [r for r in caplog.records if "no item succeeded" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "all 2 failed; the first, in stage 'llm': HTTP 404" in record.getMessage()


@pytest.mark.anyio
async def test_a_run_with_one_success_is_not_called_a_total_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve() as sim:
        caller = LLMCaller(model="m", prompt="Hi {name}", base_url=sim.url)
        with anyio.fail_after(10), caplog.at_level(logging.WARNING, logger="pipeline"):
            report = await Pipeline([{"name": "Ada"}, {"nom": "Bo"}], caller).run()
    assert (report.ok, report.failed) == (1, 1)
    assert not [r for r in caplog.records if "no item succeeded" in r.getMessage()]


def test_the_job_stops_on_a_404_showing_the_url(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _input(tmp_path, [{"name": "Ada"}])
    root = sim.url.removesuffix("/v1")
    args = ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--quiet"]
    assert main([*args, "--base-url", root, "--prompt", "{name}"]) == 1
    err = capsys.readouterr().err
    assert f"POST {root}/chat/completions" in err and "try" in err and "/v1" in err


def test_base_urls_come_from_the_sdk_variables_with_or_without_v1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert make_provider("anthropic", "https://api.anthropic.com").needs_key()
    assert not make_provider("openai", "http://localhost:8000/v1").needs_key()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://proxy:8080")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm:8000/v1")
    assert make_provider("anthropic", None).url("chat", "m") == "http://proxy:8080/v1/messages"
    assert make_provider("anthropic", "http://h/v1").url("chat", "m") == "http://h/v1/messages"
    assert make_provider("openai", None).url("chat", "m") == "http://vllm:8000/v1/chat/completions"


@pytest.mark.anyio
async def test_anthropic_base_url_as_the_sdk_takes_it_reaches_the_messages_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    async with serve() as sim:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", sim.url.removesuffix("/v1"))
        caller = LLMCaller(model="claude-3-5-haiku", prompt="Hi {name}", provider="anthropic")
        async with Pipeline([{"name": "Ada"}], caller).open() as results:
            rows = [row async for row in results]
    assert rows[0]["response"] == "echo: Hi Ada"


# -- nothing succeeded, in the CLI --------------------------------------------------------------


def test_the_cli_says_when_no_row_succeeded(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _input(tmp_path, [{"name": None}, {"name": None}])
    args = ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--quiet"]
    assert main([*args, "--base-url", sim.url, "--prompt", "{name}"]) == 3
    err = capsys.readouterr().err
    assert "no row succeeded: all 2 rows failed (ItemError: 2)" in err
    assert f"{tmp_path / 'o.jsonl.failed.jsonl'}" in err
