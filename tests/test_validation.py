"""Payload validation on every trigger path, from the schema the task index carries; and
replay with changes (SDK and CLI). A real daemon, real run processes."""

from __future__ import annotations

import asyncio
import json
import re

import msgspec
import pytest
from conftest import Harness
from test_cli import ember

from ember import BadRequest, Call, Runs, RunStatus, Tasks, task
from ember._types import TriggerOptions, TriggerRequest, TriggerResponse

FILES = {
    "tasks/__init__.py": "",
    "tasks/orders.py": """
        import msgspec
        from ember import task

        class Line(msgspec.Struct):
            sku: str
            qty: int

        class Order(msgspec.Struct):
            id: int
            lines: list[Line]

        @task(id="order")
        async def order(o: Order) -> int:
            return sum(line.qty for line in o.lines)

        @task(id="untyped", schema=Order)
        async def untyped(payload) -> int:
            return payload.id
    """,
}

PYDANTIC = {
    "tasks/signup.py": """
        from pydantic import BaseModel, Field
        from ember import task

        class Signup(BaseModel):
            email: str
            age: int = Field(ge=18)

        @task(id="signup")
        async def signup(s: Signup) -> str:
            return s.email
    """,
}

GOOD = {"id": 1, "lines": [{"sku": "a", "qty": 2}]}
BAD = {"id": 1, "lines": [{"sku": "a", "qty": "two"}]}
WHERE = "$.lines[0].qty: expected integer, got string"


class Line(msgspec.Struct):
    sku: str
    qty: int


class Order(msgspec.Struct):
    id: int
    lines: list[Line]


# The same task as the project's, seen from the app that triggers it.
@task(id="order")
async def order(o: Order) -> int:
    return 0


@pytest.fixture
async def h(harness: Harness) -> Harness:
    files = dict(FILES)
    try:
        import pydantic  # noqa: F401

        files.update(PYDANTIC)
    except ImportError:
        pass
    info = await harness.register(files)
    assert info.status == "READY", info.error
    return harness


async def run_count(h: Harness) -> int:
    return len((await Runs(h.client).list(limit=100)).data)


async def test_the_index_carries_the_payload_schema(h: Harness) -> None:
    version = h.daemon.engine.version_list("dev")[0]
    schemas = {t.id: t.payload_schema for t in version.tasks}
    assert schemas["order"] is not None and "Order" in schemas["order"]["$defs"]
    assert schemas["untyped"] == schemas["order"]  # from @task(schema=Order)


async def test_every_trigger_path_refuses_a_bad_payload_with_the_same_400(h: Harness) -> None:
    messages = []
    # Structs do not check types when built: a wrong one reaches the daemon.
    wrong = Order(id=1, lines=[Line(sku="a", qty="two")])  # type: ignore[arg-type]
    with pytest.raises(BadRequest) as sdk:
        await order.trigger(wrong, client=h.client)
    messages.append(sdk.value)
    with pytest.raises(BadRequest) as by_id:
        await Tasks(h.client).trigger("order", BAD)
    messages.append(by_id.value)
    body = msgspec.json.encode(TriggerRequest(payload=msgspec.Raw(json.dumps(BAD).encode())))
    with pytest.raises(BadRequest) as http:
        await h.client.request(
            Call("POST", "/api/v1/tasks/order/trigger", TriggerResponse, body=body)
        )
    messages.append(http.value)
    for error in messages:
        assert error.status == 400
        assert WHERE in error.detail and "'order'" in error.detail
    assert len({e.detail for e in messages}) == 1, "the same refusal on every path"
    cli = await asyncio.to_thread(ember, h, "trigger", "order", "--payload", json.dumps(BAD))
    assert cli.returncode != 0 and WHERE in cli.stderr + cli.stdout
    # A batch is refused whole, naming the item; the good item is not written either.
    with pytest.raises(BadRequest, match=r"items\[1\]\.payload .*" + re.escape(WHERE)):
        await Tasks(h.client).batch_trigger([("order", GOOD), ("order", BAD)])
    assert await run_count(h) == 0
    good = await h.run("order", GOOD)
    assert good.status is RunStatus.COMPLETED and good.output_as(int) == 2


async def test_explicit_schema_validates_an_unannotated_task(h: Harness) -> None:
    with pytest.raises(BadRequest, match=r"\$: object is missing the required field 'lines'"):
        await Tasks(h.client).trigger("untyped", {"id": 3})
    run = await h.run("untyped", {"id": 3, "lines": []})
    assert run.status is RunStatus.COMPLETED and run.output_as(int) == 3  # decoded as Order


async def test_pydantic_models_are_validated_by_the_daemon(h: Harness) -> None:
    pytest.importorskip("pydantic")
    with pytest.raises(BadRequest, match=r"\$\.age: expected a number >= 18, got 12"):
        await Tasks(h.client).trigger("signup", {"email": "a@b.c", "age": 12})
    run = await h.run("signup", {"email": "a@b.c", "age": 30})
    assert run.status is RunStatus.COMPLETED and run.output_as(str) == "a@b.c"


async def test_replay_with_a_new_payload_and_tags(h: Harness) -> None:
    first = await h.run("order", GOOD, tags=["first"])
    runs = Runs(h.client)
    changed = {"id": 2, "lines": [{"sku": "b", "qty": 5}]}
    replay = await runs.replay(first.id, payload=changed, tags=["second"])
    run = await h.wait(replay.id)
    assert run.output_as(int) == 5 and run.tags == ["second"] and run.replayed_from == first.id
    same = await h.wait((await runs.replay(first.id)).id)
    assert same.output_as(int) == 2 and same.tags == ["first"]
    with pytest.raises(BadRequest, match=re.escape(WHERE)):
        await runs.replay(first.id, payload=BAD)
    before = await run_count(h)
    cli = await asyncio.to_thread(
        ember, h, "runs", "replay", first.id, "--payload", json.dumps(changed), "--json"
    )
    assert cli.returncode == 0, cli.stderr
    from_cli = await h.wait(json.loads(cli.stdout)["id"])
    assert from_cli.output_as(int) == 5 and await run_count(h) == before + 1


def test_every_typed_trigger_option_reaches_the_wire() -> None:
    # TriggerOptions is what the typed keywords become on the wire: every key maps.
    from ember._task import TriggerKwargs

    assert set(TriggerKwargs.__annotations__) <= set(TriggerOptions.__struct_fields__)
