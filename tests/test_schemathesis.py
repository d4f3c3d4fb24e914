"""Schemathesis against a real daemon process: no server error, no answer off its schema.

The cases are bounded (a fixed seed, a few per operation) so the suite stays well under a
minute here; a longer exploration is the same command with a larger ``-n``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import eventually
from test_hardening import DaemonProcess, health_over_socket, spawn_daemon

ST = shutil.which("st", path=str(Path(sys.executable).parent))
# Every check on what the daemon answers. Not the strict ones on what it accepts
# (negative_data_rejection, positive_data_acceptance): the schema types a duration as a
# string, and a string that is no duration is rightly a 400.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """``ember daemon`` with TCP, as its own process; its log holds no traceback at the end."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.ember]\ncheckpoint = "park"\n'
    )
    with spawn_daemon(tmp_path, project) as started:
        yield started
    log = started.log.read_text()
    assert "Traceback" not in log, log


@pytest.mark.slow
@pytest.mark.skipif(ST is None, reason="schemathesis is not installed (pip install -e '.[dev]')")
async def test_schemathesis_finds_no_server_error_nor_schema_violation(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    await eventually(lambda: health_over_socket(daemon.socket), timeout_s=60)
    url = f"http://127.0.0.1:{daemon.port}"
    key = (daemon.state / "dev.key").read_text().strip()
    assert ST is not None
    done = await asyncio.to_thread(
        subprocess.run,
        [
            *(ST, "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}"),
            *("--seed", "11", "--max-examples", "12", "--checks", CHECKS, "--workers", "1"),
            # The event streams never end (the realtime ones while what they follow goes on):
            # a request to them could only time out.
            *("--exclude-path", "/api/v1/events", "--request-timeout", "20", "--no-shrink"),
            *("--exclude-path-regex", "^/api/v1/realtime/"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "passed" in done.stdout
