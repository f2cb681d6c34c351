"""Run ``python -m pipeline`` in a child process and report what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from pipeline.cli._main import main

code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def probe_cli(argv: list[str]) -> dict[str, Any]:
    """Run the CLI with ``argv`` in a child; return its exit code and its loaded modules.

    The child must exit 0 (its stderr is the assertion's message otherwise).
    """
    child = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    found: dict[str, Any] = json.loads(child.stdout.splitlines()[-1])
    return found
