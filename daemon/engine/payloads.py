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


# A failed check: the path below the checked value (innermost segment last), and the problem.
Failure = tuple[list[str], str]
Validator = Callable[[Any], Failure | None]

# The Python types msgspec.json.decode gives for each JSON Schema type.
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "null": (type(None),),
}
# Compiled validators by schema object (kept with it, so the id is never reused meanwhile).
_CACHE: dict[int, tuple[dict[str, Any], Validator]] = {}
_CACHE_MAX = 4096


def check_payload(schema: dict[str, Any], payload: bytes) -> str | None:
    """None when the JSON ``payload`` matches ``schema``, else what is wrong and where."""
    try:
        value = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        return f"is not valid JSON: {exc}"
    failure = validator_for(schema)(value)
    if failure is None:
        return None
    segments, problem = failure
    return f"at ${''.join(reversed(segments))}: {problem}"


def validator_for(schema: dict[str, Any]) -> Validator:
    """The compiled check of ``schema`` (compiled once per schema object)."""
    cached = _CACHE.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    validator = _Compiler(schema).compile(schema)
    _CACHE[id(schema)] = (schema, validator)
    return validator


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _all(checks: list[Validator]) -> Validator:
    if not checks:
        return lambda value: None
    if len(checks) == 1:
        return checks[0]

    def check(value: Any) -> Failure | None:
        for one in checks:
            failure = one(value)
            if failure is not None:
                return failure
        return None

    return check


class _Compiler:
    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._refs: dict[str, Validator] = {}

    def _ref(self, ref: str) -> Validator:
        if ref not in self._refs:
            # Placeholder first: a recursive type refers to itself.
            compiled: list[Validator] = []
            self._refs[ref] = lambda value: compiled[0](value)
            compiled.append(self.compile(self._resolve(ref)))
        return self._refs[ref]

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            return {}  # remote references: left to the run process
        node: Any = self._root
        for part in ref.lstrip("#").strip("/").split("/"):
            if part:
                part = part.replace("~1", "/").replace("~0", "~")
                node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def compile(self, schema: Any) -> Validator:
        if not isinstance(schema, dict):
            return lambda value: None  # true, or a form this check does not know
        checks: list[Validator] = []
        if "$ref" in schema:
            checks.append(self._ref(schema["$ref"]))
        if "type" in schema:
            checks.append(_type_check(schema["type"]))
        if "const" in schema:
            const = schema["const"]
            checks.append(lambda v: None if v == const else ([], f"expected {const!r}, got {v!r}"))
        if "enum" in schema:
            choices = list(schema["enum"])
            shown = ", ".join(repr(v) for v in choices[:20])
            checks.append(
                lambda v: None if v in choices else ([], f"expected one of {shown}, got {v!r}")
            )
        checks.extend(self.compile(sub) for sub in schema.get("allOf", ()))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                checks.append(_any_of([self.compile(sub) for sub in schema[key]]))
        by_type: dict[type, Validator] = {}
        obj, arr = self._object(schema), self._array(schema)
        text, number = _string(schema), _number(schema)
        if obj is not None:
            by_type[dict] = obj
        if arr is not None:
            by_type[list] = arr
        if text is not None:
            by_type[str] = text
        if number is not None:
            by_type[int] = by_type[float] = number
        if by_type:
            checks.append(lambda v: (by_type.get(type(v)) or _ok)(v))
        return _all(checks)

    def _object(self, schema: dict[str, Any]) -> Validator | None:
        keys = ("properties", "required", "additionalProperties", "minProperties")
        if not any(k in schema for k in (*keys, "maxProperties")):
            return None
        properties = {name: self.compile(sub) for name, sub in schema.get("properties", {}).items()}
        required = list(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        extra_check = self.compile(extra) if isinstance(extra, dict) else None
        low, high = schema.get("minProperties"), schema.get("maxProperties")

        def check(value: dict[str, Any]) -> Failure | None:
            for name in required:
                if name not in value:
                    return [], f"object is missing the required field {name!r}"
            for name, item in value.items():
                sub = properties.get(name)
                if sub is None:
                    if extra is False:
                        return [f".{name}"], f"unknown field {name!r}"
                    sub = extra_check
                if sub is not None:
                    failure = sub(item)
                    if failure is not None:
                        failure[0].append(f".{name}")
                        return failure
            return _count_failure(len(value), low, high, "fields")

        return check

    def _array(self, schema: dict[str, Any]) -> Validator | None:
        if not any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return None
        prefix = [self.compile(sub) for sub in schema.get("prefixItems", ())]
        rest = schema.get("items")
        rest_check = self.compile(rest) if isinstance(rest, dict) else None
        low, high = schema.get("minItems"), schema.get("maxItems")

        def check(value: list[Any]) -> Failure | None:
            for index, item in enumerate(value):
                if index < len(prefix):
                    sub: Validator | None = prefix[index]
                elif rest is False:
                    return [], f"expected at most {len(prefix)} items, got {len(value)}"
                else:
                    sub = rest_check
                if sub is not None:
                    failure = sub(item)
                    if failure is not None:
                        failure[0].append(f"[{index}]")
                        return failure
            return _count_failure(len(value), low, high, "items")

        return check


def _count_failure(count: int, low: int | None, high: int | None, noun: str) -> Failure | None:
    """Why ``count`` fields or items are outside ``[low, high]``, or None."""
    if low is not None and count < low:
        return [], f"expected at least {low} {noun}, got {count}"
    if high is not None and count > high:
        return [], f"expected at most {high} {noun}, got {count}"
    return None


def _ok(value: Any) -> None:
    return None


def _type_check(kinds: str | list[str]) -> Validator:
    names = [kinds] if isinstance(kinds, str) else list(kinds)
    if any(name not in _PY_TYPES for name in names):
        return _ok  # an unknown type name constrains nothing
    allowed = frozenset(t for name in names for t in _PY_TYPES[name])
    expected = " or ".join(names)

    def check(value: Any) -> Failure | None:
        # Exact types: JSON decodes to exactly these, and True must not pass as an integer.
        if type(value) in allowed:
            return None
        return [], f"expected {expected}, got {_type_name(value)}"

    return check


def _any_of(options: list[Validator]) -> Validator:
    def check(value: Any) -> Failure | None:
        deepest: Failure | None = None
        for option in options:
            failure = option(value)
            if failure is None:
                return None
            # The deepest complaint says most about what the sender meant.
            if deepest is None or len(failure[0]) > len(deepest[0]):
                deepest = failure
        return deepest

    return check


def _string(schema: dict[str, Any]) -> Validator | None:
    low, high = schema.get("minLength"), schema.get("maxLength")
    pattern = schema.get("pattern")
    regex = re.compile(pattern) if isinstance(pattern, str) else None
    fmt = schema.get("format")
    format_check = _FORMATS.get(fmt) if isinstance(fmt, str) else None
    base64_check = schema.get("contentEncoding") == "base64"
    if (low, high, regex, format_check) == (None, None, None, None) and not base64_check:
        return None

    def check(value: str) -> Failure | None:
        if low is not None and len(value) < low:
            return [], f"expected at least {low} characters, got {len(value)}"
        if high is not None and len(value) > high:
            return [], f"expected at most {high} characters, got {len(value)}"
        if regex is not None and regex.search(value) is None:
            return [], f"expected a string matching {pattern!r}, got {value!r}"
        if format_check is not None and not format_check(value):
            return [], f"expected a {fmt} string, got {value!r}"
        if base64_check and not _base64(value):
            return [], "expected base64-encoded bytes"
        return None

    return check


_BOUNDS: list[tuple[str, Callable[[float, float], bool], str]] = [
    ("minimum", lambda v, b: v >= b, ">="),
    ("maximum", lambda v, b: v <= b, "<="),
    ("exclusiveMinimum", lambda v, b: v > b, ">"),
    ("exclusiveMaximum", lambda v, b: v < b, "<"),
]


def _number(schema: dict[str, Any]) -> Validator | None:
    bounds = [
        (schema[key], holds, sign)
        for key, holds, sign in _BOUNDS
        if isinstance(schema.get(key), int | float) and not isinstance(schema.get(key), bool)
    ]
    step = schema.get("multipleOf")
    if not bounds and not step:
        return None

    def check(value: float) -> Failure | None:
        if isinstance(value, float) and not math.isfinite(value):
            return [], f"expected a finite number, got {value}"
        for bound, holds, sign in bounds:
            if not holds(value, bound):
                return [], f"expected a number {sign} {bound}, got {value}"
        if step and (value / step) != int(value / step):
            return [], f"expected a multiple of {step}, got {value}"
        return None

    return check
