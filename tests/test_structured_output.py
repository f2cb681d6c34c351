"""Structured output is asked of the provider (JSON mode, a JSON schema, a forced tool), and the
simulator answers it as the providers do: an object valid against the requested schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import openai
import pydantic
import pytest
from sim_thread import ThreadSim

from pipeline import Pipeline
from pipeline.testing._sim import SimConfig, Simulator, serve
from pipeline.testing._sim._schema import example_for
from stages import LLMCaller, Output

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


class Ticket(pydantic.BaseModel):
    """A support ticket."""

    title: str
    priority: int = pydantic.Field(ge=1, le=5)
    tags: list[str]
    kind: str = pydantic.Field(json_schema_extra={"enum": ["bug", "question"]})


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with ThreadSim(SimConfig()) as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_openai_sdk_gets_an_object_valid_against_its_json_schema(sim: Simulator) -> None:
    client = openai.OpenAI(base_url=sim.url, api_key="sk-test", max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Ada Lovelace, 36"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    import json

    content = answer.choices[0].message.content
    assert content is not None
    value = json.loads(content)
    jsonschema.validate(value, PERSON)
    assert value == {"name": "Ada Lovelace, 36", "age": 0}  # deterministic
    parsed = client.beta.chat.completions.parse(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "the printer is on fire"}],
        response_format=Ticket,
    )
    ticket = parsed.choices[0].message.parsed
    assert ticket is not None and 1 <= ticket.priority <= 5 and ticket.kind == "bug"


def test_the_anthropic_sdk_gets_its_forced_tool_called_with_valid_input(sim: Simulator) -> None:
    client = anthropic.Anthropic(
        base_url=sim.url.removesuffix("/v1"), api_key="sk-ant-test", max_retries=0
    )
    message = client.messages.create(
        model="claude-3-5-haiku",
        max_tokens=200,
        messages=[{"role": "user", "content": "Grace Hopper"}],
        tools=[{"name": "person", "description": "a person", "input_schema": PERSON}],
        tool_choice={"type": "tool", "name": "person"},
    )
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.name == "person"
    jsonschema.validate(block.input, PERSON)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.anyio
async def test_the_caller_asks_for_the_schema_and_gets_it_first_time(
    provider: Any, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    async with serve() as sim:
        caller = LLMCaller(
            model="m",
            prompt="Describe {name}",
            base_url=sim.url,
            provider=provider,
            output=Output(schema=PERSON, reask=0, stream=stream),
        )
        async with Pipeline([{"name": "Ada"}], caller).open() as results:
            rows = [row async for row in results]
        counters = sim.counters()
    assert rows[0]["response"] == {"name": "Describe Ada", "age": 0}
    assert counters["requests"] == 1  # valid the first time: no re-ask


def test_what_the_caller_adds_to_the_request() -> None:
    openai_caller = LLMCaller(model="m", prompt="{x}", output=Output(schema=Ticket))
    fmt = openai_caller.params["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Ticket"
    assert fmt["json_schema"]["schema"] == Ticket.model_json_schema()
    json_mode = LLMCaller(model="m", prompt="Answer in JSON: {x}", output=Output(json_output=True))
    assert json_mode.params["response_format"] == {"type": "json_object"}
    # OpenAI refuses JSON mode unless the messages say "JSON": not asked then
    assert (
        "response_format"
        not in LLMCaller(model="m", prompt="{x}", output=Output(json_output=True)).params
    )
    mine = {"type": "json_object"}
    kept = LLMCaller(
        model="m", prompt="{x}", params={"response_format": mine}, output=Output(schema=PERSON)
    )
    assert kept.params["response_format"] == mine
    claude = LLMCaller(model="m", provider="anthropic", output=Output(schema=PERSON))
    assert claude.params["tool_choice"] == {"type": "tool", "name": "answer"}
    assert claude.params["tools"][0]["input_schema"] == PERSON
    assert "response_format" not in LLMCaller(model="m", prompt="{x}").params


@pytest.mark.parametrize(
    "schema",
    [
        PERSON,
        Ticket.model_json_schema(),
        {"type": "array", "items": {"type": "number", "minimum": 2.5}, "minItems": 2},
        {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 40}]},
        {"type": ["integer", "null"], "exclusiveMinimum": 3, "multipleOf": 5},
        {"allOf": [{"properties": {"a": {"const": 1}}}, {"required": ["b"]}]},
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}},
        {"type": "boolean"},
    ],
)
def test_the_simulators_examples_are_valid_against_their_schema(schema: Any) -> None:
    value = example_for(schema, "some prompt text")
    jsonschema.validate(value, schema)
    assert example_for(schema, "some prompt text") == value
