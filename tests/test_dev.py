"""`ember dev` as a user runs it: hot reload while a run executes, .env, editor files, errors."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

from conftest import eventually

from ember import Client, ClientSettings, Runs, RunStatus, Tasks

TASK = """
import asyncio
import os
import pathlib

from ember import Context, task

TAG = {tag!r}

@task(id="tag")
async def tag(payload: dict, ctx: Context) -> dict:
    if payload.get("gate"):
        while not pathlib.Path(payload["gate"]).exists():
            await asyncio.sleep(0.02)
    return {{"tag": TAG, "version": ctx.version, "greeting": os.environ.get("GREETING")}}
"""


class DevProcess:
    """`ember dev` in a subprocess, with its output read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            asyncio.ensure_future(self._read(process.stdout, self.lines)),
            asyncio.ensure_future(self._read(process.stderr, self.errors)),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for raw in stream:
            into.append(raw.decode().rstrip())

    async def line(self, text: str, after: int = 0, timeout_s: float = 60.0) -> tuple[int, str]:
        """Wait for a stdout line containing ``text`` at index ``after`` or later."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index in range(after, len(self.lines)):
                if text in self.lines[index]:
                    return index, self.lines[index]
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no line with {text!r}:\n" + "\n".join(self.lines + self.errors))

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await asyncio.gather(*self._readers)
        return code


def ready_id(line: str) -> str:
    return line.split("-> ", 1)[1].split()[0]


async def test_hot_reload_while_a_run_executes(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "tasks").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[tool.ember]\ndirs = ["tasks"]\n')
    (root / "tasks" / "__init__.py").write_text("")
    source = root / "tasks" / "t.py"
    source.write_text(textwrap.dedent(TASK.format(tag="v1")))
    (root / ".env").write_text("GREETING=hello from .env\n")
    state = tmp_path / "state"
    env = {
        **os.environ,
        "EMBER_STATE_DIR": str(state),
        "EMBER_SOCKET": str(tmp_path / "dev.sock"),
        "NO_COLOR": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ember.cli",
        "dev",
        cwd=root,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    dev = DevProcess(process)
    client = Client(ClientSettings(socket_path=tmp_path / "dev.sock"))
    try:
        at, line = await dev.line("Local worker ready -> ")
        first = ready_id(line)
        assert any("Loaded 1 variables from .env" in x for x in dev.lines)
        gate = tmp_path / "gate"
        handle = await Tasks(client).trigger("tag", {"gate": str(gate)})
        runs = Runs(client)

        async def executing() -> bool:
            return (await runs.retrieve(handle.id)).status is RunStatus.EXECUTING

        await eventually(executing)
        # Editor files are not code changes: no version for them.
        (root / "tasks" / ".t.py.swp").write_text("x")
        (root / "tasks" / "t.py~").write_text("x")
        source.write_text(textwrap.dedent(TASK.format(tag="v2")))
        at, line = await dev.line("Local worker ready -> ", after=at + 1)
        second = ready_id(line)
        day, number = first.split(".")
        assert second == f"{day}.{int(number) + 1}"
        gate.touch()
        old = await handle.result(30)
        assert old == {"tag": "v1", "version": first, "greeting": "hello from .env"}
        new = await (await Tasks(client).trigger("tag", {})).result(30)
        assert new["tag"] == "v2" and new["version"] == second
        # The same content again is no new version.
        source.write_text(source.read_text())
        os.utime(source)
        # An import error prints the traceback and keeps the last good version serving.
        source.write_text("raise RuntimeError('boom at import')\n")
        at, _ = await dev.line("Build failed", after=at + 1)
        await eventually(lambda: any("RuntimeError: boom at import" in x for x in dev.errors))
        still = await (await Tasks(client).trigger("tag", {})).result(30)
        assert still["version"] == second
        # A .env change reaches the next run.
        (root / ".env").write_text("GREETING=changed\n")
        await dev.line("Loaded 1 variables from .env", after=at + 1)
        changed = await (await Tasks(client).trigger("tag", {})).result(30)
        assert changed["greeting"] == "changed"
    finally:
        await client.aclose()
        code = await dev.stop()
    assert code == 0, dev.errors


def test_only_snapshot_files_are_changes(tmp_path: Path) -> None:
    from ember.cli._dev import _relevant

    root = tmp_path
    relevant = ["tasks/t.py", "requirements.txt", "lib/helpers.py", "pyproject.toml"]
    ignored = [
        "tasks/.t.py.swp",
        "tasks/t.py~",
        "tasks/#t.py#",
        ".ember/tmp/deploy-1/files/tasks/t.py",
        ".venv/lib/site.py",
        "tasks/__pycache__/t.cpython-311.pyc",
        "build/lib/t.py",
        "notes.md",
    ]
    assert [p for p in relevant if _relevant(str(root / p), root)] == relevant
    assert [p for p in ignored if _relevant(str(root / p), root)] == []


WAITERS = """
import asyncio
from ember import task, wait

@task(id="forever")
async def forever(payload: dict) -> None:
    await asyncio.sleep(600)

@task(id="on-token")
async def on_token(payload: dict) -> None:
    await wait.for_token(await wait.create_token(timeout="1d"))

@task(id="on-duration")
async def on_duration(payload: dict) -> None:
    await wait.for_(hours=1)

@task(id="on-child")
async def on_child(payload: dict) -> None:
    await forever.trigger_and_wait({})
"""


async def test_ctrl_c_cancels_waiting_runs(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "tasks").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[tool.ember]\ndirs = ["tasks"]\nwait_park_threshold_s = 0.2\n'
    )
    (root / "tasks" / "__init__.py").write_text("")
    (root / "tasks" / "w.py").write_text(WAITERS)
    state = tmp_path / "state"
    socket = tmp_path / "dev.sock"
    env = {**os.environ, "EMBER_STATE_DIR": str(state), "EMBER_SOCKET": str(socket)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ember.cli",
        "dev",
        cwd=root,
        env={**env, "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    dev = DevProcess(process)
    client = Client(ClientSettings(socket_path=socket))
    try:
        await dev.line("Local worker ready -> ")
        tasks, runs = Tasks(client), Runs(client)
        waiting = [(await tasks.trigger(t, {})).id for t in ("on-token", "on-duration", "on-child")]
        executing = (await tasks.trigger("forever", {})).id

        async def all_waiting() -> bool:
            found = [await runs.retrieve(run_id) for run_id in waiting]
            return all(r.status is RunStatus.WAITING for r in found)

        await eventually(all_waiting, timeout_s=30)
        child = (await runs.list(parent=waiting[2])).data[0].id
    finally:
        await client.aclose()
        code = await dev.stop()
    assert code == 0, dev.errors
    assert any("Canceled" in line for line in dev.lines), dev.lines
    # The daemon `ember dev` embedded is gone: the table says how each run ended.
    with sqlite3.connect(state / "ember.db") as conn:
        found = dict(conn.execute("SELECT id, status FROM runs").fetchall())
    assert found == dict.fromkeys([*waiting, executing, child], "CANCELED")
