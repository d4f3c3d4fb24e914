"""CRIU across a daemon crash: a run whose wait completed while its image waited for a slot.

Found by the chaos soak test: the daemon was killed after a checkpointed run's wait completed
(the table said QUEUED, held by its checkpoint) and before its process was restored. The next
daemon restored the image, did not know which wait the process stood in, and bound the run as
if it had been checkpointed mid-execution: the process waited for a result that never came,
holding its slot for good, until every slot was held so and nothing else ran.

A real ``ember daemon`` killed with -9, real criu, real run processes. Skipped, with the
reason, wherever ``ember doctor`` would say checkpoints do not work.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import eventually
from daemon_proc import DaemonProc, first_life, wait_answering
from test_checkpoint import SUPPORT

from ember import Call, Client, ClientSettings, Runs, RunStatus, Tasks, Wait
from ember._types import QueueInfo

pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}"),
]

TASKS = {
    "tasks/__init__.py": "",
    "tasks/held.py": """
        import random
        from ember import logger, task, wait

        @task(id="holder")
        async def holder(payload: dict) -> dict:
            # Only this process's memory holds it: a re-execution would draw another.
            secret = random.random()
            logger.info("before the wait", secret=secret)
            token = await wait.create_token(timeout="1h", idempotency_key=payload["key"])
            got = await wait.for_token(token)
            return {"secret": secret, "got": got.output}
    """,
}
QUEUE = "task/holder"


async def _set_paused(client: Client, paused: bool) -> None:
    action = "pause" if paused else "resume"
    await client.request(Call("POST", f"/api/v1/queues/{QUEUE}/{action}", QueueInfo))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_wait_completed_before_a_crash_resumes_the_restored_process(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    flags = ("--checkpoint", "criu")
    images = state / "checkpoints"
    first, client = await first_life(state, flags, TASKS)
    try:
        runs = Runs(client)
        run_id = (await Tasks(client).trigger("holder", {"key": "gate"})).id
        # Held by its checkpoint: the process is dumped and gone.
        await eventually(lambda: (images / run_id / "meta.json").exists(), timeout_s=90)
        secret = float((await runs.logs(run_id)).data[0].attrs["secret"])
        # A paused queue keeps the resumed run QUEUED, its image not restored yet: the state
        # the kill caught in the soak test.
        await _set_paused(client, True)
        token = await Wait(client).create_token(timeout="1h", idempotency_key="gate")
        await Wait(client).complete_token(token, {"opened": True})

        async def queued() -> bool:
            return (await runs.retrieve(run_id)).status is RunStatus.QUEUED

        await eventually(queued, timeout_s=30)
    finally:
        await client.aclose()
    first.signal(signal.SIGKILL)
    first.wait_exit()

    second = DaemonProc(state, *flags)
    second.start()
    client = Client(ClientSettings(socket_path=second.socket))
    try:
        await wait_answering(client)
        await _set_paused(client, False)
        run = await Runs(client).poll(run_id, timeout_s=60)
    finally:
        await client.aclose()
        second.stop()
    assert run.status is RunStatus.COMPLETED, (run.status, second.output()[-2000:])
    output = run.output_as(dict)
    assert output == {"secret": secret, "got": {"opened": True}}, "resumed from its image"
    descriptions = [s.description for s in run.snapshots]
    assert any(d.startswith("restored its process") for d in descriptions), descriptions
    assert [a.status for a in run.attempts] == ["COMPLETED"]
