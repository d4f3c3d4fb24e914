"""Per-version virtual environments: a version's requirements, installed once per content.

A version whose snapshot holds requirements (``requirements.txt`` at the project root, or the
file ``requirements`` in ``[tool.ember]`` names) runs on a virtual environment of its own,
``<state>/venvs/<hash>``, where the hash covers the requirements' bytes and the daemon's
Python. Identical requirements share one environment, so `ember dev` reloads that leave them
alone cost nothing, and a version without requirements runs on the daemon's own Python.

The environment sees the daemon's packages (Ember and its dependencies) *after* its own: a
``.pth`` file appends the daemon's site directories, so a requirement pinning another
version of a package wins, and pip skips what the daemon already provides (no download).

It is built in place and a marker file is written last: a directory without the marker is a
failed or interrupted build, removed and built again. A failed install raises
:class:`VenvFailed` with pip's own message, and the version fails rather than half-installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import site
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from ember._errors import EmberError
from ember.daemon.child.discover import MANIFEST

READY_MARKER = ".ember-ready"
DEFAULT_REQUIREMENTS = "requirements.txt"
# How much of pip's output a failed version keeps as its error.
_ERROR_TAIL_LINES = 40


class VenvFailed(EmberError):
    """Installing a version's requirements failed; the message carries pip's output."""


def requirements_file(code_dir: Path) -> Path | None:
    """The version's requirements file, or None when it has none (or only comments)."""
    name = DEFAULT_REQUIREMENTS
    manifest = code_dir / MANIFEST
    if manifest.exists():
        name = json.loads(manifest.read_text()).get("requirements") or DEFAULT_REQUIREMENTS
    path = code_dir / name
    if not path.is_file():
        return None
    lines = (line.strip() for line in path.read_text().splitlines())
    return path if any(line and not line.startswith("#") for line in lines) else None


def venv_dir(state_dir: Path, requirements: Path) -> Path:
    """Where the environment for these requirements lives."""
    digest = hashlib.sha256()
    digest.update(requirements.read_bytes())
    digest.update(f"\0{sys.version}\0{sys.executable}".encode())
    return state_dir / "venvs" / digest.hexdigest()[:24]


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def python_for(state_dir: Path, code_dir: str) -> str:
    """The interpreter a version's zygote starts with."""
    requirements = requirements_file(Path(code_dir))
    if requirements is None:
        return sys.executable
    venv = venv_dir(state_dir, requirements)
    if (venv / READY_MARKER).exists():
        return str(_python(venv))
    # Built once but deleted since: the daemon's Python, whose imports may then fail loudly.
    return sys.executable


def _daemon_site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _chain_to_daemon(venv: Path) -> None:
    """Let the environment import the daemon's packages, after its own."""
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    lines = [f"import site; site.addsitedir({d!r})" for d in _daemon_site_dirs()]
    (Path(purelib) / "_ember_daemon_site.pth").write_text("\n".join(lines) + "\n")


async def _run(argv: list[str], cwd: Path, say: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run a command, passing each output line to ``say``; return its status and output."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    assert process.stdout is not None
    try:
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                output.append(line)
                say(line)
        return await process.wait(), output
    finally:
        if process.returncode is None:  # cancelled: the daemon is stopping
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def ensure_venv(state_dir: Path, code_dir: Path, say: Callable[[str], None]) -> str:
    """Build (or reuse) the version's environment; return the interpreter to run it with.

    Raises:
        VenvFailed: the environment could not be created or pip failed.
    """
    requirements = requirements_file(code_dir)
    if requirements is None:
        return sys.executable
    venv = venv_dir(state_dir, requirements)
    if (venv / READY_MARKER).exists():
        say(f"Requirements unchanged: using the virtual environment {venv}")
        return str(_python(venv))
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"Creating a virtual environment for {requirements.name} in {venv}")
    status, output = await _run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], code_dir, say
    )
    if status != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise VenvFailed("creating the virtual environment failed:\n" + "\n".join(output))
    _chain_to_daemon(venv)
    say(f"Installing {requirements.name}…")
    # The daemon's pip installs into the environment (`--python`), which has none of its own.
    status, output = await _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(_python(venv)),
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-r",
            str(requirements),
        ],
        code_dir,
        say,
    )
    if status != 0:
        shutil.rmtree(venv, ignore_errors=True)
        tail = "\n".join(output[-_ERROR_TAIL_LINES:])
        raise VenvFailed(
            f"pip could not install {requirements.name} (exit status {status}):\n{tail}"
        )
    (venv / READY_MARKER).write_text(requirements.read_text())
    say(f"Requirements installed in {time.monotonic() - started:.1f}s")
    return str(_python(venv))
