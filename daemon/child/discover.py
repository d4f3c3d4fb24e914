"""Task discovery: import a version's task modules and collect the ``Task`` objects in them.

Tasks are found by scanning module globals, like pytest collects tests, so user code needs no
registry. A project snapshot carries ``.ember/manifest.json`` naming its task directories.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from ember._errors import ConfigError
from ember._task import Task
from ember._types import TaskInfo

MANIFEST = Path(".ember") / "manifest.json"


def task_dirs(code_dir: Path) -> list[str]:
    """The task directories named in a snapshot's manifest."""
    manifest = code_dir / MANIFEST
    if not manifest.exists():
        return ["tasks"]
    dirs = json.loads(manifest.read_text())["dirs"]
    return [str(d) for d in dirs]


def _module_names(code_dir: Path, dirs: list[str]) -> list[str]:
    names: list[str] = []
    for entry in dirs:
        root = (code_dir / entry).resolve()
        if root.is_file() and root.suffix == ".py":
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
        else:
            raise ConfigError(
                f"task directory {entry!r} does not exist in the project: fix `dirs` in "
                "[tool.ember] of pyproject.toml"
            )
        for path in files:
            relative = path.relative_to(code_dir.resolve()).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                names.append(".".join(parts))
    return names


def discover(code_dir: Path) -> tuple[dict[str, Task[object, ..., object]], list[TaskInfo]]:
    """Import every module of the task directories; return the tasks by id and their index.

    Raises:
        ConfigError: two different tasks share an id, or a task directory is missing.
        Exception: whatever a task module raises while importing.
    """
    if str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    found: dict[str, Task[object, ..., object]] = {}
    where: dict[str, str] = {}
    for name in _module_names(code_dir, task_dirs(code_dir)):
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if not isinstance(value, Task):
                continue
            if value.id in found and found[value.id] is not value:
                raise ConfigError(
                    f"task id {value.id!r} is defined twice: in {where[value.id]} and in "
                    f"{name}.{attr}; task ids must be unique"
                )
            if value.id not in found:
                found[value.id] = value
                where[value.id] = f"{name}.{attr}"
    index = [
        TaskInfo(
            id=task.id,
            file_path=where[task.id].rsplit(".", 1)[0].replace(".", "/") + ".py",
            export_name=where[task.id].rsplit(".", 1)[1],
            queue=task.queue.name,
            queue_concurrency_limit=task.queue.concurrency_limit,
            retry=task.retry,
            max_duration_s=task.max_duration_s,
            ttl=task.ttl,
            machine=task.machine,
            description=task.description,
            schedule=getattr(task, "schedule", None),  # set by @schedules.task
        )
        for task in found.values()
    ]
    return found, index
