"""Canceling a run cancels the runs it triggered, and theirs, whatever state they are in."""

from __future__ import annotations

from conftest import Harness, eventually

from ember import Runs, RunStatus, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/family.py": """
        import asyncio
        from ember import task, wait

        @task(id="spin")
        async def spin(payload: dict) -> None:
            await asyncio.sleep(600)

        @task(id="mid")
        async def mid(payload: dict) -> None:
            await spin.trigger({"who": "grandchild executing"})
            await spin.trigger({"who": "grandchild delayed"}, delay="1h")
            await spin.batch_trigger([{"who": "grandchild in a batch"}])
            await spin.trigger_and_wait({"who": "grandchild waited for"})

        @task(id="top")
        async def top(payload: dict) -> None:
            await spin.trigger({"who": "child executing"})
            await spin.batch_trigger_and_wait([{"who": "child in a waited batch"}])

        @task(id="root")
        async def root(payload: dict) -> None:
            await top.trigger({})
            await mid.trigger_and_wait({})
    """,
}


async def test_cancel_cascades_through_two_levels(harness: Harness) -> None:
    await harness.register(TASKS)
    runs = Runs(harness.client)
    root = await Tasks(harness.client).trigger("root", {})

    async def family() -> list:
        children = (await runs.list(parent=root.id)).data
        grandchildren = [r for c in children for r in (await runs.list(parent=c.id)).data]
        return children + grandchildren

    async def all_triggered() -> bool:
        found = await family()
        executing = [r for r in found if r.status is RunStatus.EXECUTING]
        # top and mid, top's 2 spins, mid's 3 spins executing and 1 delayed
        return len(found) == 8 and len(executing) >= 5

    await eventually(all_triggered, timeout_s=30)
    statuses = {r.status for r in await family()}
    assert RunStatus.DELAYED in statuses  # one is only in the table (due in an hour)
    assert RunStatus.WAITING in statuses or RunStatus.EXECUTING in statuses
    await runs.cancel(root.id)
    found = await family()
    assert (await runs.retrieve(root.id)).status is RunStatus.CANCELED
    assert {r.task_id for r in found} == {"top", "mid", "spin"}
    assert [r.status for r in found] == [RunStatus.CANCELED] * 8
    # The executing ones lose their processes too: none is left busy.
    await eventually(lambda: harness.daemon.engine.stats()["executing"] == 0)
    await eventually(lambda: not harness.daemon.engine.active)
