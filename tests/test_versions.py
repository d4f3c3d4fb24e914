"""Versions and the locking rules of Trigger.dev's versioning, against a real daemon.

Each rule has its test:
- a run locks to the version current when it starts, not when it was triggered
  (test_queued_run_locks_when_it_starts), delayed runs too
  (test_delayed_run_locks_when_it_starts);
- retries stay on the locked version (test_retries_stay_on_the_locked_version);
- trigger()/batch_trigger() children take the current version
  (test_children_take_the_current_version);
- replays take the current version unless pinned (test_replay_takes_the_current_version);
- ``version=``, EMBER_VERSION and TRIGGER_VERSION pin one (test_version_pins);
- a task the target version lacks waits as PENDING_VERSION
  (test_missing_task_is_pending_version);
- code changes never touch runs executing (test_reload_while_a_run_executes).

``trigger_and_wait()`` children run on their parent's version: that API is issue 3's.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon

from ember import Conflict, NotFound, Runs, RunStatus, Tasks


def code(tag: str, *, old_task: bool = True) -> dict[str, str]:
    """A project whose tasks report which version's code ran them."""
    old = (
        """
        @task(id="old")
        async def old(payload: dict) -> str:
            return TAG
        """
        if old_task
        else ""
    )
    return {
        "tasks/__init__.py": "",
        "tasks/t.py": f"""
        import asyncio
        import pathlib

        from ember import Context, Retry, task, tasks

        TAG = {tag!r}

        async def gate(payload: dict) -> None:
            if payload.get("gate"):
                while not pathlib.Path(payload["gate"]).exists():
                    await asyncio.sleep(0.02)

        @task(id="tag")
        async def tag(payload: dict, ctx: Context) -> dict:
            await gate(payload)
            return {{"tag": TAG, "version": ctx.version}}

        @task(id="flaky", retry=Retry(max_attempts=2, min_timeout_s=0.1, randomize=False))
        async def flaky(payload: dict, ctx: Context) -> dict:
            if ctx.attempt == 1:
                await gate(payload)
                raise RuntimeError("the first attempt fails")
            return {{"tag": TAG, "version": ctx.version}}

        @task(id="parent")
        async def parent(payload: dict) -> list:
            one = await tasks.trigger("tag", {{}})
            many = await tasks.batch_trigger([("tag", {{}}), ("tag", {{}})])
            return [one.id] + [h.id for h in many]
        {old}
        """,
    }


async def status_of(h: Harness, run_id: str) -> RunStatus:
    return (await Runs(h.client).retrieve(run_id)).status


async def executing(h: Harness, run_id: str) -> None:
    async def check() -> bool:
        return await status_of(h, run_id) is RunStatus.EXECUTING

    await eventually(check)


async def test_version_ids_count_per_day_and_environment(state_dir: Path) -> None:
    now = [datetime(2026, 11, 21, 23, 58, tzinfo=UTC).timestamp()]
    async with running_daemon(state_dir, clock=lambda: now[0]) as h:
        assert (await h.register(code("a"))).id == "20261121.1"
        assert (await h.register(code("b"))).id == "20261121.2"
        assert (await h.register(code("a"), env="prod")).id == "20261121.1"
        assert (await h.register(code("b"), env="preview/feat-x")).id == "20261121.1"
        now[0] += 5 * 60  # past midnight UTC: the sequence starts again
        assert (await h.register(code("c"))).id == "20261122.1"
        assert (await h.register(code("c"), env="prod")).id == "20261122.1"
        assert (await h.register(code("d"))).id == "20261122.2"
        versions = h.daemon.engine.version_list("dev")
        assert [v.id for v in versions] == ["20261122.2", "20261122.1", "20261121.2", "20261121.1"]
        assert [v.is_current for v in versions] == [True, False, False, False]


async def test_identical_content_is_no_new_version(harness: Harness) -> None:
    first = await harness.register(code("a"))
    again = await harness.register(code("a"))
    assert again.id == first.id and again.is_current
    staged = await harness.register(code("b"), promote=False)
    assert not staged.is_current
    # The same content deployed again is the staged version, promoted this time.
    promoted = await harness.register(code("b"))
    assert promoted.id == staged.id and promoted.is_current
    assert len(harness.daemon.engine.version_list("dev")) == 2


async def test_queued_run_locks_when_it_starts(harness: Harness) -> None:
    v1 = await harness.register(code("v1"))
    await harness.daemon.engine.pause_queue("dev", "task/tag", True)
    handle = await Tasks(harness.client).trigger("tag", {})
    assert await status_of(harness, handle.id) is RunStatus.QUEUED
    v2 = await harness.register(code("v2"))
    await harness.daemon.engine.pause_queue("dev", "task/tag", False)
    run = await harness.wait(handle.id)
    assert run.output_as() == {"tag": "v2", "version": v2.id} and v2.id != v1.id
    assert run.version == v2.id


async def test_delayed_run_locks_when_it_starts(harness: Harness) -> None:
    await harness.register(code("v1"))
    handle = await Tasks(harness.client).trigger("tag", {}, delay="1h")
    assert await status_of(harness, handle.id) is RunStatus.DELAYED
    v2 = await harness.register(code("v2"))
    await Runs(harness.client).reschedule(handle.id, 0)  # its delay is over now
    run = await harness.wait(handle.id)
    assert run.version == v2.id and run.output_as()["tag"] == "v2"


async def test_retries_stay_on_the_locked_version(harness: Harness, tmp_path: Path) -> None:
    v1 = await harness.register(code("v1"))
    gate = tmp_path / "gate"
    handle = await Tasks(harness.client).trigger("flaky", {"gate": str(gate)})
    await executing(harness, handle.id)
    await harness.register(code("v2"))
    gate.touch()
    run = await harness.wait(handle.id)
    assert run.status is RunStatus.COMPLETED
    assert run.output_as() == {"tag": "v1", "version": v1.id}
    assert [a.version for a in run.attempts] == [v1.id, v1.id]


async def test_children_take_the_current_version(harness: Harness) -> None:
    v1 = await harness.register(code("v1"))
    v2 = await harness.register(code("v2"))
    # The parent is pinned to v1; the children it triggers take the current version.
    parent = await harness.run("parent", {}, version=v1.id)
    assert parent.version == v1.id
    children = [await harness.wait(child) for child in parent.output_as()]
    assert len(children) == 3
    assert {c.version for c in children} == {v2.id}
    assert {c.output_as()["tag"] for c in children} == {"v2"}
    assert {c.parent_run_id for c in children} == {parent.id}


async def test_replay_takes_the_current_version(harness: Harness) -> None:
    v1 = await harness.register(code("v1"))
    original = await harness.run("tag", {})
    v2 = await harness.register(code("v2"))
    replay = await harness.wait((await Runs(harness.client).replay(original.id)).id)
    assert (original.version, replay.version) == (v1.id, v2.id)
    assert replay.replayed_from == original.id
    pinned = await Runs(harness.client).replay(original.id, version=v1.id)
    assert (await harness.wait(pinned.id)).output_as()["tag"] == "v1"


async def test_version_pins(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = await harness.register(code("v1"))
    v2 = await harness.register(code("v2"))
    assert (await harness.run("tag", {})).version == v2.id
    assert (await harness.run("tag", {}, version=v1.id)).version == v1.id
    monkeypatch.setenv("EMBER_VERSION", v1.id)
    assert (await harness.run("tag", {})).output_as()["tag"] == "v1"
    monkeypatch.delenv("EMBER_VERSION")
    monkeypatch.setenv("TRIGGER_VERSION", v1.id)
    assert (await harness.run("tag", {})).version == v1.id
    monkeypatch.delenv("TRIGGER_VERSION")
    with pytest.raises(NotFound, match=r"options\.version: version 20000101\.1 is not registered"):
        await Tasks(harness.client).trigger("tag", {}, version="20000101.1")


@pytest.mark.timeout(120)
async def test_pinned_runs_after_the_pinned_zygote_stopped(harness: Harness) -> None:
    # Each pinned run's process retires (its version is not current), its zygote stops, and
    # the next run starts a new zygote of the same version: the old one's late end must not
    # fail the new one's forks.
    v1 = await harness.register(code("v1"))
    await harness.register(code("v2"))
    assert (await harness.run("tag", {}, version=v1.id)).version == v1.id
    await eventually(lambda: harness.daemon.supervisor.stats()["zygotes"] == 1)
    runs = [await harness.run("tag", {}, version=v1.id) for _ in range(50)]
    assert [(r.status, r.version) for r in runs] == [(RunStatus.COMPLETED, v1.id)] * 50, [
        r.error for r in runs if r.error is not None
    ]


async def test_missing_task_is_pending_version(harness: Harness) -> None:
    v1 = await harness.register(code("v1"))
    await harness.register(code("v2", old_task=False))
    # The current version lacks the task that v1 has: the run waits for a version with it.
    waiting = await Tasks(harness.client).trigger("old", {})
    assert await status_of(harness, waiting.id) is RunStatus.PENDING_VERSION
    # Pinned to a version without the task: PENDING_VERSION too, not an error.
    v3 = await harness.register(code("v3", old_task=False))
    pinned = await Tasks(harness.client).trigger("old", {}, version=v3.id)
    assert await status_of(harness, pinned.id) is RunStatus.PENDING_VERSION
    v4 = await harness.register(code("v4"))
    run = await harness.wait(waiting.id)
    assert (run.version, run.output_as()) == (v4.id, "v4") and v1.id != v4.id
    assert await status_of(harness, pinned.id) is RunStatus.PENDING_VERSION


async def test_reload_while_a_run_executes(harness: Harness, tmp_path: Path) -> None:
    v1 = await harness.register(code("v1"))
    gate = tmp_path / "gate"
    first = await Tasks(harness.client).trigger("tag", {"gate": str(gate)})
    await executing(harness, first.id)
    v2 = await harness.register(code("v2"))  # what `ember dev` does on a code change
    gate.touch()
    done = await harness.wait(first.id)
    assert done.output_as() == {"tag": "v1", "version": v1.id}
    second = await harness.run("tag", {})
    assert second.output_as() == {"tag": "v2", "version": v2.id}
    # The old version's processes and zygote go once its run is over.
    supervisor = harness.daemon.supervisor
    await eventually(
        lambda: (
            supervisor.stats()["zygotes"] == 1
            and all(p.version == v2.id for p in supervisor.processes())
        )
    )


async def test_promote_and_failed_builds(harness: Harness) -> None:
    v1 = await harness.register(code("v1"))
    staged = await harness.register(code("v2"), promote=False)
    assert (await harness.run("tag", {})).version == v1.id
    promoted = await harness.daemon.promote("dev", staged.id)
    assert promoted.is_current and (await harness.run("tag", {})).version == staged.id
    broken = await harness.register({"tasks/__init__.py": "", "tasks/t.py": "import nope\n"})
    assert broken.status == "FAILED" and "ModuleNotFoundError" in (broken.error or "")
    assert not broken.is_current
    assert (await harness.run("tag", {})).version == staged.id  # the last good one serves
    with pytest.raises(Conflict, match="failed to build"):
        await harness.daemon.promote("dev", broken.id)
    with pytest.raises(NotFound):
        await harness.daemon.promote("dev", "20000101.9")
    await asyncio.sleep(0)
