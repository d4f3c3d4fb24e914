"""The user's project: ``[tool.ember]`` in pyproject.toml, and version snapshots of its code.

A snapshot is a gzipped tar of the project's Python files and requirements (virtual
environments, caches, VCS and hidden folders left out) plus ``.ember/manifest.json`` naming
the task directories. The daemon content-addresses it, so an unchanged tree is no new version.
"""

from __future__ import annotations

import io
import json
import tarfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember._errors import ConfigError

SKIP_DIRS = frozenset({"__pycache__", "node_modules", "build", "dist", "venv", "env"})
INCLUDE_SUFFIXES = frozenset({".py", ".pyi", ".json", ".toml", ".txt", ".cfg", ".yaml", ".yml"})
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Project:
    """A project with ``[tool.ember]`` settings.

    Attributes:
        root: the folder holding pyproject.toml.
        dirs: task directories, relative to the root.
        settings: every key of ``[tool.ember]``, for the daemon's configuration.
    """

    root: Path
    dirs: tuple[str, ...] = ("tasks",)
    settings: dict[str, Any] = field(default_factory=dict)


def find_project(start: Path) -> Project:
    """The project at or above ``start``.

    Raises:
        ConfigError: no pyproject.toml with ``[tool.ember]`` is found, or it is malformed.
    """
    for folder in (start.resolve(), *start.resolve().parents):
        pyproject = folder / "pyproject.toml"
        if not pyproject.is_file():
            continue
        try:
            data = tomllib.loads(pyproject.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{pyproject} is not valid TOML: {exc}") from None
        settings = data.get("tool", {}).get("ember")
        if settings is None:
            continue
        dirs = settings.get("dirs", ["tasks"])
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs) or not dirs:
            raise ConfigError(f"{pyproject}: [tool.ember] dirs must be a list of folder names")
        return Project(root=folder, dirs=tuple(dirs), settings=dict(settings))
    raise ConfigError(
        f"no pyproject.toml with a [tool.ember] table at or above {start}: run `ember init` "
        "in your project, or cd into it"
    )


def _files(root: Path) -> list[Path]:
    found: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                continue
            if entry.is_dir():
                hidden = entry.name.startswith(".")
                if hidden or entry.name in SKIP_DIRS or entry.name.endswith(".egg-info"):
                    continue
                if (entry / "pyvenv.cfg").exists():
                    continue  # a virtual environment
                stack.append(entry)
            elif entry.suffix in INCLUDE_SUFFIXES and not entry.name.startswith("."):
                found.append(entry)
    return sorted(found)


def snapshot(project: Project) -> tuple[bytes, int]:
    """A gzipped tar of the project's code and its manifest; returns it and its file count.

    Raises:
        ConfigError: a task directory is missing, or the snapshot is too large.
    """
    for entry in project.dirs:
        if not (project.root / entry).exists():
            raise ConfigError(
                f"task directory {entry!r} does not exist in {project.root}: create it or fix "
                "`dirs` in [tool.ember]"
            )
    files = snapshot_files(project)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, data in files:
            _add(tar, name, data)
    archive = buffer.getvalue()
    if len(archive) > MAX_SNAPSHOT_BYTES:
        raise ConfigError(
            f"the project snapshot is {len(archive)} bytes: keep data files out of the project "
            "folder or in a hidden one"
        )
    return archive, len(files) - 1


def snapshot_files(project: Project) -> list[tuple[str, bytes]]:
    """The files a version of the project is made of, by path, the manifest last."""
    files = [
        (str(path.relative_to(project.root)), path.read_bytes()) for path in _files(project.root)
    ]
    described: dict[str, Any] = {"dirs": list(project.dirs)}
    requirements = project.settings.get("requirements")
    if requirements:
        described["requirements"] = str(requirements)
    files.append((".ember/manifest.json", json.dumps(described, sort_keys=True).encode()))
    return files


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


STARTER_TASK = '''"""Example tasks.

Trigger one with `ember trigger hello-world --payload '{"name": "Ada"}'`.
"""

from ember import Context, logger, task


@task(id="hello-world")
async def hello_world(payload: dict[str, str], ctx: Context) -> dict[str, str]:
    """Greet someone, durably."""
    logger.info("greeting", name=payload.get("name"), attempt=ctx.attempt)
    return {"message": f"Hello, {payload.get('name', 'world')}!"}
'''


def init_project(root: Path) -> list[str]:
    """Add ``[tool.ember]`` and a starter task to a project; returns what was done.

    Raises:
        ConfigError: pyproject.toml exists but is not valid TOML.
    """
    done: list[str] = []
    pyproject = root / "pyproject.toml"
    if pyproject.exists():
        text = pyproject.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{pyproject} is not valid TOML: {exc}") from None
        if "ember" not in data.get("tool", {}):
            sep = "" if text.endswith("\n") or not text else "\n"
            pyproject.write_text(text + sep + '\n[tool.ember]\ndirs = ["tasks"]\n')
            done.append("added [tool.ember] to pyproject.toml")
    else:
        pyproject.write_text(
            f'[project]\nname = "{root.resolve().name}"\nversion = "0.1.0"\n\n'
            '[tool.ember]\ndirs = ["tasks"]\n'
        )
        done.append("created pyproject.toml with [tool.ember]")
    tasks_dir = root / "tasks"
    if not tasks_dir.exists():
        tasks_dir.mkdir()
        (tasks_dir / "__init__.py").write_text("")
        (tasks_dir / "example.py").write_text(STARTER_TASK)
        done.append("created tasks/example.py with the task hello-world")
    return done
