"""Profiles: named daemons with their URL, API key and default environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ember._config import ClientSettings, default_socket_path
from ember._errors import ConfigError


@dataclass(frozen=True, slots=True)
class Profile:
    """A named remote daemon.

    Attributes:
        name: how commands refer to it (``--profile NAME``).
        url: its base URL, e.g. ``https://ember.example.com``.
        api_key: the key of one environment; the key decides the environment.
        env: the environment the key belongs to, for display.
        ca_file: certificates to trust for an ``https`` URL (the system store when None).
    """

    name: str
    url: str
    api_key: str
    env: str = "prod"
    ca_file: str | None = None


def plain_http_warning(url: str) -> str | None:
    """A warning for a URL that would send an API key in clear text, else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"{url} is plain HTTP to another machine: the API key and every payload cross the "
        "network unencrypted; serve the daemon with --tls-cert/--tls-key and use https://"
    )


def profiles_path(config_dir: Path | None = None) -> Path:
    """Where profiles are stored: ``<user config dir>/ember/profiles.toml``."""
    if config_dir is None:
        import platformdirs

        config_dir = Path(platformdirs.user_config_dir("ember", appauthor=False))
    return config_dir / "profiles.toml"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_profiles(path: Path | None = None) -> dict[str, Profile]:
    """Every stored profile by name (empty when there is no file).

    Raises:
        ConfigError: the file is not valid TOML or a profile lacks a field.
    """
    path = path or profiles_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    found = {}
    for name, table in data.get("profiles", {}).items():
        try:
            found[name] = Profile(
                name=name,
                url=table["url"],
                api_key=table["api_key"],
                env=table.get("env", "prod"),
                ca_file=table.get("ca_file"),
            )
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: profile {name!r} needs url and api_key") from None
    return found


def default_profile(path: Path | None = None) -> str | None:
    """The profile commands use when none is named (``ember login`` sets it), or None."""
    path = path or profiles_path()
    if not path.exists():
        return None
    try:
        name = tomllib.loads(path.read_text()).get("default")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return name if isinstance(name, str) else None


def set_default_profile(name: str | None, path: Path | None = None) -> None:
    """Make a stored profile the default one (None: commands use the local daemon again).

    Raises:
        ConfigError: no such profile.
    """
    path = path or profiles_path()
    profiles = load_profiles(path)
    if name is not None and name not in profiles:
        raise ConfigError(f"no profile named {name!r}; `ember profiles list` shows them")
    _write(profiles, path, name)


def _write(profiles: dict[str, Profile], path: Path, default: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = [f"default = {_quote(default)}", ""] if default in profiles else []
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        lines += [
            f"[profiles.{_quote(profile.name)}]",
            f"url = {_quote(profile.url)}",
            f"api_key = {_quote(profile.api_key)}",
            f"env = {_quote(profile.env)}",
        ]
        if profile.ca_file is not None:
            lines.append(f"ca_file = {_quote(profile.ca_file)}")
        lines.append("")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines))
    os.replace(tmp, path)


def save_profile(profile: Profile, path: Path | None = None) -> None:
    """Add or replace a profile.

    Raises:
        ConfigError: the URL is not http(s).
    """
    if not profile.url.startswith(("http://", "https://")):
        raise ConfigError(f"profile URL {profile.url!r} must start with https:// (or http://)")
    path = path or profiles_path()
    profiles = load_profiles(path)
    profiles[profile.name] = profile
    _write(profiles, path, default_profile(path))


def delete_profile(name: str, path: Path | None = None) -> None:
    """Remove a profile.

    Raises:
        ConfigError: no such profile.
    """
    path = path or profiles_path()
    profiles = load_profiles(path)
    if profiles.pop(name, None) is None:
        raise ConfigError(f"no profile named {name!r}; `ember profiles list` shows them")
    _write(profiles, path, default_profile(path))


def profile_settings(name: str, path: Path | None = None) -> ClientSettings:
    """Client settings that reach a profile's daemon.

    Raises:
        ConfigError: no such profile.
    """
    profile = load_profiles(path).get(name)
    if profile is None:
        raise ConfigError(
            f"no profile named {name!r}: add one with `ember login --profile {name} -a URL`"
        )
    return settings_of(profile)


def settings_of(profile: Profile) -> ClientSettings:
    """Client settings that reach a profile's daemon."""
    base = ClientSettings.from_env()
    return dataclasses.replace(
        base,
        socket_path=default_socket_path(),
        url=profile.url.rstrip("/"),
        api_key=profile.api_key,
        env=profile.env,
        profile=profile.name,
        ca_file=Path(profile.ca_file).expanduser() if profile.ca_file else None,
    )
