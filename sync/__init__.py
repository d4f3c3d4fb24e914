"""Reaching remote daemons: named connection profiles (URL and API key).

A profile lets the CLI (``--profile prod``) and the SDK (``profile_settings("prod")``) talk to
a daemon on another machine over HTTPS with that environment's API key. Profiles live in
``profiles.toml`` in the user's config directory, mode 0600, because they hold keys.
"""

from __future__ import annotations

from ember.sync._profiles import (
    Profile,
    default_profile,
    delete_profile,
    load_profiles,
    plain_http_warning,
    profile_settings,
    profiles_path,
    save_profile,
    set_default_profile,
    settings_of,
)

__all__ = [
    "Profile",
    "default_profile",
    "delete_profile",
    "load_profiles",
    "plain_http_warning",
    "profile_settings",
    "profiles_path",
    "save_profile",
    "set_default_profile",
    "settings_of",
]
