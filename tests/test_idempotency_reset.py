"""``idempotency_keys.reset(task, key)``: the next trigger with a reset key makes a new run."""

from __future__ import annotations

import pytest
from conftest import Harness

from ember import NotFound, Tasks
from ember._wait import IdempotencyKeys

TASKS = {
    "tasks/__init__.py": "",
    "tasks/once.py": """
        from ember import task

        @task(id="welcome")
        async def welcome(payload: dict) -> str:
            return f"hello {payload['user']}"
    """,
}


async def test_reset_frees_the_key_for_a_new_run(harness: Harness) -> None:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    tasks, keys = Tasks(harness.client), IdempotencyKeys(harness.client)
    first = await tasks.trigger("welcome", {"user": "ada"}, idempotency_key="welcome:ada")
    again = await tasks.trigger("welcome", {"user": "ada"}, idempotency_key="welcome:ada")
    assert again.id == first.id and again.is_cached
    assert (await harness.wait(first.id)).output_as(str) == "hello ada"
    reset = await keys.reset("welcome", "welcome:ada")
    assert reset.run_ids == [first.id]
    fresh = await tasks.trigger("welcome", {"user": "ada"}, idempotency_key="welcome:ada")
    assert fresh.id != first.id and not fresh.is_cached
    assert (await harness.wait(fresh.id)).output_as(str) == "hello ada"
    # The key of another task is another key.
    with pytest.raises(NotFound, match="no run of task 'other' in environment dev holds"):
        await keys.reset("other", "welcome:ada")
    assert (await keys.reset("welcome", "welcome:ada")).run_ids == [fresh.id]
    with pytest.raises(NotFound, match="it expired, its run failed, or it was reset"):
        await keys.reset("welcome", "welcome:ada")
