"""Wire types of the project-level API: version builds, environments, variables and keys.

Like :mod:`ember._types`, every type is a frozen ``msgspec.Struct`` and every field added
later gets a default.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ember._types import Request, Struct, VersionInfo


class BuildProgress(Struct, frozen=True):
    """``GET /api/v1/versions/{version}/build``: a version's build and its log so far.

    Attributes:
        version: the version, ``BUILDING`` until it is ``READY`` or ``FAILED``.
        lines: log lines from ``from`` on (requirements install, indexing).
        next_line: pass it as ``from`` to get only the lines after these.
    """

    version: VersionInfo
    lines: list[str] = msgspec.field(default_factory=list)
    next_line: int = 0


class EnvironmentInfo(Struct, frozen=True):
    """An environment the daemon knows, with its current version."""

    name: str
    current_version: str | None = None
    versions: int = 0


class EnvironmentList(Struct, frozen=True):
    """``GET /api/v1/environments``: over TCP, only the key's own environment."""

    data: list[EnvironmentInfo]


class EnvVar(Struct, frozen=True):
    """A variable injected into the run processes of one environment.

    Attributes:
        name: the variable's name.
        value: its value; left out of lists unless asked for (values are secrets).
        source: ``user`` (``ember env set``) or ``dotenv`` (the project's ``.env``, in dev);
            a ``dotenv`` value wins over a ``user`` one of the same name.
        updated_at: when it was last set.
    """

    name: str
    source: str = "user"
    value: str | None = None
    updated_at: datetime | None = None


class EnvVarList(Struct, frozen=True):
    """Variables of an environment, by name."""

    data: list[EnvVar]


class SetEnvVarRequest(Request, frozen=True):
    """Body of ``PUT /api/v1/envvars/{name}``."""

    value: str


class ImportEnvVarsRequest(Request, frozen=True):
    """Body of ``POST /api/v1/envvars/import``.

    With ``source="dotenv"`` the variables replace the whole ``.env`` layer (what
    `ember dev` sends); with ``source="user"`` they are set, and kept alongside the others.
    """

    variables: dict[str, str]
    source: str = "user"


class ApiKeyInfo(Struct, frozen=True):
    """An API key as listed: never the key itself, which is shown once at creation."""

    id: str
    env: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None


class ApiKeyList(Struct, frozen=True):
    """API keys, newest first."""

    data: list[ApiKeyInfo]


class CreateKeyRequest(Request, frozen=True):
    """Body of ``POST /api/v1/keys``."""

    env: str
    name: str = ""


class CreatedKey(Struct, frozen=True):
    """A new API key: ``key`` is shown this once and stored only as a hash."""

    key: str
    info: ApiKeyInfo


class WhoAmI(Struct, frozen=True):
    """Who a request is: the environment its key (or the socket's header) names."""

    env: str
    over_tcp: bool
    daemon_version: str
    forwarded_to: str | None = None
