"""Sync between a laptop daemon and a production daemon, both real, on loopback with TLS.

The local daemon forwards ``prod`` to a remote daemon process (a CA made in the test signs
its certificate). Runs triggered locally go through the outbox and become exactly one
remote run each, however the connection or the remote fails; the remote's runs come back
into the local mirror with their output.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import eventually
from sync_parts import Proxy, RemoteDaemon, forwarding_daemon, free_port, production
from test_durability import DaemonProcess, wait_ready

from ember import Client, ClientSettings, Runs, RunStatus, Tasks
from ember._errors import DaemonUnavailable
from ember.sync import Profile, save_profile, settings_of
from ember.sync._link import sync_key


def remote_runs(remote: RemoteDaemon) -> list[tuple[str, str | None, str]]:
    """(id, idempotency key, status) of every prod run the remote's database holds."""
    with sqlite3.connect(f"file:{remote.state / 'ember.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT id, idempotency_key, status FROM runs WHERE env = 'prod'"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


async def completed_locally(client: Client, count: int) -> bool:
    page = await Runs(client).list(status=["COMPLETED"], limit=1000)
    return len(page.data) >= count


async def all_completed(client: Client, remote: RemoteDaemon, count: int) -> None:
    """Until the mirror shows ``count`` completed runs; on a timeout, say where they are."""
    try:
        await eventually(lambda: completed_locally(client, count), timeout_s=300)
    except AssertionError:
        local = [
            (r.status.value, r.sync and r.sync.state)
            for r in (await Runs(client).list(limit=1000)).data
        ]
        remote_statuses = [status for *_, status in remote_runs(remote)]
        summary = {
            "local": sorted({(s, st, local.count((s, st))) for s, st in local}),
            "remote": sorted({(s, remote_statuses.count(s)) for s in remote_statuses}),
        }
        raise AssertionError(f"not all {count} runs completed in the mirror: {summary}") from None


async def check_exactly_once(client: Client, remote: RemoteDaemon, local: dict[str, int]) -> None:
    """Every local run became one remote run, completed, its output mirrored back."""
    rows = remote_runs(remote)
    keys = [key for _, key, _ in rows]
    assert len(rows) == len(local), f"{len(rows)} remote runs for {len(local)} local ones"
    assert sorted(keys) == sorted(sync_key(i) for i in local), "a run was lost or duplicated"
    assert {status for *_, status in rows} == {"COMPLETED"}
    remote_ids = {remote_id for remote_id, *_ in rows}
    runs = Runs(client)
    for local_id, i in local.items():
        run = await runs.poll(local_id, timeout_s=60)
        assert run.status is RunStatus.COMPLETED
        assert run.output_as(int) == i
        assert run.id == local_id, "a forwarded run keeps the id its trigger answered"
        assert run.sync is not None and run.sync.state == "mirrored"
        assert run.sync.remote_id in remote_ids
        remote_ids.remove(run.sync.remote_id)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_runs_triggered_while_the_remote_is_down_reach_it_once_each(tmp_path: Path) -> None:
    async with production(tmp_path) as remote:
        remote.stop()  # production is down while the laptop triggers
        url, key, certs = remote.url, remote.key, remote.certs
        async with forwarding_daemon(tmp_path / "local", url, key, certs) as local:
            tasks = Tasks(local.client)
            triggered = {(await tasks.trigger("echo", {"i": i})).id: i for i in range(1000)}
            first = await Runs(local.client).retrieve(next(iter(triggered)))
            assert first.status is RunStatus.QUEUED
            assert first.sync is not None and first.sync.state == "outbox"
            assert remote_runs(remote) == []

            remote.start()
            await all_completed(local.client, remote, 1000)
            await check_exactly_once(local.client, remote, triggered)

            # Offline: the mirror still shows production, saying how old it is.
            remote.stop()
            page = await Runs(local.client).list(limit=1000)
            assert len(page.data) == 1000
            await eventually(lambda: _offline(local.client, next(iter(triggered))))
            logs = await Runs(local.client).logs(next(iter(triggered)))
            assert [line.message for line in logs.data] == ["echo"]


async def _offline(client: Client, run_id: str) -> bool:
    run = await Runs(client).retrieve(run_id)
    assert run.sync is not None
    return not run.sync.live and run.sync.as_of is not None


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_kill_9_mid_push_and_cut_connections_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    rng = random.Random(14)
    async with production(tmp_path) as remote:
        proxy = Proxy(remote.port, chaos=True)
        await proxy.start()
        url, key, certs = proxy.url, remote.key, remote.certs
        async with forwarding_daemon(tmp_path / "local", url, key, certs) as local:
            tasks = Tasks(local.client)
            triggered: dict[str, int] = {}
            kills = 0
            for burst in range(6):
                for i in range(burst * 100, burst * 100 + 100):
                    triggered[(await tasks.trigger("echo", {"i": i})).id] = i
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                if burst in (1, 3):
                    remote.kill9()  # in the middle of the push of this burst, or just after
                    kills += 1
                    await asyncio.sleep(rng.uniform(0.1, 0.5))
                    remote.start()
            await all_completed(local.client, remote, 600)
            await check_exactly_once(local.client, remote, triggered)
            assert kills == 2 and proxy.cuts > 0
        await proxy.close()


async def test_a_remote_that_does_not_answer_is_named_by_profile_and_url(tmp_path: Path) -> None:
    port = free_port()
    profile = Profile(name="prod", url=f"https://127.0.0.1:{port}", api_key="em_prod_x")
    client = Client(settings_of(profile))
    with pytest.raises(DaemonUnavailable) as caught:
        await Runs(client).list()
    message = str(caught.value)
    assert "profile prod" in message and f"https://127.0.0.1:{port}" in message
    assert "ember dev" not in message


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_both_daemons_killed_mid_push_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """The local daemon is ``ember daemon --sync prod`` (its profile from ``ember login``'s
    file); it and the remote are each killed with -9 while the outbox drains."""
    home = tmp_path / "config"
    async with production(tmp_path) as remote:
        profile = Profile(
            name="prod", url=remote.url, api_key=remote.key, ca_file=str(remote.certs.ca_file)
        )
        save_profile(profile, home / "ember" / "profiles.toml")
        local = SyncingDaemon(tmp_path / "local", home)
        local.start()
        client = Client(ClientSettings(socket_path=local.socket, env="prod"))
        try:
            await wait_ready(client)
            tasks = Tasks(client)
            triggered: dict[str, int] = {}
            for burst in range(4):
                items = [("echo", {"i": i}) for i in range(burst * 100, burst * 100 + 100)]
                for handle, (_, payload) in zip(
                    await tasks.batch_trigger(items), items, strict=True
                ):
                    triggered[handle.id] = payload["i"]
                if burst == 1:
                    local.kill9()  # the outbox is being pushed: it survives, and resumes
                    await client.aclose()
                    local.start()
                    await wait_ready(client)
                if burst == 2:
                    remote.kill9()
                    remote.start()
            await all_completed(client, remote, 400)
            await check_exactly_once(client, remote, triggered)
        finally:
            await client.aclose()
            local.stop()


class SyncingDaemon(DaemonProcess):
    """``ember daemon --sync prod`` as a real child process, profiles under ``home``."""

    def __init__(self, state: Path, home: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        super().__init__(state)
        self.home = home

    def start(self) -> None:
        log = open(self.state / "daemon.out", "ab")  # noqa: SIM115 - handed to the child
        command = [sys.executable, "-m", "ember.cli", "daemon", "--state-dir", str(self.state)]
        command += ["--socket", str(self.socket), "--sync", "prod", "--checkpoint", "park"]
        env = {**os.environ, "XDG_CONFIG_HOME": str(self.home)}
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        log.close()


async def test_a_refused_key_keeps_the_outbox_and_says_why(tmp_path: Path) -> None:
    async with production(tmp_path) as remote:
        url, certs = remote.url, remote.certs
        async with forwarding_daemon(tmp_path / "local", url, "em_prod_wrong", certs) as local:
            run_id = (await Tasks(local.client).trigger("echo", {"i": 1})).id

            async def refused() -> bool:
                run = await Runs(local.client).retrieve(run_id)
                assert run.sync is not None and run.sync.state == "outbox"
                assert run.status is RunStatus.QUEUED, "a refused key must not fail the run"
                return "unknown or revoked" in (run.sync.error or "")

            await eventually(refused)
            assert remote_runs(remote) == []
