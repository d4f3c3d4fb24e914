"""Profiles and deploys to a remote daemon over TLS: login checks the key, a deploy sends a
content-addressed bundle, and a deploy cut off half-way resumes sending only what is missing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sync_parts import TASKS, Proxy, RemoteDaemon, production

from ember import Call, Client
from ember._admin_types import BuildProgress
from ember._errors import DaemonUnavailable
from ember.cli._project import find_project, snapshot_files
from ember.sync import Profile, settings_of
from ember.sync._bundle import CHUNK_BYTES, plan_bundle, send_bundle

MIB = 1024 * 1024


def make_project(root: Path, assets: int = 4, asset_bytes: int = 3 * MIB // 2) -> Path:
    """A project with the prod tasks and incompressible assets (hex of random bytes)."""
    (root / "tasks").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "pyproject.toml").write_text(
        '[project]\nname = "p"\n\n[tool.ember]\ndirs = ["tasks"]\n'
    )
    for name, text in TASKS.items():
        (root / name).write_text(textwrap.dedent(text))
    for i in range(assets):
        write_asset(root, i, asset_bytes)
    return root


def write_asset(root: Path, i: int, size: int) -> None:
    """``assets/a<i>.py`` of exactly ``size`` bytes."""
    body = secrets.token_hex(size)[: size - 10]
    (root / "assets" / f"a{i}.py").write_text(f'DATA = "{body}"\n')


def ember(
    config_home: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
    )


async def built(client: Client, version_id: str) -> str:
    """Follow a build to its end; return its status."""
    while True:
        call = Call("GET", f"/api/v1/versions/{version_id}/build", BuildProgress)
        progress = await client.request(call)
        if progress.version.status != "BUILDING":
            return progress.version.status
        await asyncio.sleep(0.1)


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[RemoteDaemon]:
    async with production(tmp_path) as daemon:
        yield daemon


@pytest.mark.slow
async def test_login_whoami_deploy_and_logout_with_a_profile(
    remote: RemoteDaemon, tmp_path: Path
) -> None:
    home = tmp_path / "config"
    key = remote.key
    ca = str(remote.certs.ca_file)

    def login(api_key: str) -> subprocess.CompletedProcess[str]:
        args = ("--profile", "prod", "-a", remote.url, "--api-key", api_key, "--ca-file", ca)
        return ember(home, "login", *args)

    wrong = await asyncio.to_thread(login, "em_prod_no")
    assert wrong.returncode == 1 and "unknown or revoked" in wrong.stderr
    assert f"profile prod, {remote.url}" in wrong.stderr
    assert not (home / "ember" / "profiles.toml").exists(), "a key that failed was saved"

    done = await asyncio.to_thread(login, key)
    assert done.returncode == 0, done.stderr
    assert "as environment prod" in done.stdout
    profiles = home / "ember" / "profiles.toml"
    assert stat.S_IMODE(profiles.stat().st_mode) == 0o600

    who = await asyncio.to_thread(ember, home, "whoami")
    assert who.returncode == 0, who.stderr
    assert f"profile prod: {remote.url} (TLS), environment prod" in who.stdout

    untrusted = await asyncio.to_thread(
        ember, home, "login", "--profile", "other", "-a", remote.url, "--api-key", key
    )
    assert untrusted.returncode == 1
    assert "profile other" in untrusted.stderr and "certificate" in untrusted.stderr

    plain = await asyncio.to_thread(
        ember, home, "login", "--profile", "lan", "-a", "http://192.0.2.1:1", "--api-key", key
    )
    assert "plain HTTP to another machine" in plain.stderr

    project = make_project(tmp_path / "project", assets=2, asset_bytes=MIB)
    first = await asyncio.to_thread(ember, home, "deploy", "--profile", "prod", cwd=project)
    assert first.returncode == 0, first.stderr
    assert "Deployed" in first.stdout and "(0.0 KB already there)" in first.stdout

    write_asset(project, 1, MIB)
    again = await asyncio.to_thread(ember, home, "deploy", "--profile", "prod", cwd=project)
    assert again.returncode == 0, again.stderr
    assert "Sending 1.0 MB of" in again.stdout, again.stdout

    out = await asyncio.to_thread(ember, home, "logout")
    assert out.returncode == 0 and "logged out of profile prod" in out.stdout
    gone = await asyncio.to_thread(ember, home, "whoami", "--profile", "prod")
    assert gone.returncode == 1 and "no profile named 'prod'" in gone.stderr


@pytest.mark.slow
async def test_an_interrupted_deploy_resumes_sending_only_what_is_missing(
    remote: RemoteDaemon, tmp_path: Path
) -> None:
    key = remote.key
    ca = str(remote.certs.ca_file)
    proxy = Proxy(remote.port)
    await proxy.start()
    cut = Client(settings_of(Profile(name="cut", url=proxy.url, api_key=key, ca_file=ca)))
    direct = Client(settings_of(Profile(name="prod", url=remote.url, api_key=key, ca_file=ca)))
    try:
        project = make_project(tmp_path / "project")
        files = snapshot_files(find_project(project))
        plan = await plan_bundle(cut, files)
        assert plan.to_send_bytes == plan.total_bytes > 6 * MIB
        # Cut everything once 2.6 MiB went up: the first blob (1.5 MiB) and the first chunk
        # of the second arrive, the rest does not.
        proxy.budget = proxy.upstream_bytes + 26 * MIB // 10
        with pytest.raises(DaemonUnavailable, match="profile cut"):
            await send_bundle(cut, plan, promote=True)

        resumed = await plan_bundle(direct, files)
        held = plan.to_send_bytes - resumed.to_send_bytes
        assert 3 * MIB // 2 + CHUNK_BYTES <= held < 26 * MIB // 10
        partial = [m for m in resumed.missing.missing if m.have_bytes]
        assert [m.have_bytes for m in partial] == [CHUNK_BYTES], "the cut blob resumes mid-way"
        sent: list[int] = []
        info = await send_bundle(direct, resumed, promote=True, progress=sent.append)
        assert sum(sent) == resumed.to_send_bytes
        assert await built(direct, info.id) == "READY"

        write_asset(project, 2, 3 * MIB // 2)
        changed = await plan_bundle(direct, snapshot_files(find_project(project)))
        assert changed.to_send_bytes == 3 * MIB // 2, "more than the changed file would travel"
    finally:
        await proxy.close()
        for client in (cut, direct):
            await client.aclose()
            client.close()
