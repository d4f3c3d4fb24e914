"""Environment variables of run processes: ``from ember import envvars``.

Variables belong to one environment and are injected into its run processes; changing one
replaces the environment's processes as they free up (a run executing keeps the values it
started with). Values are secrets: lists leave them out unless ``show_values=True``.
Each call has a blocking twin with the ``_sync`` suffix.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from ember._admin_types import EnvVar, EnvVarList, ImportEnvVarsRequest, SetEnvVarRequest
from ember._client import Call, Client, default_client

_encoder = msgspec.json.Encoder()


class EnvVars:
    """Variables of the client's environment."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    def _list(self, show_values: bool) -> Call[EnvVarList]:
        params = {"show_values": "true" if show_values else None}
        return Call("GET", "/api/v1/envvars", EnvVarList, params=params)

    def _set(self, name: str, value: str) -> Call[EnvVar]:
        body = _encoder.encode(SetEnvVarRequest(value=value))
        return Call("PUT", f"/api/v1/envvars/{name}", EnvVar, body=body)

    def _delete(self, name: str) -> Call[EnvVar]:
        return Call("DELETE", f"/api/v1/envvars/{name}", EnvVar)

    def _upload(self, variables: Mapping[str, str], source: str) -> Call[EnvVarList]:
        body = _encoder.encode(ImportEnvVarsRequest(variables=dict(variables), source=source))
        return Call("POST", "/api/v1/envvars/import", EnvVarList, body=body)

    async def list(self, *, show_values: bool = False) -> EnvVarList:
        """The environment's variables by name; values only with ``show_values``."""
        return await self.client.request(self._list(show_values))

    async def set(self, name: str, value: str) -> EnvVar:
        """Set a variable."""
        return await self.client.request(self._set(name, value))

    async def delete(self, name: str) -> EnvVar:
        """Remove a variable."""
        return await self.client.request(self._delete(name))

    async def upload(self, variables: Mapping[str, str], *, source: str = "user") -> EnvVarList:
        """Set many variables at once (``source="dotenv"`` replaces the ``.env`` layer)."""
        return await self.client.request(self._upload(variables, source))

    def list_sync(self, *, show_values: bool = False) -> EnvVarList:
        """Blocking twin of :meth:`list`."""
        return self.client.request_sync(self._list(show_values))

    def set_sync(self, name: str, value: str) -> EnvVar:
        """Blocking twin of :meth:`set`."""
        return self.client.request_sync(self._set(name, value))

    def delete_sync(self, name: str) -> EnvVar:
        """Blocking twin of :meth:`delete`."""
        return self.client.request_sync(self._delete(name))

    def upload_sync(self, variables: Mapping[str, str], *, source: str = "user") -> EnvVarList:
        """Blocking twin of :meth:`upload`."""
        return self.client.request_sync(self._upload(variables, source))


envvars = EnvVars()
