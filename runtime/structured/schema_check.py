"""Which JSON-schema constructs structured output enforces, and refusing the rest by name.

What it is for: `check_schema(schema)`, which walks a JSON schema and raises
`StructuredOutputError` naming the first keyword (and its location, as a JSON
pointer) that the grammar compiler would not enforce, so a request is never
answered with output that silently ignores part of its schema. The allowed
keywords are those whose enforcement the tests check by validating sampled
outputs with `jsonschema`; annotations (title, description, ...) are allowed
because they constrain nothing.
Not for: compiling (grammars.py).
"""
from __future__ import annotations

from typing import Any

from runtime.errors import FieldError

FIELD = "guided_decoding.spec"
MAX_DEPTH = 32
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly"})
# formats whose sampled outputs were checked against Python's parsers; xgrammar 0.2.8's ipv4 lets leading zeros
# through (010.1.2.3), and email / hostname / uri were not verified, so they are refused
FORMATS = frozenset({"date", "time", "date-time", "uuid", "ipv6"})
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems")


class StructuredOutputError(FieldError):
    """A guide cannot be enforced: bad JSON, an unsupported construct, or a grammar that does not compile."""


def check_schema(schema: object, pointer: str = "#", depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise StructuredOutputError(FIELD, f"schema nests deeper than {MAX_DEPTH} levels at {pointer}")
    if isinstance(schema, bool):
        if not schema:
            raise StructuredOutputError(FIELD, f"the schema 'false' at {pointer} accepts nothing")
        return
    if not isinstance(schema, dict):
        raise StructuredOutputError(FIELD, f"schema at {pointer} must be an object or a boolean")
    for key, value in schema.items():
        where = f"{pointer}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            raise StructuredOutputError(FIELD, f"unsupported JSON schema construct {key!r} at {pointer} "
                                               f"(supported: {', '.join(sorted(ENFORCED))})")
        _check_keyword(key, value, where, depth)


def _check_keyword(key: str, value: Any, where: str, depth: int) -> None:
    if key == "type":
        names = value if isinstance(value, list) else [value]
        bad = [n for n in names if n not in TYPES]
        if bad or not names:
            raise StructuredOutputError(FIELD, f"unsupported type {bad or value!r} at {where}")
    elif key == "format" and value not in FORMATS:
        raise StructuredOutputError(FIELD, f"unsupported JSON schema construct 'format: {value}' at {where} "
                                           f"(supported formats: {', '.join(sorted(FORMATS))})")
    elif key == "$ref":
        if not isinstance(value, str) or not value.startswith("#"):
            raise StructuredOutputError(FIELD, f"unsupported JSON schema construct '$ref: {value}' at {where} "
                                               "(only references inside the schema, '#/...')")
    elif key in _SUBSCHEMA_MAPS:
        if not isinstance(value, dict):
            raise StructuredOutputError(FIELD, f"{where} must be an object of schemas")
        for name, sub in value.items():
            check_schema(sub, f"{where}/{name}", depth + 1)
    elif key in _SUBSCHEMA_LISTS:
        if not isinstance(value, list) or not value:
            raise StructuredOutputError(FIELD, f"{where} must be a non-empty list of schemas")
        for i, sub in enumerate(value):
            check_schema(sub, f"{where}/{i}", depth + 1)
    elif key in ("items", "additionalProperties"):
        check_schema(value, where, depth + 1) if not (isinstance(value, bool) and not value) else None
    elif key == "required":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise StructuredOutputError(FIELD, f"{where} must be a list of property names")
    elif key == "enum":
        if not isinstance(value, list) or not value:
            raise StructuredOutputError(FIELD, f"{where} must be a non-empty list")
