"""One table of exit codes (docs/cli.md), followed everywhere; messages that say what and where.

Each code has its tests: 0 and 3 (``test_cli.py``), 1 (here and ``test_cli.py``), 2 (here:
damaged job files, an unreadable input, a job already running in ``test_job_lock.py``), 130
(``test_signals.py``). Hostile servers on 127.0.0.1 check that an answer the job cannot read is
not reported as a server that cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sim_thread import ThreadSim

from pipeline.cli._common import (
    EXIT_FAILED_ROWS,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)
from pipeline.cli._main import main
from pipeline.jobs import JobSettings
from pipeline.jobs._journal import journal_for
from pipeline.testing._sim import Simulator
from stages.files._records import encode_record

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with ThreadSim() as server:
        yield server


def run(sim_url: str, *args: str) -> int:
    return main(["run", "--model", "m", "--prompt", "hi {name}", "--base-url", sim_url, *args])


def write_rows(path: Path, n: int = 20) -> Path:
    path.write_text("".join(json.dumps({"name": f"n{i}"}) + "\n" for i in range(n)))
    return path


def test_docs_table_lists_exactly_the_codes_the_cli_uses() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    blocks = text[text.index("## Exit status") :].split("\n\n")
    table = next(block for block in blocks if block.startswith("| status |"))
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    used = {EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_FAILED_ROWS, EXIT_INTERRUPTED}
    assert documented == used


def test_a_damaged_journal_and_an_unreadable_checkpoint_exit_with_the_same_code(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    # the files an interrupted run of this very command leaves: its checkpoint matches
    journal = journal_for(JobSettings(input=str(src), output=str(out), model="m",
                                      prompt="hi {name}"))  # fmt: skip
    journal.open()
    journal.close()
    partial = tmp_path / "out.jsonl.partial"
    good = encode_record(1, 1, b'{"name": "n0"}'), encode_record(3, 3, b'{"name": "n2"}')
    partial.write_bytes(good[0] + b"garbage\n" + good[1])
    assert run(sim.url, str(src), "-o", str(out), "--quiet", "--resume") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "record 2 is damaged" in err and "out.jsonl.partial" in err and "--overwrite" in err
    (tmp_path / "out.jsonl.checkpoint.json").write_text("{not json")
    assert run(sim.url, str(src), "-o", str(out), "--quiet", "--resume") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "checkpoint" in err and "is unreadable" in err and "--overwrite" in err


def test_a_latin_1_csv_exits_2_and_suggests_encoding(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "people.csv"
    src.write_bytes(b"n\xe4me,name\nJos\xe9,M\xfcller\n")  # Latin-1, header included
    out = tmp_path / "out.jsonl"
    assert run(sim.url, str(src), "-o", str(out), "--quiet") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "people.csv:1" in err and "invalid UTF-8" in err and "--encoding latin-1" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert run(sim.url, str(src), "-o", str(out), "--quiet", "--encoding", "latin-1") == EXIT_OK
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["näme"] == "José" and row["response"] == "echo: hi Müller"


def test_an_unknown_or_unusable_encoding_is_a_usage_error(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_rows(tmp_path / "in.jsonl")
    out = str(tmp_path / "out.jsonl")
    assert run(sim.url, str(src), "-o", out, "--encoding", "klingon") == EXIT_USAGE
    assert "unknown encoding 'klingon'" in capsys.readouterr().err
    assert run(sim.url, str(src), "-o", out, "--encoding", "utf-16") == EXIT_USAGE
    assert "not ASCII-compatible" in capsys.readouterr().err


def test_a_file_size_limit_names_the_file_it_stopped(tmp_path: Path, sim: Simulator) -> None:
    write_rows(tmp_path / "in.jsonl", 300)

    def limit() -> None:  # EFBIG instead of SIGXFSZ, as on a full or capped disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    argv = [
        sys.executable, "-m", "pipeline", "run", "in.jsonl", "-o", "out.jsonl", "--model", "m",
        "--prompt", "hi {name}", "--base-url", sim.url, "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_FATAL, done.stderr
    assert "cannot write to 'out.jsonl.partial': File too large" in done.stderr


class HostileServer:
    """Accepts connections on 127.0.0.1 and answers every request the same hostile way."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.recv(65536)  # the request (small: one row)
                    if self.how == "gzip":
                        body = b"this is not gzip at all" * 4
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body
                        )  # fmt: skip
                    else:  # reset: RST instead of an answer
                        conn.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("how", ["gzip", "reset"])
def test_an_answer_that_cannot_be_read_is_not_called_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    src = write_rows(tmp_path / "in.jsonl", 5)
    server = HostileServer(how)
    try:
        status = run(server.url, str(src), "-o", str(tmp_path / "out.jsonl"), "--quiet",
                     "--max-retries", "0")  # fmt: skip
    finally:
        server.close()
    err = capsys.readouterr().err
    assert status == EXIT_FATAL, err
    assert "cannot be reached" not in err
    assert "accepted the connection" in err
