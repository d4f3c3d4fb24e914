"""Environments: their names, their variables, and the API keys that open them.

An environment is ``dev``, ``staging``, ``prod`` or ``preview/<branch>``; each has its own
versions, runs, queues, schedules, variables and keys. Over TCP an API key decides the
environment of a request; over the Unix socket its owner names one (``x-ember-env``).

Variables come in two layers: ``user`` (``ember env set``, kept in SQLite) and ``dotenv``
(the project's ``.env``, which `ember dev` sends whole at start and on every change). The
``dotenv`` layer wins, as a local ``.env`` does in Trigger.dev's dev. They are injected into
the environment's zygotes, so a change replaces its run processes as they free up: runs
executing keep the values they started with.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
from collections.abc import Callable, Mapping

from ember._admin_types import CreatedKey, EnvVar
from ember._errors import BadRequest, NotFound
from ember.daemon.store import admin as admin
from ember.daemon.store import runs as store
from ember.daemon.store.db import Database

ENVIRONMENT_KINDS = ("dev", "staging", "prod", "preview")
SOURCES = ("user", "dotenv")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by the supervisor for every run process; a variable of the same name would be ignored.
_RESERVED_PREFIX = "EMBER_"
MAX_VALUE_BYTES = 64 * 1024


# The names of environments, also the OpenAPI document's pattern for them: a preview
# branch is 1-100 letters, digits and . _ - /, not starting with . _ - / nor ending with /.
ENV_NAME_PATTERN = (
    r"^(dev|staging|prod|preview/[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,98}[A-Za-z0-9._-])?)$"
)
_ENV_NAME = re.compile(ENV_NAME_PATTERN)


def check_env_name(name: str) -> str:
    """Return ``name`` if it is an environment's name.

    Raises:
        BadRequest: it is not ``dev``, ``staging``, ``prod`` or ``preview/<branch>``.
    """
    if _ENV_NAME.fullmatch(name):
        return name
    raise BadRequest(
        400,
        f"environment {name!r} is not one of dev, staging, prod or preview/<branch> "
        "(branch: letters, digits and . _ - /)",
    )


def new_key(env: str) -> str:
    """A fresh API key; its prefix names the environment's kind (``em_prod_...``)."""
    return f"em_{env.split('/', 1)[0]}_{secrets.token_urlsafe(32)}"


def created_key(key: str, env: str, name: str, now: float, key_hash: str) -> CreatedKey:
    """The answer to a key creation: the key (shown once) and how it is listed."""
    from ember._admin_types import ApiKeyInfo

    info = ApiKeyInfo(
        id=key_hash[: admin.KEY_ID_CHARS], env=env, name=name, created_at=store.ts(now)
    )
    return CreatedKey(key=key, info=info)


class EnvVars:
    """The variables of every environment, cached from the table.

    Args:
        db: the state database.
        clock: wall-clock seconds.
        on_change: called with an environment whose variables changed.
    """

    def __init__(
        self, db: Database, clock: Callable[[], float], on_change: Callable[[str], None]
    ) -> None:
        self._db = db
        self._clock = clock
        self._on_change = on_change
        # env -> source -> name -> (value, updated_at)
        self._layers: dict[str, dict[str, dict[str, tuple[str, float]]]] = {}

    async def load(self) -> None:
        """Read every variable from the table."""
        for env, source, name, value, updated_at in await self._db.read(admin.load_env_vars):
            self._layers.setdefault(env, {}).setdefault(source, {})[name] = (value, updated_at)

    def values(self, env: str) -> Mapping[str, str]:
        """What run processes of ``env`` get: the user layer, then ``.env`` over it."""
        merged: dict[str, str] = {}
        for source in SOURCES:
            for name, (value, _) in self._layers.get(env, {}).get(source, {}).items():
                merged[name] = value
        return merged

    def listing(self, env: str, show_values: bool) -> list[EnvVar]:
        """The variables of ``env`` by name (values only when asked for)."""
        found = [
            EnvVar(
                name=name,
                source=source,
                value=value if show_values else None,
                updated_at=store.ts(updated_at),
            )
            for source, layer in self._layers.get(env, {}).items()
            for name, (value, updated_at) in layer.items()
        ]
        return sorted(found, key=lambda v: (v.name, v.source))

    @staticmethod
    def _check(name: str, value: str) -> None:
        if not _VAR_NAME.fullmatch(name):
            raise BadRequest(
                400, f"{name!r} is not a variable name: letters, digits and _, not first a digit"
            )
        if name.startswith(_RESERVED_PREFIX):
            raise BadRequest(400, f"{name}: names starting with EMBER_ are reserved for Ember")
        if "\0" in value or len(value.encode()) > MAX_VALUE_BYTES:
            raise BadRequest(400, f"{name}: a value holds no NUL byte and at most 64 KB")

    async def set_many(self, env: str, variables: Mapping[str, str], source: str) -> None:
        """Set variables; ``source="dotenv"`` replaces that whole layer.

        Raises:
            BadRequest: a name or value is invalid, or the source is unknown.
        """
        if source not in SOURCES:
            raise BadRequest(400, f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        for name, value in variables.items():
            self._check(name, value)
        now = self._clock()
        replace = source == "dotenv"

        def write(conn: sqlite3.Connection) -> None:
            if replace:
                admin.clear_env_layer(conn, env, source)
            for name, value in variables.items():
                admin.set_env_var(conn, env, source, name, value, now)

        await self._db.write(write)
        layer = self._layers.setdefault(env, {}).setdefault(source, {})
        before = dict(layer)
        if replace:
            layer.clear()
        layer.update({name: (value, now) for name, value in variables.items()})
        if {k: v for k, (v, _) in before.items()} != {k: v for k, (v, _) in layer.items()}:
            self._on_change(env)

    async def unset(self, env: str, name: str) -> None:
        """Remove a variable set with ``ember env set``.

        Raises:
            NotFound: it is not set (or comes only from ``.env``, which must be edited).
        """
        layers = self._layers.get(env, {})
        if name not in layers.get("user", {}):
            where = " (it comes from the project's .env: remove it there)"
            raise NotFound(
                404,
                f"variable {name} is not set in environment {env}"
                + (where if name in layers.get("dotenv", {}) else ""),
            )
        await self._db.write(lambda conn: admin.delete_env_var(conn, env, "user", name))
        del layers["user"][name]
        self._on_change(env)
