"""Prompt templates are data: fields only, bounded specs, bounded size, checked up front."""

from __future__ import annotations

import pytest

from pipeline import ConfigError, ItemError, MissingFieldError
from stages.llm._template import MAX_WIDTH, PromptTemplate


def test_renders_fields_and_bounded_specs() -> None:
    t = PromptTemplate("Hello {name}, you are {age:>4} ({score:.2f}) {bio:.5}")
    assert t.fields == ("name", "age", "score", "bio")
    row = {"name": "Ada", "age": 36, "score": 0.987, "bio": "mathematician"}
    assert t.render(row) == "Hello Ada, you are   36 (0.99) mathe"


def test_a_value_that_is_not_a_mapping_is_value() -> None:
    assert PromptTemplate("Say {value}").render("hi") == "Say hi"


def test_doubled_braces_are_literal() -> None:
    assert PromptTemplate('Answer as {{"k": {name}}}').render({"name": 1}) == 'Answer as {"k": 1}'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{name.__class__.__mro__}", "reaches into a value"),
        ("{name.__class__.__base__.__subclasses__}", "reaches into a value"),
        ("{name[0]}", "reaches into a value"),
        ("{0}", "positional field"),
        ("{}", "positional field"),
        ("{name!r}", "conversion"),
        ("{name!z}", "conversion"),
        ("{name:>1000000000}", "width of 1000000000"),
        ("{name:.999999999}", "precision of 999999999"),
        ("{name:{width}}", "nested field"),
        ("{name:zzz}", "is not a format spec"),
        ("{name", "malformed"),
        ("}", "malformed"),
    ],
)
def test_known_escapes_and_bombs_are_refused_when_the_template_is_made(
    text: str, words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        PromptTemplate(text)


def test_width_limit_is_inclusive() -> None:
    assert len(PromptTemplate(f"{{x:>{MAX_WIDTH}}}").render({"x": "a"})) == MAX_WIDTH


def test_missing_field_names_the_field_and_what_the_row_has() -> None:
    with pytest.raises(MissingFieldError, match=r"missing field 'nmae' \(record has: age, name\)"):
        PromptTemplate("{nmae}").render({"name": "Ada", "age": 3})


def test_null_is_an_error_by_default_and_empty_on_request() -> None:
    with pytest.raises(ItemError, match="field 'name' is null"):
        PromptTemplate("Hi {name}").render({"name": None})
    assert PromptTemplate("Hi {name}!", null="empty").render({"name": None}) == "Hi !"


def test_a_value_that_does_not_fit_its_spec_is_that_rows_error() -> None:
    with pytest.raises(ItemError, match=r"field 'name' = 'Ada' does not fit the format spec 'd'"):
        PromptTemplate("{name:d}").render({"name": "Ada"})


def test_rendered_size_is_bounded_per_row() -> None:
    t = PromptTemplate("{text}", max_chars=100)
    assert t.render({"text": "x" * 100}) == "x" * 100
    with pytest.raises(ItemError, match="over 100 characters"):
        t.render({"text": "x" * 101})


def test_check_against_columns_suggests_the_close_name() -> None:
    t = PromptTemplate("Hello {nmae}")
    with pytest.raises(ConfigError) as info:
        t.check(["name", "age"])
    message = str(info.value)
    assert "did you mean {name}?" in message
    assert "available fields: name, age" in message


def test_check_against_a_first_row_finds_a_spec_that_cannot_fit() -> None:
    t = PromptTemplate("{name:d}")
    with pytest.raises(ConfigError, match="does not fit"):
        t.check({"name": "Ada"})
    PromptTemplate("{n:d}").check({"n": 3})


def test_check_passes_when_every_field_is_there() -> None:
    PromptTemplate("{a} {b}").check({"a": 1, "b": None, "c": 2})


# -- in the caller ---------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_callers_first_row_is_checked_before_any_request() -> None:
    import anyio

    from pipeline import FatalError, Pipeline
    from pipeline.testing._sim import serve
    from stages import LLMCaller

    async with serve() as sim:
        caller = LLMCaller(model="m", prompt="Hello {nmae}", base_url=sim.url)
        with anyio.fail_after(10), pytest.raises(FatalError) as info:
            await Pipeline([{"name": "Ada", "age": 3}, {"name": "Bo"}], caller).run()
        assert sim.counters()["requests"] == 0
    assert "did you mean {name}?" in str(info.value)
    assert "(available fields: name, age)" in str(info.value)


@pytest.mark.anyio
async def test_the_caller_dead_letters_null_fields_unless_told_to_render_them_empty() -> None:
    import anyio

    from pipeline import Pipeline
    from pipeline.testing._sim import serve
    from stages import LLMCaller

    rows = [{"name": "Ada"}, {"name": None}]
    async with serve() as sim:
        with anyio.fail_after(10):
            report = await Pipeline(
                rows, LLMCaller(model="m", prompt="Hi {name}", base_url=sim.url)
            ).run()
            (failed,) = report.failures
            assert "field 'name' is null" in failed.message
            out = []
            caller = LLMCaller(
                model="m", prompt=PromptTemplate("Hi {name}", null="empty"), base_url=sim.url
            )
            async with Pipeline(rows, caller, ordered=True).open() as results:
                out = [row["response"] async for row in results]
    assert out == ["echo: Hi Ada", "echo: Hi "]
