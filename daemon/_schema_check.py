"""Check a payload against the JSON Schema a task's index carries, before a run is accepted.

The schemas come from msgspec (``msgspec.json.schema``) or pydantic (``model_json_schema``),
so this covers what those two emit (draft 2020-12): ``$ref`` into ``$defs``, ``type``,
``enum``/``const``, object ``properties``/``required``/``additionalProperties``, array
``items``/``prefixItems``, string and number bounds, ``pattern``, the ``date-time``, ``date``,
``time``, ``uuid`` and ``duration`` formats, ``anyOf``/``oneOf``/``allOf``. A keyword it does
not know is ignored: the run process decodes the payload with the task's own type anyway.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

# JSON Schema's names of the JSON types, for messages.
_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}
_DURATION = re.compile(
    r"^-?P(?!$)(\d+(\.\d+)?Y)?(\d+(\.\d+)?M)?(\d+(\.\d+)?W)?(\d+(\.\d+)?D)?"
    r"(T(?=\d)(\d+(\.\d+)?H)?(\d+(\.\d+)?M)?(\d+(\.\d+)?S)?)?$"
)


def _iso(parse: Callable[[str], object]) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        try:
            parse(text)
        except ValueError:
            return False
        return True

    return check


def _base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


_FORMATS: dict[str, Callable[[str], bool]] = {
    "date-time": _iso(dt.datetime.fromisoformat),
    "date": _iso(dt.date.fromisoformat),
    "time": _iso(dt.time.fromisoformat),
    "uuid": _iso(uuid.UUID),
    "duration": lambda text: _DURATION.match(text) is not None,
}


class SchemaMismatch(Exception):
    """A value does not match its schema; ``path`` is where, as ``$.items[0].qty``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"at {path}: {problem}")
        self.path = path
        self.problem = problem


def check_payload(schema: dict[str, Any], payload: bytes) -> str | None:
    """None when the JSON ``payload`` matches ``schema``, else what is wrong and where."""
    try:
        value = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        return f"is not valid JSON: {exc}"
    try:
        _Checker(schema).check(schema, value, "$")
    except SchemaMismatch as exc:
        return str(exc)
    return None


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    if name == "null":
        return value is None
    return True  # an unknown type name constrains nothing


class _Checker:
    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            return {}  # remote references: left to the run process
        node: Any = self._root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def check(self, schema: Any, value: Any, path: str) -> None:
        if schema is True or not isinstance(schema, dict):
            return
        if "$ref" in schema:
            self.check(self._resolve(schema["$ref"]), value, path)
        kinds = schema.get("type")
        if kinds is not None:
            names = [kinds] if isinstance(kinds, str) else list(kinds)
            if not any(_is_type(value, name) for name in names):
                expected = " or ".join(names)
                raise SchemaMismatch(path, f"expected {expected}, got {_type_name(value)}")
        if "const" in schema and value != schema["const"]:
            raise SchemaMismatch(path, f"expected {schema['const']!r}, got {value!r}")
        if "enum" in schema and value not in schema["enum"]:
            choices = ", ".join(repr(v) for v in schema["enum"][:20])
            raise SchemaMismatch(path, f"expected one of {choices}, got {value!r}")
        for sub in schema.get("allOf", ()):
            self.check(sub, value, path)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                self._any_of(schema[key], value, path)
        if isinstance(value, dict):
            self._object(schema, value, path)
        elif isinstance(value, list):
            self._array(schema, value, path)
        elif isinstance(value, str):
            self._string(schema, value, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self._number(schema, value, path)

    def _any_of(self, options: list[Any], value: Any, path: str) -> None:
        first: SchemaMismatch | None = None
        for option in options:
            try:
                self.check(option, value, path)
            except SchemaMismatch as exc:
                # The deepest complaint says most about what the sender meant.
                if first is None or len(exc.path) > len(first.path):
                    first = exc
                continue
            return
        if first is not None:
            raise first

    def _object(self, schema: dict[str, Any], value: dict[str, Any], path: str) -> None:
        properties: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise SchemaMismatch(path, f"object is missing the required field {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            where = f"{path}.{name}"
            if name in properties:
                self.check(properties[name], item, where)
            elif extra is False:
                raise SchemaMismatch(where, f"unknown field {name!r}")
            elif isinstance(extra, dict):
                self.check(extra, item, where)
        low, high = schema.get("minProperties"), schema.get("maxProperties")
        if low is not None and len(value) < low:
            raise SchemaMismatch(path, f"expected at least {low} fields, got {len(value)}")
        if high is not None and len(value) > high:
            raise SchemaMismatch(path, f"expected at most {high} fields, got {len(value)}")

    def _array(self, schema: dict[str, Any], value: list[Any], path: str) -> None:
        prefix: list[Any] = schema.get("prefixItems", [])
        for index, (sub, item) in enumerate(zip(prefix, value, strict=False)):
            self.check(sub, item, f"{path}[{index}]")
        rest = schema.get("items")
        if rest is False and len(value) > len(prefix):
            raise SchemaMismatch(path, f"expected at most {len(prefix)} items, got {len(value)}")
        if isinstance(rest, dict):
            for index in range(len(prefix), len(value)):
                self.check(rest, value[index], f"{path}[{index}]")
        low, high = schema.get("minItems"), schema.get("maxItems")
        if low is not None and len(value) < low:
            raise SchemaMismatch(path, f"expected at least {low} items, got {len(value)}")
        if high is not None and len(value) > high:
            raise SchemaMismatch(path, f"expected at most {high} items, got {len(value)}")

    def _string(self, schema: dict[str, Any], value: str, path: str) -> None:
        low, high = schema.get("minLength"), schema.get("maxLength")
        if low is not None and len(value) < low:
            raise SchemaMismatch(path, f"expected at least {low} characters, got {len(value)}")
        if high is not None and len(value) > high:
            raise SchemaMismatch(path, f"expected at most {high} characters, got {len(value)}")
        pattern = schema.get("pattern")
        if pattern is not None and re.search(pattern, value) is None:
            raise SchemaMismatch(path, f"expected a string matching {pattern!r}, got {value!r}")
        fmt = schema.get("format")
        check = _FORMATS.get(fmt) if isinstance(fmt, str) else None
        if check is not None and not check(value):
            raise SchemaMismatch(path, f"expected a {fmt} string, got {value!r}")
        if schema.get("contentEncoding") == "base64" and not _base64(value):
            raise SchemaMismatch(path, "expected base64-encoded bytes")

    def _number(self, schema: dict[str, Any], value: float, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaMismatch(path, f"expected a finite number, got {value}")
        bounds: list[tuple[str, Callable[[float, float], bool], str]] = [
            ("minimum", lambda v, b: v >= b, ">="),
            ("maximum", lambda v, b: v <= b, "<="),
            ("exclusiveMinimum", lambda v, b: v > b, ">"),
            ("exclusiveMaximum", lambda v, b: v < b, "<"),
        ]
        for key, holds, sign in bounds:
            bound = schema.get(key)
            if (
                isinstance(bound, int | float)
                and not isinstance(bound, bool)
                and not holds(value, bound)
            ):
                raise SchemaMismatch(path, f"expected a number {sign} {bound}, got {value}")
        step = schema.get("multipleOf")
        if step and (value / step) != int(value / step):
            raise SchemaMismatch(path, f"expected a multiple of {step}, got {value}")
