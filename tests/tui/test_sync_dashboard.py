"""The dashboard on production: through the local daemon's mirror (``ember tui --env prod``
with prod forwarded), and on the remote itself (``ember tui --profile prod``), over TLS."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import eventually
from sync_parts import forwarding_daemon, production
from textual.pilot import Pilot

from ember import ClientSettings, Runs, RunStatus, Tasks
from ember.sync import Profile, settings_of
from ember.tui import EmberApp
from ember.tui._run_table import RunTable


async def until(pilot: Pilot[Any], check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the screen did not get there"
        await pilot.pause(0.05)


def rows(app: EmberApp) -> list[Any]:
    table = app.screen.query_one(RunTable)
    return [table.rows[i] for i in range(len(table.rows))]


def status_line(app: EmberApp) -> str:
    return str(app.screen.query_one("#runs-status").render())


async def test_the_dashboard_shows_production_through_the_mirror_and_with_a_profile(
    tmp_path: Path,
) -> None:
    async with production(tmp_path) as remote:
        key, certs = remote.key, remote.certs
        async with forwarding_daemon(tmp_path / "local", remote.url, key, certs) as local:
            ids = [(await Tasks(local.client).trigger("echo", {"i": i})).id for i in range(3)]
            for i, run_id in enumerate(ids):
                assert (await Runs(local.client).poll(run_id, timeout_s=60)).output_as(int) == i

            mirror = EmberApp(ClientSettings(socket_path=local.config.api_socket, env="prod"))
            async with mirror.run_test(size=(140, 40)) as pilot:
                await until(pilot, lambda: len(rows(mirror)) == 3)
                assert [r.id for r in rows(mirror)] == ids[::-1]
                assert {r.status for r in rows(mirror)} == {RunStatus.COMPLETED}
                assert f"mirror of prod ({remote.url}): live" in status_line(mirror)
                # A run triggered now shows up live, first in the outbox, then completed.
                fresh = (await Tasks(local.client).trigger("echo", {"i": 9})).id
                await until(pilot, lambda: len(rows(mirror)) == 4)
                await until(pilot, lambda: rows(mirror)[0].status is RunStatus.COMPLETED)
                assert rows(mirror)[0].id == fresh

            remote.stop()

            async def noticed() -> bool:
                run = await Runs(local.client).retrieve(ids[0])
                return run.sync is not None and not run.sync.live

            await eventually(noticed)
            offline = EmberApp(ClientSettings(socket_path=local.config.api_socket, env="prod"))
            async with offline.run_test(size=(140, 40)) as pilot:
                await until(pilot, lambda: len(rows(offline)) == 4)
                await until(pilot, lambda: "offline, as of" in status_line(offline))

            remote.start()
            await remote.ready()
            profile = Profile(name="prod", url=remote.url, api_key=key, ca_file=str(certs.ca_file))
            direct = EmberApp(settings_of(profile))
            async with direct.run_test(size=(140, 40)) as pilot:
                await until(pilot, lambda: len(rows(direct)) == 4)
                assert "mirror of" not in status_line(direct)
