"""Actions on mirrored runs go to the remote through the outbox: cancel, replay, and token
completion, online or not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Clock, eventually
from sync_parts import forwarding_daemon, production
from test_sync import remote_runs

from ember import Call, Client, Runs, RunStatus, Tasks, Wait
from ember._types import VersionList
from ember.sync._link import sync_key


async def mirrored_status(client: Client, run_id: str, status: RunStatus) -> bool:
    run = await Runs(client).retrieve(run_id)
    return run.status is status and run.sync is not None and run.sync.state == "mirrored"


def cli(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_SOCKET": socket, "NO_COLOR": "1"}
    command = [sys.executable, "-m", "ember.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


async def _status_is(client: Client, run_id: str, status: RunStatus) -> bool:
    return (await Runs(client).retrieve(run_id)).status is status


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_cancel_replay_and_tokens_reach_the_remote_through_the_outbox(
    tmp_path: Path,
) -> None:
    # The local daemon's clock is a day ahead of the host's (and the remote's): the mirror
    # says how fresh its rows are by the local clock.
    clock = Clock()
    clock.advance(86400)
    async with production(tmp_path) as remote:
        url, key, certs = remote.url, remote.key, remote.certs
        async with forwarding_daemon(tmp_path / "local", url, key, certs, clock=clock) as local:
            runs, tasks = Runs(local.client), Tasks(local.client)

            # A token completed while production is down: sent when it is back.
            owner = remote.owner()
            token = await Wait(owner).create_token()
            await owner.aclose()
            waiting = (await tasks.trigger("approve", {"token": token.id})).id
            await eventually(lambda: mirrored_status(local.client, waiting, RunStatus.WAITING))
            listed = Call("GET", "/api/v1/versions", VersionList)
            online = await local.client.request(listed)
            assert [v.env for v in online.data] == ["prod"] and online.data[0].is_current
            remote.stop()
            # Versions are read through to production, and kept for when it is away.
            offline = await local.client.request(listed)
            assert [v.id for v in offline.data] == [v.id for v in online.data]
            await Wait(local.client).complete_token(token.id, {"approved": True})
            remote.start()
            done = await runs.poll(waiting, timeout_s=120)
            assert done.status is RunStatus.COMPLETED and done.output_as() == {"approved": True}

            # Cancel a run executing on the remote.
            slow = (await tasks.trigger("slow", {})).id
            await eventually(lambda: mirrored_status(local.client, slow, RunStatus.EXECUTING))
            await runs.cancel(slow)
            await eventually(lambda: mirrored_status(local.client, slow, RunStatus.CANCELED))

            # Cancel a run still in the outbox: dropped if no send was tried yet, else the
            # cancel follows it; either way it never runs to its end.
            remote.stop()
            unsent = (await tasks.trigger("slow", {})).id
            await runs.cancel(unsent)
            remote.start()
            await eventually(
                lambda: _status_is(local.client, unsent, RunStatus.CANCELED), timeout_s=60
            )

            # Replay a mirrored run: a new local run, one new remote run with its payload.
            echo = (await tasks.trigger("echo", {"i": 7})).id
            assert (await runs.poll(echo, timeout_s=120)).output_as(int) == 7
            replay = await runs.replay(echo)
            assert replay.id != echo
            again = await runs.poll(replay.id, timeout_s=120)
            assert again.status is RunStatus.COMPLETED and again.output_as(int) == 7

            statuses = {key: status for _, key, status in remote_runs(remote)}
            assert statuses.get(sync_key(unsent), "CANCELED") == "CANCELED"
            made = {sync_key(i) for i in (waiting, slow, echo, replay.id)}
            assert made <= statuses.keys() <= made | {sync_key(unsent)}
            assert len(remote_runs(remote)) == len(statuses), "a run reached the remote twice"

            # The command line shows the mirror and says how fresh it is.
            socket = str(local.config.api_socket)
            listed = await asyncio.to_thread(cli, socket, "runs", "list", "--env", "prod")
            assert f"mirror of prod ({url}): live" in listed.stdout, listed.stderr
            fresh = (await runs.retrieve(echo)).sync
            assert fresh is not None and fresh.live and fresh.as_of is not None
            assert 0 <= clock() - fresh.as_of.timestamp() < 60
            shown = await asyncio.to_thread(cli, socket, "runs", "show", echo, "--env", "prod")
            assert f"sync mirrored, remote {again.sync.remote_id}" not in shown.stdout
            assert "sync mirrored, remote run_" in shown.stdout, shown.stderr
