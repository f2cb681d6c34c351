"""A pure-Python pipeline: no network, no API key. The tests run this file.

It cleans a list of names, "enriches" them with an async function standing in for an API call,
drops one on purpose, sends a bad one to the dead letter, and prints results as they complete.
Run: python examples/pure_pipeline.py
"""

from __future__ import annotations

import anyio

import pipeline as pl

NAMES = ["alice", " bob ", "", "charlie", "dave", "ERROR", "emma"]


def clean(name: str) -> str:
    return name.strip().title()


async def greet(name: str) -> dict[str, str]:
    await anyio.sleep(0.01)  # stands in for an API call's latency
    if name == "Error":
        raise ValueError(f"cannot greet {name!r}")
    return {"name": name, "greeting": f"Hello, {name}!"}


async def main() -> pl.RunReport:
    pipe = pl.Pipeline(
        pl.map(clean, name="clean"),
        pl.filter(bool, name="non-empty"),
        pl.map(greet, name="greet", workers=4),
        ordered=True,
    )
    async with pipe.open(NAMES) as results:
        async for row in results:
            print(row["greeting"])
    report = results.report
    assert report is not None
    for failed in report.failures:
        print(f"dead letter: item {failed.key} {failed.item!r}: {failed.message}")
    print(report)
    return report


if __name__ == "__main__":
    anyio.run(main)
