"""The runs filter as one line of text: ``status:failed task:charge tag:vip since:1h invoice``.

``key:value`` words become the daemon's list filters (status, task, tag, version, time range)
and run on the server over every run in the store; commas give several values
(``status:failed,crashed``). Other words are a search over what the table has loaded: a run
matches when each word is in its id, task, version or one of its tags. ``env:NAME`` switches
the environment. Status names are case-insensitive and take two groups, ``active`` (not
final) and ``problem`` (failed, crashed, system failure, timed out, expired).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from ember._duration import parse_duration_s
from ember._errors import ConfigError
from ember._types import FINAL_STATUSES, RunStatus, RunSummary

STATUS_GROUPS: dict[str, tuple[RunStatus, ...]] = {
    "active": tuple(s for s in RunStatus if s not in FINAL_STATUSES),
    "problem": (
        RunStatus.FAILED,
        RunStatus.CRASHED,
        RunStatus.SYSTEM_FAILURE,
        RunStatus.TIMED_OUT,
        RunStatus.EXPIRED,
    ),
}
_KEYS = ("status", "task", "tag", "version", "since", "until", "env")
_ALIASES = {"from": "since", "to": "until", "is": "status", "tags": "tag", "tasks": "task"}


class QueryError(ValueError):
    """A filter word that cannot be understood; the message names it and the fix."""


@dataclass(frozen=True, slots=True)
class RunQuery:
    """What the runs table shows.

    Attributes:
        statuses: any of these statuses (empty: all).
        tasks: any of these task ids.
        tags: runs carrying any of these tags.
        version: runs locked to this version.
        since: created at or after: a duration back from now (``1h``) or an ISO date.
        until: created before, in the same forms.
        env: switch to this environment (not a list filter: the app holds the environment).
        words: the client-side search over loaded rows.
    """

    statuses: tuple[RunStatus, ...] = ()
    tasks: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    version: str | None = None
    since: str | None = None
    until: str | None = None
    env: str | None = None
    words: tuple[str, ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> RunQuery:
        """Read a filter line.

        Raises:
            QueryError: an unknown key, status or time.
        """
        values: dict[str, list[str]] = {}
        words: list[str] = []
        for token in text.split():
            key, sep, value = token.partition(":")
            key = _ALIASES.get(key.lower(), key.lower())
            if not sep or key not in _KEYS:
                if sep and key.isalpha() and not value.startswith("//"):
                    raise QueryError(
                        f"unknown filter {key!r}: use status:, task:, tag:, version:, since:, "
                        "until: or env:"
                    )
                words.append(token)
                continue
            if not value:
                raise QueryError(f"{key}: needs a value, e.g. {key}:{_EXAMPLES[key]}")
            values.setdefault(key, []).extend(v for v in value.split(",") if v)
        query = cls(
            statuses=_statuses(values.get("status", [])),
            tasks=tuple(values.get("task", [])),
            tags=tuple(values.get("tag", [])),
            version=_single(values, "version"),
            since=_single(values, "since"),
            until=_single(values, "until"),
            env=_single(values, "env"),
            words=tuple(words),
        )
        for name in ("since", "until"):
            raw = getattr(query, name)
            if raw is not None:
                _instant(name, raw, datetime.now().astimezone())
        return query

    def __str__(self) -> str:
        parts = []
        if self.statuses:
            parts.append("status:" + ",".join(s.value.lower() for s in self.statuses))
        if self.tasks:
            parts.append("task:" + ",".join(self.tasks))
        if self.tags:
            parts.append("tag:" + ",".join(self.tags))
        for name in ("version", "since", "until", "env"):
            if (value := getattr(self, name)) is not None:
                parts.append(f"{name}:{value}")
        parts.extend(self.words)
        return " ".join(parts)

    @property
    def server_part(self) -> RunQuery:
        """The filters the daemon applies (no search words, no environment)."""
        return replace(self, words=(), env=None)

    def created_after(self, now: datetime) -> datetime | None:
        """The ``since`` bound as an instant."""
        return None if self.since is None else _instant("since", self.since, now)

    def created_before(self, now: datetime) -> datetime | None:
        """The ``until`` bound as an instant."""
        return None if self.until is None else _instant("until", self.until, now)

    def matches_server(self, run: RunSummary, now: datetime) -> bool:
        """True when a run passes the daemon's filters (for runs that arrive by event)."""
        if self.statuses and run.status not in self.statuses:
            return False
        if self.tasks and run.task_id not in self.tasks:
            return False
        if self.tags and not set(self.tags) & set(run.tags):
            return False
        if self.version is not None and run.version != self.version:
            return False
        after = self.created_after(now)
        if after is not None and run.created_at < after:
            return False
        before = self.created_before(now)
        return before is None or run.created_at < before

    def matches_words(self, run: RunSummary) -> bool:
        """True when every search word is in the run's id, task, version or tags."""
        if not self.words:
            return True
        haystack = " ".join((run.id, run.task_id, run.version or "", *run.tags)).lower()
        return all(word.lower() in haystack for word in self.words)


_EXAMPLES = {
    "status": "failed",
    "task": "send-email",
    "tag": "user_42",
    "version": "20250115.1",
    "since": "1h",
    "until": "2025-01-15",
    "env": "prod",
}


def _single(values: dict[str, list[str]], key: str) -> str | None:
    found = values.get(key, [])
    if len(found) > 1:
        raise QueryError(f"{key}: takes one value, got {', '.join(found)}")
    return found[0] if found else None


def _statuses(names: list[str]) -> tuple[RunStatus, ...]:
    found: list[RunStatus] = []
    for name in names:
        key = name.upper().replace("-", "_")
        if name.lower() in STATUS_GROUPS:
            group = STATUS_GROUPS[name.lower()]
        elif key in RunStatus.__members__:
            group = (RunStatus[key],)
        else:
            known = ", ".join([s.value.lower() for s in RunStatus] + list(STATUS_GROUPS))
            raise QueryError(f"status:{name} is not a run status; use one of {known}")
        found.extend(s for s in group if s not in found)
    return tuple(found)


def _instant(name: str, raw: str, now: datetime) -> datetime:
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        pass
    else:
        return moment if moment.tzinfo else moment.astimezone()
    try:
        return now - timedelta(seconds=parse_duration_s(raw))
    except (ConfigError, ValueError):
        raise QueryError(
            f"{name}:{raw} is neither a duration back from now (15m, 1h, 7d) nor a date "
            "(2025-01-15 or 2025-01-15T12:00)"
        ) from None
