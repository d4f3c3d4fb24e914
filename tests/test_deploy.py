"""`ember deploy`, `promote`, `versions`, `keys`, `env` and `schedules`, as a user types them.

The deployed project has requirements: a wheel made here (no network), installed by the
daemon into the version's own virtual environment.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import Harness
from test_cli import ember

from ember import Client, ClientSettings, Tasks

TASK = """
from ember import ScheduledPayload, schedules, task

@task(id="which")
async def which(payload: dict) -> dict:
    import sys
    try:
        import embertestpkg
        value = embertestpkg.VALUE
    except ImportError:
        value = None
    return {"value": value, "prefix": sys.prefix, "tag": TAG}

@schedules.task(id="weekly")
async def weekly(payload: ScheduledPayload) -> None:
    return None
"""


def make_wheel(folder: Path, name: str = "embertestpkg", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel, built by hand."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 'from the wheel'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def write_project(root: Path, tag: str, requirements: str | None) -> None:
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "p"\n\n[tool.ember]\ndirs = ["tasks"]\n'
    )
    (root / "tasks" / "__init__.py").write_text("")
    (root / "tasks" / "t.py").write_text(f"TAG = {tag!r}\n" + textwrap.dedent(TASK))
    if requirements is not None:
        (root / "requirements.txt").write_text(requirements)


async def cli(h: Harness, root: Path, *args: str) -> tuple[int, str, str]:
    result = await asyncio.to_thread(ember, h, *args, cwd=root)
    return result.returncode, result.stdout, result.stderr


async def run_in(h: Harness, env: str) -> dict[str, str]:
    client = Client(ClientSettings(socket_path=h.config.api_socket, env=env))
    try:
        output: dict[str, str] = await (await Tasks(client).trigger("which", {})).result(60)
        return output
    finally:
        await client.aclose()


async def test_deploy_skip_promotion_promote_and_versions(harness: Harness, tmp_path: Path) -> None:
    root = tmp_path / "project"
    wheel = make_wheel(tmp_path)
    write_project(root, "v1", f"--no-index\n{wheel}\n")

    code, out, _ = await cli(harness, root, "deploy", "--env", "prod", "--dry-run")
    assert code == 0 and "Would ship 5 files" in out and "requirements.txt" in out
    assert "The build lies in" in out and (root / ".ember" / "tmp").is_dir()
    assert harness.daemon.engine.version_list("prod") == []

    code, out, err = await cli(harness, root, "deploy", "--env", "prod")
    assert code == 0, err
    for step in ("Building the snapshot", "Uploading", "Building version", "Installing"):
        assert step in out, out
    assert "now current" in out
    first = harness.daemon.engine.current["prod"]
    output = await run_in(harness, "prod")
    assert output["value"] == "from the wheel" and output["tag"] == "v1"
    assert Path(output["prefix"]).parent == harness.config.state_dir / "venvs"

    write_project(root, "v2", f"--no-index\n{wheel}\n")
    code, out, err = await cli(harness, root, "deploy", "--env", "prod", "--skip-promotion")
    assert code == 0, err
    assert "without promoting it" in out and "Requirements unchanged" in out
    staged = next(v.id for v in harness.daemon.engine.version_list("prod") if not v.is_current)
    assert (await run_in(harness, "prod"))["tag"] == "v1"
    code, out, _ = await cli(harness, root, "versions", "--env", "prod")
    assert f"* {first}" in out and f"  {staged}" in out
    code, out, _ = await cli(harness, root, "promote", staged, "--env", "prod")
    assert code == 0 and f"{staged} is now current in prod" in out
    assert (await run_in(harness, "prod"))["tag"] == "v2"
    code, out, _ = await cli(harness, root, "versions")
    assert "prod" in out and f"* {staged}" in out

    # Requirements that cannot install fail the version; prod keeps its current one.
    write_project(root, "v3", "--no-index\nnot-a-real-package-ember-test==1.0\n")
    code, out, err = await cli(harness, root, "deploy", "--env", "prod")
    assert code == 1
    assert "pip could not install requirements.txt" in err and "not-a-real-package" in err
    assert harness.daemon.engine.current["prod"] == staged

    write_project(root, "v4", None)
    (root / "requirements.txt").unlink()
    code, out, err = await cli(harness, root, "deploy", "--env", "preview", "--branch", "feat-1")
    assert code == 0, err
    output = await run_in(harness, "preview/feat-1")
    assert output["value"] is None and output["tag"] == "v4"  # no requirements: no venv
    code, _, err = await cli(harness, root, "deploy", "--env", "dev")
    assert code == 1 and "ember dev" in err


async def test_keys_env_and_schedules_commands(harness: Harness, tmp_path: Path) -> None:
    root = tmp_path / "project"
    write_project(root, "v1", None)
    code, out, err = await cli(harness, root, "deploy", "--env", "staging")
    assert code == 0, err

    code, out, err = await cli(harness, root, "keys", "create", "--env", "staging", "--name", "ci")
    assert code == 0 and out.strip().startswith("em_staging_") and "shown only now" in err
    code, out, _ = await cli(harness, root, "keys", "list", "--json")
    (key,) = json.loads(out)["data"]
    assert key["env"] == "staging" and key["name"] == "ci" and out.strip()
    code, out, _ = await cli(harness, root, "keys", "revoke", key["id"])
    assert code == 0
    code, out, _ = await cli(harness, root, "keys", "list")
    assert "revoked" in out

    code, out, _ = await cli(harness, root, "env", "set", "A=1", "TOKEN=s3cret", "-e", "staging")
    assert code == 0
    code, out, _ = await cli(harness, root, "env", "list", "-e", "staging")
    assert out.split() == ["A", "TOKEN"] and "s3cret" not in out
    code, out, _ = await cli(harness, root, "env", "list", "-e", "staging", "--show-values")
    assert "TOKEN=s3cret" in out
    code, out, _ = await cli(harness, root, "env", "unset", "A", "-e", "staging")
    code, out, _ = await cli(harness, root, "env", "list", "-e", "staging")
    assert out.split() == ["TOKEN"]

    args = ("--task", "weekly", "--cron", "0 8 * * 1", "--timezone", "Europe/Paris")
    code, out, err = await cli(harness, root, "schedules", "create", *args, "-e", "staging")
    assert code == 0, err
    schedule_id = out.split()[0]
    code, out, _ = await cli(harness, root, "schedules", "list", "-e", "staging")
    assert schedule_id in out and "IMPERATIVE" in out and "Europe/Paris" in out
    code, out, _ = await cli(harness, root, "schedules", "deactivate", schedule_id, "-e", "staging")
    assert "inactive" in out
    code, out, _ = await cli(harness, root, "schedules", "delete", schedule_id, "-e", "staging")
    assert code == 0
    code, out, _ = await cli(harness, root, "schedules", "list", "-e", "staging")
    assert "no schedules" in out
    code, _, err = await cli(harness, root, "schedules", "create", "--task", "which", "--cron", "x")
    assert code == 1 and "error:" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\n# comment\n\nexport B = two words \n", {"A": "1", "B": "two words"}),
        ("C='it''s'\n", None),
        ("D=\"line\\nbreak\" # note\nE='raw \\n'\nF=x # trailing\n", None),
    ],
)
def test_dotenv_lines(text: str, expected: dict[str, str] | None) -> None:
    from ember import ConfigError
    from ember.cli._dotenv import parse_dotenv

    if text.startswith("C="):
        with pytest.raises(ConfigError, match="line 1"):
            parse_dotenv(text)
        return
    if expected is None:
        expected = {"D": "line\nbreak", "E": "raw \\n", "F": "x"}
    assert parse_dotenv(text) == expected


async def test_deploy_to_a_remote_daemon_through_a_profile(state_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import running_daemon
    from test_api import free_port

    port = free_port()
    async with running_daemon(state_dir, tcp=f"127.0.0.1:{port}") as h:
        key = (await h.daemon.create_key("prod", "laptop")).key
        root = tmp_path / "project"
        write_project(root, "remote", None)
        env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "EMBER_SOCKET": str(tmp_path / "no-daemon-here.sock"),  # only TCP can work
            "NO_COLOR": "1",
        }

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ember.cli", *args],
                capture_output=True,
                text=True,
                env=env,
                cwd=root,
                timeout=120,
            )

        url = f"http://127.0.0.1:{port}"
        added = await asyncio.to_thread(
            run, "profiles", "add", "server", "--url", url, "--api-key", key, "--env", "prod"
        )
        assert added.returncode == 0, added.stderr
        deployed = await asyncio.to_thread(run, "deploy", "--profile", "server")
        assert deployed.returncode == 0, deployed.stderr
        assert "to prod, now current" in deployed.stdout and url in deployed.stdout
        listed = await asyncio.to_thread(run, "versions", "--profile", "server")
        assert listed.stdout.split()[0] == "prod" and "dev" not in listed.stdout.split()
        assert h.daemon.engine.current["prod"] in listed.stdout
        assert (await run_in(h, "prod"))["tag"] == "remote"
