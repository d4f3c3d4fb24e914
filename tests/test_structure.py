"""The daemon's structure, read from its source: imports, sizes, where SQL lives.

The rules are the ones docs/architecture.md states for daemon/: no import cycle (imports under
``TYPE_CHECKING`` and inside functions count: they are the same coupling, deferred), each
package imports only the layers below it (so child/ imports none of the engine, the store or
the API, and procs/ none of the engine), no module over 400 lines, SQL only in
store/, no ``Any`` on ``ActiveRun``, no ``hasattr`` in ``Daemon.stop``.

Where the code does not meet a rule yet, the rule's ``ALLOWED_*`` holds today's violations.
The lists may only shrink: a violation that is not listed fails, and so does a listed one that
is gone (remove it from the list, so the list stays the truth).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
ROOT_NAME = "ember.daemon"
MAX_LINES = 400

# What each package may import of the daemon (besides itself): the layers, bottom up. model.py
# holds the records the store, procs/ and the engine share (runs and run processes point at
# each other); it and child/ take only the worker channel's wire format from procs/.
MAY_IMPORT = {
    "model": {"procs"},
    "store": {"model"},
    "config": {"store"},
    "child": {"procs"},
    "procs": {"config", "model", "store"},
    "engine": {"config", "model", "procs", "store"},
    "builds": {"child", "config", "engine", "model", "procs", "store"},
    "ops": {"config", "engine", "model", "procs", "store"},
    "api": {"builds", "config", "engine", "model", "ops", "procs", "store"},
}
# The parts of procs/ that model.py and child/ may import: the wire format, a leaf.
WIRE_FORMAT = f"{ROOT_NAME}.procs.protocol"
# The start of a string that is a statement or a clause of one. Upper case only: prose in
# docstrings and messages is not SQL.
SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|PRAGMA|WHERE|AND|OR|ORDER BY|"
    r"GROUP BY|VALUES|BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|ON CONFLICT|RETURNING)\s"
)
DB_CALLS = {"execute", "executemany", "executescript"}


def module_name(path: Path) -> str:
    parts = path.relative_to(DAEMON).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((ROOT_NAME, *parts))


def short(name: str) -> str:
    return name.removeprefix(ROOT_NAME + ".")


@cache
def modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(DAEMON.rglob("*.py")):
        if "__pycache__" not in path.parts:
            found[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return found


def imported(name: str, tree: ast.Module) -> Iterator[str]:
    """Every module of the daemon that `name` imports, wherever in the module the import is."""
    known = modules()
    package = name if known[name][0].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import module` imports the module; `from module import name` the
            # module only.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    return {name: set(imported(name, tree)) for name, (_, tree) in modules().items()}


def cycles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(short(m) for m in component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def check_allowlist(found: set[str], allowed: set[str], rule: str) -> None:
    new, gone = sorted(found - allowed), sorted(allowed - found)
    assert not new, f"{rule}: {new} (fix them; the allowlist may only shrink)"
    assert not gone, f"{rule}: {gone} no longer break the rule: remove them from the allowlist"


def test_the_reader_sees_the_imports_it_must() -> None:
    # A guard on the reader itself: imports at the top, under TYPE_CHECKING, inside
    # functions and of a module through its package all count.
    edges = graph()
    assert "ember.daemon.config" in edges["ember.daemon"]
    assert "ember.daemon.api.server" in edges["ember.daemon"]  # inside a function
    assert "ember.daemon.store.runs" in edges["ember.daemon.api.routes"]  # `from store import`
    assert "ember.daemon.engine.core" in edges["ember.daemon.api.host"]  # TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert not cycles({"a": {"b"}, "b": set()})


def test_no_import_cycle_in_the_daemon() -> None:
    found = cycles(graph())
    assert not found, f"import cycles: {sorted(sorted(c) for c in found)}"


def package(name: str) -> str:
    return short(name).split(".")[0]


def test_each_package_imports_only_the_layers_below() -> None:
    assert set(MAY_IMPORT) == {package(name) for name in modules() if name != ROOT_NAME}
    wrong = sorted(
        f"{short(name)} -> {short(target)}"
        for name, targets in graph().items()
        if name != ROOT_NAME
        for target in targets
        if package(target) not in MAY_IMPORT[package(name)] | {package(name)}
    )
    assert not wrong, f"imports against the layers (see MAY_IMPORT): {wrong}"
    beyond_the_wire = sorted(
        f"{short(name)} -> {short(target)}"
        for name, targets in graph().items()
        if package(name) in {"model", "child"}
        for target in targets
        if package(target) == "procs" and target != WIRE_FORMAT
    )
    assert not beyond_the_wire, f"only the wire format is shared: {beyond_the_wire}"


def test_child_imports_nothing_of_the_engine_store_or_api() -> None:
    # child/ runs inside the zygote and the run processes: what it imports, they load.
    assert not MAY_IMPORT["child"] & {"engine", "store", "api", "builds"}


def test_no_module_over_400_lines() -> None:
    long = {
        short(name)
        for name, (path, _) in modules().items()
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {sorted(long)} (split them)"


def holds_sql(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in DB_CALLS
        ):
            return True
    return False


def test_sql_lives_in_the_store() -> None:
    assert holds_sql(ast.parse('db.execute(f"SELECT id FROM runs WHERE {x}")'))
    assert not holds_sql(ast.parse('"""Select the runs to show."""'))
    outside = {
        short(name)
        for name, (_, tree) in modules().items()
        if not name.startswith(f"{ROOT_NAME}.store") and holds_sql(tree)
    }
    assert not outside, f"SQL outside daemon/store/ (add a store function): {sorted(outside)}"


def find_class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_active_run_has_no_any() -> None:
    _, tree = modules()[f"{ROOT_NAME}.model"]
    untyped = set()
    for node in find_class(tree, "ActiveRun").body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # `dict[str, Any]` is a JSON object (metadata, as the wire types have it); any
            # other `Any` is a type nobody wrote down.
            written = ast.unparse(node.annotation).replace("dict[str, Any]", "")
            if re.search(r"\bAny\b", written):
                untyped.add(node.target.id)
    assert not untyped, f"fields of ActiveRun typed Any: {sorted(untyped)}"


def test_daemon_stop_has_no_hasattr() -> None:
    _, tree = modules()[f"{ROOT_NAME}.api.server"]
    stop = next(
        n
        for n in find_class(tree, "Daemon").body
        if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef) and n.name == "stop"
    )
    calls = sum(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr"
        for n in ast.walk(stop)
    )
    assert stop.body, "Daemon.stop not found"
    assert calls == 0, "Daemon.stop: what start() made is known (Daemon._parts), not guessed"
