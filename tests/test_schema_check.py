"""The daemon's schema check agrees with msgspec: a payload passes it exactly when the run
process could decode it into the task's type."""

from __future__ import annotations

import enum
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ember.daemon.engine.payloads import check_payload


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Line(msgspec.Struct):
    sku: str
    qty: int
    note: str | None = None


class Order(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    lines: list[Line]
    colour: Colour = Colour.RED
    kind: Literal["a", "b"] = "a"


class Node(msgspec.Struct):
    id: int
    children: list[Node] = []


TYPES: list[Any] = [
    int,
    float,
    str,
    bool,
    None,
    list[int],
    dict[str, int],
    tuple[int, str],
    int | str,
    Line,
    Order,
    list[Order],
    Node,  # recursive: its schema refers to itself
    Annotated[int, msgspec.Meta(ge=1, le=10)],
    Annotated[str, msgspec.Meta(pattern="^[a-z]+$", max_length=3)],
]
# Hypothesis ignores msgspec's constraints when it builds values: only the plain types.
BUILDABLE = [tp for tp in TYPES if getattr(tp, "__metadata__", None) is None and tp is not Node]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["red", "blue", "a", "b", "x", ""])
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["id", "lines", "sku", "qty", "note", "colour", "kind", "children", "extra"]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


def decodes(tp: Any, data: bytes) -> bool:
    try:
        msgspec.json.decode(data, type=tp)
    except msgspec.ValidationError:
        return False
    return True


@pytest.mark.parametrize("tp", TYPES, ids=repr)
@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_agrees_with_msgspec_decoding(tp: Any, value: Any) -> None:
    schema = msgspec.json.schema(tp)
    data = json.dumps(value).encode()
    problem = check_payload(schema, data)
    assert (problem is None) == decodes(tp, data), (problem, value)


@pytest.mark.parametrize("tp", BUILDABLE, ids=repr)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_accepts_what_msgspec_encodes(tp: Any, data: st.DataObject) -> None:
    value = data.draw(st.from_type(tp) if tp is not None else st.none())
    payload = msgspec.json.encode(value)
    assume(decodes(tp, payload))  # (inf encodes as null, which no float decodes from)
    assert check_payload(msgspec.json.schema(tp), payload) is None


def test_formats_bounds_and_patterns_name_the_field() -> None:
    class Event(msgspec.Struct):
        at: datetime
        id: uuid.UUID
        count: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
        name: Annotated[str, msgspec.Meta(pattern="^[a-z]+$", max_length=5)] = "x"

    schema = msgspec.json.schema(Event)
    good = {"at": "2026-12-02T10:00:00+00:00", "id": str(uuid.uuid4())}

    def check(**changes: Any) -> str | None:
        return check_payload(schema, json.dumps({**good, **changes}).encode())

    assert check() is None
    # (msgspec's schema of a datetime is a plain string: the run process checks the format.)
    date_time = {"type": "string", "format": "date-time"}
    assert check_payload(date_time, b'"yesterday"') == (
        "at $: expected a date-time string, got 'yesterday'"
    )
    assert check(id="nope") == "at $.id: expected a uuid string, got 'nope'"
    assert check(count=0) == "at $.count: expected a number >= 1, got 0"
    assert check(name="ABC") == "at $.name: expected a string matching '^[a-z]+$', got 'ABC'"
    assert check(name="abcdefg") == "at $.name: expected at most 5 characters, got 7"
    assert check_payload(schema, b"{") is not None  # not JSON at all
