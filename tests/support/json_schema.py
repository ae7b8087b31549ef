"""A small JSON Schema checker for the structured-output tests (jsonschema is not a dependency):
the keywords those tests use: type, enum, const, properties, required, additionalProperties,
items, minItems, maxItems, minimum, maximum, minLength, maxLength. Unknown keywords fail loudly,
so a test cannot pass on a schema this checker does not understand."""

from __future__ import annotations

from typing import Any

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
KNOWN = {"type", "enum", "const", "properties", "required", "additionalProperties", "items",
         "minItems", "maxItems", "minimum", "maximum", "minLength", "maxLength", "title",
         "description"}


def problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema``; empty when it is valid."""
    unknown = set(schema) - KNOWN
    assert not unknown, f"the test checker does not know {sorted(unknown)}"
    found: list[str] = []
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is not None:
        ok = isinstance(value, TYPES[kind])
    else:
        ok = True
    if not ok:
        return [f"{path}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{path}: missing {name}" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in properties:
                found += problems(item, properties[name], f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}: unexpected {name}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            found.append(f"{path}: {len(value)} items is out of range")
        for index, item in enumerate(value):
            found += problems(item, schema.get("items", {}), f"{path}[{index}]")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            found.append(f"{path}: {value} is out of range")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            found.append(f"{path}: length {len(value)} is out of range")
    return found
