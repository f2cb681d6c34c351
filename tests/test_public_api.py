"""The public surface is explicit: sorted ``__all__``, every name importable, nothing private."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["pipeline", "stages"])
def test_all_is_sorted_and_complete(package: str) -> None:
    module = importlib.import_module(package)
    names = module.__all__
    assert names == sorted(names)
    for name in names:
        assert not name.startswith("_")
        assert hasattr(module, name), name
    public = {n for n in vars(module) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(module, n)).__name__ == "module"}
    assert public - submodules == set(names)
