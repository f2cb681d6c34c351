"""What a job refuses before it sends a request: a finished output, a template the input cannot
fill; and the template options (nulls, separators) a job passes to its caller."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sim_thread import ThreadSim

from pipeline.cli._main import main
from pipeline.testing._sim import SimConfig, Simulator


@pytest.fixture(scope="module")
def server() -> Iterator[Simulator]:
    with ThreadSim() as sim:
        yield sim


@pytest.fixture
def sim(server: Simulator) -> Simulator:
    server.configure(SimConfig())
    server.reset()
    return server


def _run(sim: Simulator, *args: str) -> int:
    return main(["run", "--model", "m", "--base-url", sim.url, "--quiet", *args])


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_finished_output_is_not_replaced_without_overwrite(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"name": f"n{i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    assert _run(sim, str(src), "-o", str(out), "--prompt", "Hi {name}") == 0
    first = out.read_text()
    capsys.readouterr()
    requests = sim.counters()["requests"]
    assert _run(sim, str(src), "-o", str(out), "--prompt", "Hello {name}") == 2
    err = capsys.readouterr().err
    assert f"output {str(out)!r} already exists (3 rows): use --overwrite" in err
    assert out.read_text() == first and sim.counters()["requests"] == requests
    assert _run(sim, str(src), "-o", str(out), "--prompt", "Hello {name}", "--overwrite") == 0
    assert "Hello n0" in out.read_text()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("in.jsonl", '{"nmae": "Ada", "city": "x"}\n{"name": "Bo"}\n'),
        ("in.csv", "nmae,city\nAda,x\n"),
        ("in.csv.gz", None),
    ],
)
def test_a_template_field_the_input_lacks_stops_before_any_request(
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str | None,
) -> None:
    src = tmp_path / name
    if content is None:
        src.write_bytes(gzip.compress(b"nmae;city\nAda;x\n"))
    else:
        src.write_text(content)
    status = _run(sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt", "Hi {name}")
    err = capsys.readouterr().err
    assert status == 2, err
    assert "names field 'name', which the input does not have; did you mean {nmae}?" in err
    assert "(available fields: nmae, city)" in err
    assert sim.counters()["requests"] == 0
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_columns_are_checked_too(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"], "id": [1]}), tmp_path / "in.parquet")
    status = _run(
        sim, str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o.jsonl"), "--prompt", "{txt}"
    )
    assert status == 2
    assert "did you mean {text}?" in capsys.readouterr().err
    assert sim.counters()["requests"] == 0


def test_null_fields_fail_their_row_unless_rendered_empty(tmp_path: Path, sim: Simulator) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"name": "Ada"}, {"name": None}])
    out = tmp_path / "o.jsonl"
    assert _run(sim, str(src), "-o", str(out), "--prompt", "Hi {name}!") == 3
    failed = json.loads((tmp_path / "o.jsonl.failed.jsonl").read_text())
    assert "field 'name' is null" in failed["error"]["message"]
    assert "--null-as-empty" in failed["error"]["message"]
    assert _run(sim, str(src), "-o", str(out), "--prompt", "Hi {name}!", "--null-as-empty",
                "--overwrite") == 0  # fmt: skip
    answers = sorted(json.loads(line)["response"] for line in out.read_text().splitlines())
    assert answers == ["echo: Hi !", "echo: Hi Ada!"]


def test_csv_delimiter_flag_and_detection(tmp_path: Path, sim: Simulator) -> None:
    src = tmp_path / "in.csv"
    src.write_text("name;city\nAda;Paris\n")
    out = tmp_path / "o.jsonl"
    assert _run(sim, str(src), "-o", str(out), "--prompt", "{name} in {city}") == 0
    assert json.loads(out.read_text())["response"] == "echo: Ada in Paris"
    src.write_text("name|note\nAda|a;b\n")
    args = [str(src), "-o", str(out), "--prompt", "{note}", "--overwrite"]
    assert _run(sim, *args, "--csv-delimiter", "pipe") == 0
    assert json.loads(out.read_text())["response"] == "echo: a;b"


def test_unknown_output_extension_is_a_usage_error(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"name": "Ada"}])
    status = _run(sim, str(src), "-o", str(tmp_path / "answers.txt"), "--prompt", "{name}")
    assert status == 2
    err = capsys.readouterr().err
    assert "unknown file extension '.txt'; known: .jsonl" in err and ".gz or .zst" in err
    assert sim.counters()["requests"] == 0
    gz = tmp_path / "answers.jsonl.gz"
    assert _run(sim, str(src), "-o", str(gz), "--prompt", "{name}") == 0
    assert json.loads(gzip.decompress(gz.read_bytes()))["response"] == "echo: Ada"


def test_trace_otlp_without_a_collector_is_refused_before_the_job(
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    src = _jsonl(tmp_path / "in.jsonl", [{"name": "Ada"}])
    status = _run(sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt", "{name}",
                  "--trace", "otlp")  # fmt: skip
    assert status == 2
    assert "trace 'otlp' needs a collector: set OTEL_EXPORTER_OTLP_ENDPOINT" in (
        capsys.readouterr().err
    )
    assert sim.counters()["requests"] == 0


def test_trace_otlp_exports_to_the_standard_endpoint(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import http.server
    import threading

    received: list[str] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TIMEOUT", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", raising=False)
        src = _jsonl(tmp_path / "in.jsonl", [{"name": "Ada"}])
        status = _run(sim, str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt", "{name}",
                      "--trace", "otlp")  # fmt: skip
        assert status == 0
        assert received and set(received) == {"/v1/traces"}
    finally:
        server.shutdown()
        server.server_close()
