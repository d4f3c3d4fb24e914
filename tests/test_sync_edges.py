"""The edges of sync, on one in-process daemon: resuming the event stream, bundle uploads
refused with the reason, TLS and sync settings that cannot work, and bad input to a
forwarded environment."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Clock, Harness, running_daemon
from sync_parts import make_certificates

from ember import (
    BadRequest,
    Call,
    Client,
    ClientSettings,
    ConfigError,
    Conflict,
    Runs,
    Tasks,
    Wait,
)
from ember._bundle_types import BlobProgress, BundleFile, BundleRequest, MissingBlobs
from ember._types import Event, GapEvent, RunEvent, RunStatus, RunSummary, VersionInfo
from ember.cli._project import Project
from ember.cli._settings import daemon_config
from ember.daemon import Daemon, DaemonConfig
from ember.daemon.config import SyncTarget
from ember.sync import Profile, save_profile


async def frames(client: Client, last_event_id: str | None, count: int) -> list[tuple[Any, Event]]:
    """The first ``count`` events of a resumable stream."""
    got: list[tuple[Any, Event]] = []
    stream = client.event_frames({"resume": "1"}, last_event_id)
    async for frame in stream:
        got.append(frame)
        if len(got) == count:
            break
    await stream.aclose()
    return got


async def test_a_resumed_stream_replays_what_was_missed_or_says_there_is_a_gap(
    harness: Harness,
) -> None:
    from conftest import make_archive

    files = {
        "tasks/__init__.py": "",
        "tasks/t.py": """
            from ember import task

            @task(id="t")
            async def t(p: dict) -> int:
                return 1
        """,
    }
    await harness.daemon.register_version("dev", make_archive(files), promote=True)
    ((first_id, gap),) = await frames(harness.client, None, 1)
    assert isinstance(gap, GapEvent), "a stream with nothing to resume from starts with a gap"
    # Nobody listens now; the hub keeps dev's events for the mirror that will come back.
    run_id = (await Tasks(harness.client).trigger("t", {})).id
    await harness.wait(run_id)
    missed = await frames(harness.client, first_id, 3)
    assert all(isinstance(e, RunEvent) and e.run.id == run_id for _, e in missed)
    ids = [event_id for event_id, _ in missed]
    assert ids == sorted(ids, key=lambda i: int(i.rsplit("-", 1)[1])) and first_id not in ids
    ((_, other),) = await frames(harness.client, "0000-5", 1)
    assert isinstance(other, GapEvent) and "no longer kept" in other.reason


async def test_bundle_uploads_are_refused_with_the_reason(harness: Harness) -> None:
    client = harness.client
    data = b"print('hello')\n" * 100
    sha = hashlib.sha256(data).hexdigest()

    def put(sha256: str, body: bytes, offset: int, size: int) -> Call[BlobProgress]:
        params = {"offset": offset, "size": size}
        path = f"/api/v1/bundles/blobs/{sha256}"
        return Call("PUT", path, BlobProgress, body=body, params=params)

    with pytest.raises(BadRequest, match="is not a SHA-256"):
        await client.request(put("nothex", data, 0, len(data)))
    assert not (await client.request(put(sha, data[:500], 0, len(data)))).complete
    with pytest.raises(Conflict, match="resume at offset 500, not 0"):
        await client.request(put(sha, data, 0, len(data)))
    with pytest.raises(BadRequest, match="runs past its size"):
        await client.request(put(sha, data, 500, len(data)))
    done = await client.request(put(sha, data[500:], 500, len(data)))
    assert done.complete and done.have_bytes == len(data)

    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(BadRequest, match="hash to"):
        await client.request(put(wrong, data, 0, len(data)))
    request = BundleRequest(files=[BundleFile(path="tasks/a.py", sha256=wrong, size=5)])
    body = msgspec.json.encode(request)
    missing = await client.request(Call("POST", "/api/v1/bundles/missing", MissingBlobs, body=body))
    assert [m.sha256 for m in missing.missing] == [wrong]
    with pytest.raises(Conflict, match=r"tasks/a\.py: blob .* is not uploaded yet"):
        await client.request(Call("POST", "/api/v1/bundles/deploy", VersionInfo, body=body))


async def test_tls_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    certs = await asyncio.to_thread(make_certificates, tmp_path / "tls")
    cases = [
        ({"tls_cert": certs.cert_file}, "go together"),
        ({"tls_cert": certs.cert_file, "tls_key": certs.key_file}, "add --tcp"),
        (
            {"tls_cert": certs.ca_file, "tls_key": certs.key_file, "tcp": "127.0.0.1:0"},
            "matching unencrypted PEM key",
        ),
        (
            {"tls_cert": tmp_path / "no.pem", "tls_key": certs.key_file, "tcp": "127.0.0.1:0"},
            "does not exist",
        ),
    ]
    for i, (settings, message) in enumerate(cases):
        state = tmp_path / f"state{i}"
        config = DaemonConfig(state_dir=state, socket_path=state / "api.sock", **settings)
        daemon = Daemon(config)
        with pytest.raises(ConfigError, match=message):
            await daemon.start()
        await daemon.stop()


def test_sync_settings_name_the_missing_profile_and_a_wrong_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    project = Project(root=tmp_path, dirs=("tasks",), settings={"sync": {"prod": "prod"}})
    with pytest.raises(ConfigError, match="profile 'prod', which does not exist"):
        daemon_config(project)
    save_profile(Profile(name="prod", url="https://h:1", api_key="em_staging_x", env="staging"))
    with pytest.raises(ConfigError, match="holds a key of environment staging, not prod"):
        daemon_config(project)
    with pytest.raises(ConfigError, match="maps environments to profiles"):
        daemon_config(Project(root=tmp_path, dirs=("tasks",), settings={"sync": ["prod"]}))
    save_profile(Profile(name="prod", url="https://h:1/", api_key="em_prod_x", env="prod"))
    (target,) = daemon_config(project).sync
    assert (target.env, target.url, target.api_key) == ("prod", "https://h:1", "em_prod_x")


async def test_bad_input_to_a_forwarded_environment_is_a_clear_4xx(tmp_path: Path) -> None:
    target = SyncTarget(env="prod", profile="prod", url="https://127.0.0.1:9", api_key="k")
    async with running_daemon(tmp_path / "state", sync=(target,)) as harness:
        prod = Client(ClientSettings(socket_path=harness.config.api_socket, env="prod"))
        try:
            with pytest.raises(BadRequest, match=r"options\.delay"):
                await Tasks(prod).trigger("t", {}, delay="soon")
            with pytest.raises(BadRequest, match="is not a run status"):
                await prod.request(
                    Call("GET", "/api/v1/runs", dict[str, Any], params={"status": "DONE"})
                )
            from ember import NotFound, Runs

            with pytest.raises(NotFound, match="not in the mirror of prod"):
                await Runs(prod).retrieve("run_nope")
            handle = await Tasks(prod).trigger("t", {}, idempotency_key="once")
            again = await Tasks(prod).trigger("t", {}, idempotency_key="once")
            assert again.id == handle.id and again.is_cached
        finally:
            await prod.aclose()


async def test_a_forwarded_environment_keeps_the_daemons_clock(tmp_path: Path) -> None:
    # A daemon whose clock is a day ahead of the host's, its remote away: what it accepts for
    # the remote (a run in the outbox, a token completion) is stamped with its clock.
    clock = Clock()
    clock.advance(86400)
    target = SyncTarget(env="prod", profile="prod", url="https://127.0.0.1:9", api_key="k")
    async with running_daemon(tmp_path / "state", clock=clock, sync=(target,)) as harness:
        prod = Client(ClientSettings(socket_path=harness.config.api_socket, env="prod"))
        try:
            handle = await Tasks(prod).trigger("t", {})
            run = await Runs(prod).retrieve(handle.id)
            assert run.sync is not None and run.sync.state == "outbox"
            assert 0 <= clock() - run.created_at.timestamp() < 60
            token = await Wait(prod).complete_token("waitpoint_later", {"ok": True})
            assert token.status == "WAITING"
            assert 0 <= clock() - token.created_at.timestamp() < 60
        finally:
            await prod.aclose()


async def test_a_stream_that_ends_with_its_last_events_is_followed_again(tmp_path: Path) -> None:
    """Events and the stream's end read together: the link applies them and reconnects from
    the last one. (It used to take the end for one more event, drop it, and wait forever:
    a mirror that froze after the remote restarted while events were in flight.)"""
    certs = make_certificates(tmp_path / "tls")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certs.cert_file, certs.key_file)
    now = datetime.now(UTC)
    burst = b"".join(
        b"id: boot-%d\ndata: %s\n\n"
        % (
            i,
            msgspec.json.encode(
                RunEvent(
                    run=RunSummary(
                        id=f"run_remote{i}",
                        task_id="echo",
                        status=RunStatus.QUEUED,
                        env="prod",
                        created_at=now,
                        updated_at=now,
                    )
                )
            ),
        )
        for i in (1, 2, 3)
    )
    resumed_from: list[str | None] = []

    async def remote(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The remote's event stream, ending right after a burst; anything else a 503."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        if head.startswith("GET /api/v1/events"):
            last = [h for h in head.split("\r\n") if h.lower().startswith("last-event-id:")]
            resumed_from.append(last[0].split(":", 1)[1].strip() if last else None)
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(burst), burst)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
        else:
            writer.write(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(remote, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    target = SyncTarget(
        env="prod",
        profile="prod",
        url=f"https://127.0.0.1:{port}",
        api_key="k",
        ca_file=certs.ca_file,
    )
    try:
        async with running_daemon(tmp_path / "local", sync=(target,)):
            for _ in range(200):
                if len(resumed_from) >= 2:
                    break
                await asyncio.sleep(0.05)
    finally:
        server.close()
    assert resumed_from[:2] == [None, "boot-3"], "the link reconnects after the last event"


async def test_a_link_woken_as_it_is_closed_still_stops(tmp_path: Path) -> None:
    """Work arriving in the same instant as the daemon's stop must not keep a link's loops
    alive. (On Python 3.11 `asyncio.wait_for` returns the awaited result when its task is
    cancelled just as the result arrives, dropping the cancel: the push loop then ran on and
    the daemon's stop waited for it forever.)"""
    target = SyncTarget(env="prod", profile="prod", url="https://127.0.0.1:9", api_key="k")
    async with running_daemon(tmp_path / "state", sync=(target,)) as harness:
        sync = harness.daemon.sync
        assert sync is not None
        link = sync.links["prod"]  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)  # the push loop is waiting for work
        link.wake()
        closing = asyncio.create_task(link.close())
        await asyncio.wait({closing}, timeout=3)
        assert closing.done(), "the link's loops did not stop"
        await closing
