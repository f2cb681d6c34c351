"""check_fields: a configuration dataclass checked against its own type hints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import pytest

from pipeline._config import check_fields, check_value
from pipeline._errors import ConfigError


@dataclasses.dataclass
class Knobs:
    rate: float = 1.0
    count: int = 1
    name: str = "n"
    on: bool = False
    mode: Literal["a", "b"] = "a"
    limit: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rate": "fast"}, "Knobs.rate must be a number, got str"),
        ({"rate": True}, "Knobs.rate must be a number, got bool"),
        ({"rate": math.nan}, "Knobs.rate must be a finite number, got nan"),
        ({"count": 1.5}, "Knobs.count must be an integer, got float"),
        ({"count": False}, "Knobs.count must be an integer, got bool"),
        ({"name": 3}, "Knobs.name must be a string, got int"),
        ({"on": "yes"}, "Knobs.on must be true or false, got 'yes'"),
        ({"mode": "c"}, "Knobs.mode must be one of 'a', 'b', got 'c'"),
        ({"name": None}, "Knobs.name cannot be null"),
        ({"extra": [1]}, "Knobs.extra must be a table, got list"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_field(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Knobs(**given)
    assert str(caught.value) == message


def test_values_are_normalised_to_their_annotation(tmp_path: Path) -> None:
    knobs = Knobs(rate=2, name=tmp_path, limit=None, extra={1: "x"})  # type: ignore[arg-type]
    assert knobs.rate == 2.0 and isinstance(knobs.rate, float)
    assert knobs.name == str(tmp_path)
    assert knobs.limit is None
    assert knobs.extra == {"1": "x"}


def test_a_label_and_field_checkers_shape_the_message() -> None:
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        size: int = 1
        tags: dict[str, Any] = dataclasses.field(default_factory=dict)

        def __post_init__(self) -> None:
            check_fields(
                self, label=lambda name: f"setting {name!r}", checkers={"tags": self._tags}
            )

        @staticmethod
        def _tags(value: dict[str, Any]) -> dict[str, Any]:
            if not all(isinstance(v, str) for v in value.values()):
                raise ConfigError("every tag must be a string")
            return value

    with pytest.raises(ConfigError, match=r"^setting 'size' must be an integer, got str$"):
        Frozen(size="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="every tag must be a string"):
        Frozen(tags={"a": 1})
    assert Frozen(size=3, tags={"a": "b"}).size == 3  # frozen instances are checked too


def test_an_annotation_without_a_check_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="no check for thing"):
        check_value("thing", (1, 2), tuple[int, int])
