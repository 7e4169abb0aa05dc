"""Structured outputs, the pure rules: JSON paths, and what OpenAI's strict `json_schema` mode accepts.

Validating a value against a schema is the `jsonschema` library's job (`app/runs/structured.py`);
this module only names places and checks a schema's shape, with the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

_PLAIN_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keywords whose value is a list of subschemas, and those whose value is a map of them.
_SCHEMA_LISTS: Final = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAPS: Final = ("properties", "$defs", "definitions", "patternProperties")


def json_path(parts: Iterable[str | int], root: str = "$") -> str:
    """A JSON path from keys and indexes: `["a", 0, "b c"]` → `$.a[0]['b c']`."""
    path = root
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            path += f".{part}"
        else:
            path += "[" + repr(part) + "]"
    return path


def strict_schema_problems(schema: dict[str, Any], root: str = "$") -> list[tuple[str, str]]:
    """Where `schema` (found at JSON path `root`) breaks OpenAI's strict mode: (path, what is wrong).

    Strict mode wants an object at the root, and every object schema to list all its properties
    in `required` and to set `additionalProperties: false` (the model then always answers in full).
    """
    problems: list[tuple[str, str]] = []
    if schema.get("type") != "object":
        problems.append((root, 'the root of a structured output must be an object schema ("type": "object")'))
    _walk(schema, root, [], problems)
    return problems


def _walk(schema: Any, root: str, where: list[str | int], problems: list[tuple[str, str]]) -> None:
    if not isinstance(schema, dict):
        return
    path = json_path(where, root)
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            problems.append((path, 'strict mode needs "additionalProperties": false on every object'))
        names = list(properties) if isinstance(properties, dict) else []
        missing = [name for name in names if name not in (schema.get("required") or [])]
        if missing:
            problems.append(
                (path, f'strict mode needs every property in "required"; missing: {", ".join(missing)}')
            )
    for keyword in _SCHEMA_MAPS:
        children = schema.get(keyword)
        if isinstance(children, dict):
            for name, child in children.items():
                _walk(child, root, [*where, keyword, name], problems)
    for keyword in _SCHEMA_LISTS:
        children = schema.get(keyword)
        if isinstance(children, list):
            for index, child in enumerate(children):
                _walk(child, root, [*where, keyword, index], problems)
    if isinstance(schema.get("items"), dict):
        _walk(schema["items"], root, [*where, "items"], problems)
