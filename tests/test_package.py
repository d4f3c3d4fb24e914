"""Packaging guards: one `ember` namespace, a complete public surface, a light import."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import ember

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "sdk": "ember",
    "daemon": "ember.daemon",
    "tui": "ember.tui",
    "cli": "ember.cli",
    "sync": "ember.sync",
}


def test_every_package_on_disk_ships_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    on_disk = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *relative.parts]))
    assert on_disk == set(config["packages"])


def test_no_root_folder_is_importable_by_its_bare_name() -> None:
    for folder in FOLDERS:
        code = (
            "import importlib.util, sys; "
            f"sys.exit(importlib.util.find_spec({folder!r}) is not None)"
        )
        # Run from the repository root, where a stray path entry would expose the folder.
        result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True)
        assert result.returncode == 0, f"`import {folder}` must not find Ember's folder"


def test_all_is_complete_and_sorted() -> None:
    public = {name for name in dir(ember) if not name.startswith("_")}
    assert sorted(ember.__all__) == ember.__all__
    assert public <= set(ember.__all__) | {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    for name in ember.__all__:
        assert getattr(ember, name) is not None


def test_importing_ember_loads_no_daemon_tui_or_server() -> None:
    code = (
        "import sys, ember; from ember import task, runs, logger;"
        "heavy = [m for m in sys.modules if m.startswith(('ember.daemon', 'ember.tui', 'textual',"
        " 'uvicorn', 'starlette', 'uvloop'))]; print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_cli_loads_no_server_until_a_command_needs_one() -> None:
    # `ember runs list` and friends only talk to a daemon: they start in a third of the time
    # without uvicorn, Starlette and the engine.
    code = (
        "import sys, ember.cli._app;"
        "heavy = [m for m in sys.modules if m.startswith(('ember.daemon.api.server',"
        " 'ember.daemon.engine.core', 'ember.tui', 'textual', 'uvicorn', 'starlette'))];"
        " print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
