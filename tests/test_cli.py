"""The `ember` command against a real daemon, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Harness

from ember.cli._project import find_project, init_project, snapshot
from ember.daemon.builds.versions import unpack

TASKS = {
    "tasks/__init__.py": "",
    "tasks/t.py": """
        from ember import task

        @task(id="double")
        async def double(payload: dict) -> int:
            return payload["n"] * 2

        @task(id="fails", retry=None)
        async def fails(payload: dict) -> None:
            raise RuntimeError("nope")
    """,
}


def ember(h: Harness, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_SOCKET": str(h.config.api_socket), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
async def h(harness: Harness) -> Harness:
    await harness.register(TASKS)
    return harness


async def test_trigger_wait_prints_the_output(h: Harness) -> None:
    import asyncio

    result = await asyncio.to_thread(
        ember, h, "trigger", "double", "--payload", '{"n": 21}', "--wait", "--json"
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["status"] == "COMPLETED" and run["output"] == 42


async def test_trigger_with_bad_json_payload_says_where(h: Harness) -> None:
    import asyncio

    result = await asyncio.to_thread(ember, h, "trigger", "double", "--payload", '{"n": }')
    assert result.returncode == 1
    assert "--payload is not valid JSON" in result.stderr and "column" in result.stderr


async def test_unknown_task_is_a_clear_error(h: Harness) -> None:
    import asyncio

    result = await asyncio.to_thread(ember, h, "trigger", "tripple", "--payload", "{}")
    assert result.returncode == 1
    assert "task 'tripple' is not defined" in result.stderr


async def test_runs_list_show_logs_and_replay(h: Harness) -> None:
    import asyncio

    run = await h.run("double", {"n": 2})
    listed = await asyncio.to_thread(ember, h, "runs", "list", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)["data"]] == [run.id]
    shown = await asyncio.to_thread(ember, h, "runs", "show", run.id)
    assert (
        "COMPLETED" in shown.stdout and "history RUN_CREATED -> QUEUED -> EXECUTING" in shown.stdout
    )
    replayed = await asyncio.to_thread(ember, h, "runs", "replay", run.id, "--json")
    new_id = json.loads(replayed.stdout)["id"]
    assert (await h.wait(new_id)).output_as(int) == 4
    filtered = await asyncio.to_thread(ember, h, "runs", "list", "--status", "failed", "--json")
    assert json.loads(filtered.stdout)["data"] == []


async def test_no_daemon_tells_how_to_start_one(tmp_path: Path) -> None:
    import asyncio

    env = {**os.environ, "EMBER_SOCKET": str(tmp_path / "none.sock")}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ember.cli", "runs", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no Ember daemon answers" in result.stderr and "ember dev" in result.stderr


def test_init_then_snapshot_holds_the_starter_task(tmp_path: Path) -> None:
    done = init_project(tmp_path)
    assert any("pyproject.toml" in line for line in done)
    assert init_project(tmp_path) == []  # idempotent
    project = find_project(tmp_path / "tasks")
    assert project.root == tmp_path.resolve() and project.dirs == ("tasks",)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.py").write_text("")
    archive, count = snapshot(project)
    store = tmp_path.parent / f"{tmp_path.name}-code"
    digest, code = unpack(archive, store)
    files = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    assert files == [
        ".ember/manifest.json",
        "pyproject.toml",
        "tasks/__init__.py",
        "tasks/example.py",
    ]
    assert count == 3
    again, _ = snapshot(project)
    assert unpack(again, store)[0] == digest, "same content, same version hash"


async def test_bad_settings_are_one_line_with_the_fix(h: Harness, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.ember]\nbogus = 1\n')
    for command in (("doctor",), ("runs", "list")):
        result = ember(h, *command, cwd=tmp_path)
        assert result.returncode == 1, command
        assert "unknown key 'bogus'" in result.stderr
        assert "Traceback" not in result.stderr
