"""The docs' code blocks and the examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def doc_blocks() -> list[tuple[str, str]]:
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for i, code in enumerate(BLOCK.findall(page.read_text())):
            if "# docs: not runnable" not in code:
                found.append((f"{page.name}#{i}", code))
    return found


@pytest.mark.parametrize(("where", "code"), doc_blocks(), ids=[w for w, _ in doc_blocks()])
def test_doc_snippet_runs(where: str, code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr}"


def test_pure_pipeline_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / "pure_pipeline.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Hello, Alice!" in done.stdout
    assert "dead letter: item 5 'Error'" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("Hello")]
    assert lines == [f"Hello, {n}!" for n in ["Alice", "Bob", "Charlie", "Dave", "Emma"]]


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), "add these pages to README.md's documentation table"
    assert linked - pages == set(), "README.md links pages that do not exist"
