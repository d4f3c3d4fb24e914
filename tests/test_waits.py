"""Durable waits with real processes: durations, child runs, batches, tokens, replays."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon

from ember import Runs, RunStatus, Tasks, Wait, wait

TASKS = {
    "tasks/__init__.py": "",
    "tasks/flow.py": '''
        import os
        from pathlib import Path
        from ember import AbortTaskRunError, Context, Retry, task, wait, idempotency_keys

        COUNTS = Path(os.environ.get("EMBER_TEST_COUNTS", "/tmp/ember-counts"))

        def count(name: str) -> int:
            """Record one execution of `name` (a file per execution: safe across processes)."""
            COUNTS.mkdir(parents=True, exist_ok=True)
            path = COUNTS / f"{name}.{os.getpid()}.{len(list(COUNTS.glob(name + '.*')))}"
            path.write_text("")
            return len(list(COUNTS.glob(name + ".*")))

        @task(id="sleepy")
        async def sleepy(payload: dict) -> dict:
            before = payload.get("tag", "")
            await wait.for_(seconds=payload["s"])
            return {"tag": before, "after": True}

        @task(id="child")
        async def child(payload: dict) -> int:
            count("child")
            if payload.get("fail"):
                raise AbortTaskRunError("the child cannot do it")
            return payload["n"] * 10

        @task(id="parent")
        async def parent(payload: dict, ctx: Context) -> dict:
            result = await child.trigger_and_wait({"n": payload["n"], "fail": payload.get("fail")})
            return {"ok": result.ok, "output": result.output, "child": result.id,
                    "error": result.error.message if result.error else None}

        @task(id="unwrapper")
        async def unwrapper(payload: dict) -> int:
            return (await child.trigger_and_wait({"n": 1, "fail": True})).unwrap()

        @task(id="fan-out")
        async def fan_out(payload: dict) -> list:
            items = [{"n": i} for i in range(payload["count"])]
            results = await child.batch_trigger_and_wait(items)
            return [r.output for r in results]

        @task(id="approval")
        async def approval(payload: dict) -> dict:
            token = await wait.create_token(timeout=payload.get("timeout", "1h"),
                                            idempotency_key=payload["key"])
            result = await wait.for_token(token)
            return {"ok": result.ok, "output": result.output, "error": result.error}

        @task(id="charge")
        async def charge(payload: dict) -> str:
            count("charge")
            return "charged"

        @task(id="fulfil")
        async def fulfil(payload: dict) -> str:
            count("fulfil")
            return "fulfilled"

        @task(id="email", retry=Retry(max_attempts=1))
        async def email(payload: dict) -> str:
            if count("email") == 1:
                raise RuntimeError("the mail server is down")
            return "sent"

        @task(id="order", retry=Retry(max_attempts=3, min_timeout_s=0.1, randomize=False))
        async def order(payload: dict) -> list:
            # Trigger.dev's idempotent retry workflow: only the failed step runs again.
            key = idempotency_keys.create
            charged = await charge.trigger_and_wait(payload, idempotency_key=key("charge"))
            fulfilled = await fulfil.trigger_and_wait(payload, idempotency_key=key("fulfil"))
            mailed = await email.trigger_and_wait(payload, idempotency_key=key("email"))
            return [charged.unwrap(), fulfilled.unwrap(), mailed.unwrap()]

        @task(id="two-children")
        async def two_children(payload: dict) -> list:
            first = await child.trigger_and_wait({"n": 1})
            await wait.for_(seconds=payload["s"])
            second = await child.trigger_and_wait({"n": 2})
            return [first.output, second.output]

        @task(id="fickle")
        async def fickle(payload: dict) -> str:
            flag = Path(payload["flag"])
            if flag.exists():
                await child.trigger_and_wait({"n": 1})
            else:
                flag.write_text("")
                await wait.for_(seconds=payload["s"])
            return "done"
    ''',
}


@pytest.fixture
def counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "counts"
    monkeypatch.setenv("EMBER_TEST_COUNTS", str(folder))
    return folder


def executions(counts: Path, name: str) -> int:
    return len(list(counts.glob(name + ".*")))


async def daemon_with(
    state_dir: Path, strategy: str, **overrides: object
) -> AsyncIterator[Harness]:
    async with running_daemon(
        state_dir, checkpoint=strategy, wait_park_threshold_s=0.5, cancel_grace_s=1.0, **overrides
    ) as h:
        info = await h.register(TASKS)
        assert info.status == "READY", info.error
        yield h


@pytest.fixture(params=["park", "replay"])
async def h(
    request: pytest.FixtureRequest, state_dir: Path, counts: Path
) -> AsyncIterator[Harness]:
    async for harness in daemon_with(state_dir, request.param):
        yield harness


async def test_short_wait_keeps_its_process_and_slot(h: Harness) -> None:
    run = await h.run("sleepy", {"s": 0.2, "tag": "x"})
    assert run.output_as() == {"tag": "x", "after": True}
    statuses = [s.status for s in run.snapshots]
    assert "EXECUTING_WITH_WAITPOINTS" in statuses and "SUSPENDED" not in statuses


async def test_long_wait_releases_the_slot_then_resumes(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("sleepy", {"s": 1.5, "tag": "kept"})
    await eventually(lambda: _status(runs, handle.id, RunStatus.WAITING))
    assert h.daemon.engine.stats()["executing"] == 0, "a waiting run holds no slot"
    run = await h.wait(handle.id)
    assert run.output_as() == {"tag": "kept", "after": True}
    waited = (run.finished_at - run.created_at).total_seconds()  # type: ignore[operator]
    assert waited >= 1.5
    assert [s.status for s in run.snapshots].count("SUSPENDED") == 1
    assert len(run.attempts) == 1, "a wait is not a new attempt"


async def _status(runs: Runs, run_id: str, status: RunStatus) -> bool:
    return (await runs.retrieve(run_id)).status is status


async def test_parent_awaits_a_child_on_its_own_version(h: Harness) -> None:
    run = await h.run("parent", {"n": 4})
    output = run.output_as()
    assert output["ok"] and output["output"] == 40
    child = await Runs(h.client).retrieve(output["child"])
    assert child.parent_run_id == run.id and child.version == run.version
    assert child.pinned_version == run.version


async def test_a_failed_child_is_a_result_and_unwrap_raises(h: Harness) -> None:
    run = await h.run("parent", {"n": 1, "fail": True})
    assert run.output_as()["ok"] is False
    assert run.output_as()["error"] == "the child cannot do it"
    unwrapped = await h.run("unwrapper", {})
    assert unwrapped.status is RunStatus.FAILED
    assert unwrapped.error is not None and unwrapped.error.name == "SubtaskUnwrapError"


async def test_batch_of_50_children_returns_results_in_order(h: Harness, counts: Path) -> None:
    run = await h.run("fan-out", {"count": 50}, timeout_s=60)
    assert run.output_as() == [i * 10 for i in range(50)]
    assert executions(counts, "child") == 50


async def test_token_completed_through_the_api(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("approval", {"key": "approve-1"})
    await eventually(lambda: _status(runs, handle.id, RunStatus.WAITING))
    token = await Wait(h.client).create_token(idempotency_key="approve-1")  # the run's own token
    assert token.is_cached
    await eventually(lambda: _waiting_on(h, token.id, handle.id))
    completed = await Wait(h.client).complete_token(token.id, {"approved": True})
    assert completed.status == "COMPLETED"
    run = await h.wait(handle.id)
    assert run.output_as() == {"ok": True, "output": {"approved": True}, "error": None}


async def _waiting_on(h: Harness, token_id: str, run_id: str) -> bool:
    return run_id in (await Wait(h.client).retrieve_token(token_id)).waiting_runs


async def test_token_that_times_out_is_an_error_result(h: Harness) -> None:
    run = await h.run("approval", {"key": "late", "timeout": "0.8s"})
    output = run.output_as()
    assert output["ok"] is False and "timed out" in output["error"]
    tokens = (await Wait(h.client).list_tokens(status="TIMED_OUT")).data
    assert [t.idempotency_key for t in tokens] == ["late"]


async def test_idempotent_retry_runs_each_step_once(h: Harness, counts: Path) -> None:
    run = await h.run("order", {"order": 7}, timeout_s=60)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output_as() == ["charged", "fulfilled", "sent"]
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]
    assert executions(counts, "charge") == 1
    assert executions(counts, "fulfil") == 1
    assert executions(counts, "email") == 2


async def test_waits_outside_a_run_are_refused() -> None:
    from ember import WaitOutsideRunError

    with pytest.raises(WaitOutsideRunError, match="inside a task run"):
        await wait.for_(seconds=1)


async def test_killed_process_during_a_wait_replays_without_rerunning_children(
    state_dir: Path, counts: Path
) -> None:
    async for h in daemon_with(state_dir, "park"):
        handle = await Tasks(h.client).trigger("two-children", {"s": 2})
        runs = Runs(h.client)
        await eventually(lambda r=runs, i=handle.id: _status(r, i, RunStatus.WAITING))
        parked = [p.pid for p in h.daemon.supervisor.processes() if p.state == "parked" and p.pid]
        assert len(parked) == 1
        os.kill(parked[0], signal.SIGKILL)
        run = await h.wait(handle.id)
        assert run.output_as() == [10, 20]
        assert executions(counts, "child") == 2, "the first child must not run again"


async def test_a_replay_that_takes_another_path_fails_clearly(
    state_dir: Path, tmp_path: Path
) -> None:
    async for h in daemon_with(state_dir, "replay"):
        run = await h.run("fickle", {"flag": str(tmp_path / "flag"), "s": 1})
        assert run.status is RunStatus.FAILED
        assert run.error is not None and run.error.name == "NonDeterminismError"
        assert "same path" in run.error.message


async def test_wait_for_survives_a_daemon_restart(state_dir: Path, counts: Path) -> None:
    async for h in daemon_with(state_dir, "park"):
        handle = await Tasks(h.client).trigger("sleepy", {"s": 2, "tag": "restart"})
        runs = Runs(h.client)
        await eventually(lambda r=runs, i=handle.id: _status(r, i, RunStatus.WAITING))
    async for h in daemon_with(state_dir, "park"):
        run = await h.wait(handle.id, 30)
        assert run.output_as() == {"tag": "restart", "after": True}
        assert (run.finished_at - run.created_at).total_seconds() >= 2  # type: ignore[operator]


async def test_cancel_a_waiting_run(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("sleepy", {"s": 60})
    await eventually(lambda: _status(runs, handle.id, RunStatus.WAITING))
    canceled = await runs.cancel(handle.id)
    assert canceled.status is RunStatus.CANCELED
    await eventually(lambda: all(p.state != "parked" for p in h.daemon.supervisor.processes()))


async def test_tokens_cli_completes_a_token(h: Harness) -> None:
    import json
    import subprocess
    import sys

    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("approval", {"key": "cli"})
    await eventually(lambda: _status(runs, handle.id, RunStatus.WAITING))
    token = await Wait(h.client).create_token(idempotency_key="cli")
    await eventually(lambda: _waiting_on(h, token.id, handle.id))
    env = {**os.environ, "EMBER_SOCKET": str(h.config.api_socket)}
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ember.cli", "tokens", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    listed_tokens = {t["id"]: t for t in json.loads(listed.stdout)["data"]}
    assert listed_tokens[token.id]["waiting_runs"] == [handle.id]
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "ember.cli",
            "tokens",
            "complete",
            token.id,
            "--data",
            '{"by": "cli"}',
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (await h.wait(handle.id)).output_as()["output"] == {"by": "cli"}
