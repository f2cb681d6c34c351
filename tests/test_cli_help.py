"""``--help`` describes every flag, in groups, with examples that parse; typos get a
did-you-mean."""

from __future__ import annotations

import argparse
import shlex

import pytest

from pipeline.cli._help import RUN_EXAMPLES
from pipeline.cli._main import build_parser, main, settings_from_args


def _run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["run"]


def test_every_run_flag_is_described_and_grouped() -> None:
    parser = _run_parser()
    undescribed = [
        action.option_strings or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert undescribed == []
    titles = [group.title for group in parser._action_groups if group._group_actions]
    assert titles[1:] == [
        "input and output",
        "model and request",
        "limits and retries",
        "files and resume",
        "batch API (half price, within 24 hours; docs/batch.md)",
        "running",
    ]


def test_help_ends_with_examples_that_parse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llm-pipeline run INPUT -o OUTPUT --model MODEL")
    assert out.rstrip().endswith(RUN_EXAMPLES.rstrip().splitlines()[-1])
    commands = " ".join(RUN_EXAMPLES.replace("\\\n", " ").split("\n")).split("llm-pipeline ")
    parsed = 0
    for command in commands[1:]:
        words = shlex.split(command.split("#")[0])
        if "--config" in words:
            continue
        args = vars(_run_parser().parse_args(words[1:]))
        for name in ("debug", "progress_interval", "metrics_port"):  # not job settings
            args.pop(name, None)
        settings, _ = settings_from_args(args)
        settings.require_paths()
        parsed += 1
    assert parsed == 4


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["run", "in.jsonl", "--modle", "gpt-4o"], "(did you mean --model?)"),
        (["run", "in.jsonl", "--max-retry=3"], "(did you mean --max-retries?)"),
        (["rnu"], "(did you mean run?)"),
        (["run", "in.jsonl", "--provider", "antropic"], "(did you mean anthropic?)"),
    ],
)
def test_a_mistyped_flag_or_command_gets_a_did_you_mean(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(hint), err
