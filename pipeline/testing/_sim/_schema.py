"""A deterministic JSON value valid against a requested JSON schema (structured output).

When a request asks for structured output (OpenAI ``response_format`` of type ``json_schema``,
Anthropic a forced tool's ``input_schema``) the simulator answers :func:`example_for` the schema:
every property of an object (required or not), strings from the prompt's text (cut to
``maxLength``, padded to ``minLength``), numbers at ``minimum`` (or 0 within the bounds), the
first of an ``enum``, ``const``, the first branch of ``anyOf``/``oneOf``, ``allOf`` merged,
``$ref`` to ``#/$defs/...`` or ``#/definitions/...`` (what pydantic writes), arrays of
``minItems`` items (at least one). Keywords outside that subset (``pattern``, ``format``) are
not honoured: the tests that need them can say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["example_for", "structured_schema"]

_MAX_DEPTH = 32


def structured_schema(req: Mapping[str, Any], *, anthropic: bool) -> tuple[str, Any] | None:
    """Return ``(name, schema)`` of the structured output a request asks for, if any.

    OpenAI: ``response_format: {"type": "json_schema", "json_schema": {"name", "schema"}}``.
    Anthropic: a ``tool_choice`` of ``{"type": "tool", "name": ...}`` (or ``"any"`` with one
    tool) whose tool has an ``input_schema``.
    """
    if not anthropic:
        fmt = req.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if isinstance(spec, Mapping) and isinstance(spec.get("schema"), Mapping):
                return str(spec.get("name") or "answer"), spec["schema"]
        return None
    tools = req.get("tools")
    choice = req.get("tool_choice")
    if not isinstance(tools, list) or not isinstance(choice, Mapping):
        return None
    wanted = choice.get("name") if choice.get("type") == "tool" else None
    if choice.get("type") == "any" and len(tools) == 1 and isinstance(tools[0], Mapping):
        wanted = tools[0].get("name")
    for tool in tools:
        if isinstance(tool, Mapping) and tool.get("name") == wanted:
            schema = tool.get("input_schema")
            return (str(wanted), schema) if isinstance(schema, Mapping) else None
    return None


def example_for(schema: Any, text: str) -> Any:
    """Return a deterministic value valid against ``schema``, its strings taken from ``text``."""
    return _Example(schema, text).value(schema, 0)


class _Example:
    def __init__(self, root: Any, text: str) -> None:
        self.root = root
        self.text = text

    def resolve(self, ref: str) -> Any:
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/") if ref.startswith("#/") else []:
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
        return node

    def value(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
            return None if depth > _MAX_DEPTH else self.text
        if isinstance(schema.get("$ref"), str):
            return self.value(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.value(schema[key][0], depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                part = (
                    self.resolve(part["$ref"])
                    if isinstance(part, Mapping) and "$ref" in part
                    else part
                )
                if isinstance(part, Mapping):
                    merged = _merge(merged, part)
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value(_merge(merged, rest), depth + 1)
        kind = _kind(schema)
        if kind == "object":
            return self.obj(schema, depth)
        if kind == "array":
            count = max(1, int(schema.get("minItems", 1)))
            items = schema.get("items", {})
            return [self.value(items, depth + 1) for _ in range(count)]
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.string(schema)

    def obj(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        out: dict[str, Any] = {}
        if isinstance(properties, Mapping):
            for name, sub in properties.items():
                out[str(name)] = self.value(sub, depth + 1)
        for name in schema.get("required", ()) or ():
            out.setdefault(str(name), self.text)
        return out

    def string(self, schema: Mapping[str, Any]) -> str:
        text = self.text
        longest = schema.get("maxLength")
        if isinstance(longest, int):
            text = text[:longest]
        shortest = schema.get("minLength")
        if isinstance(shortest, int) and len(text) < shortest:
            text += "x" * (shortest - len(text))
        return text


def _kind(schema: Mapping[str, Any]) -> str:
    declared = schema.get("type")
    if isinstance(declared, list):
        kinds = [k for k in declared if k != "null"] or ["null"]
        declared = kinds[0]
    if isinstance(declared, str):
        return declared
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    low = schema.get("minimum")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        low = schema["exclusiveMinimum"] + (1 if integer else 0.5)
    high = schema.get("maximum")
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        high = schema["exclusiveMaximum"] - (1 if integer else 0.5)
    value: float = 0
    if isinstance(low, (int, float)) and value < low:
        value = low
    if isinstance(high, (int, float)) and value > high:
        value = high
    step = schema.get("multipleOf")
    if isinstance(step, (int, float)) and step > 0:
        value = math.ceil(value / step) * step
    return math.ceil(value) if integer else value


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if key == "properties" and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        elif key == "required" and isinstance(out.get(key), list):
            out[key] = [*out[key], *value]
        else:
            out[key] = value
    return out
