"""The project's ``.env`` file, read by `ember dev` (python-dotenv is not a dependency).

Supported, one variable a line: ``NAME=value``, an optional ``export`` before the name,
values in single quotes (taken as written) or double quotes (``\\n``, ``\\t``, ``\\"`` and
``\\\\`` escapes), ``#`` comments on their own line or after an unquoted value (after a space),
and blank lines. Not supported: variable expansion (``${OTHER}``) and values spanning lines.
"""

from __future__ import annotations

import re
from pathlib import Path

from ember._errors import ConfigError

_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _value(raw: str, where: str) -> str:
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        end = raw.find(quote, 1)
        while quote == '"' and end > 0 and raw[end - 1] == "\\" and raw[end - 2 : end] != "\\\\":
            end = raw.find(quote, end + 1)
        if end < 0 or raw[end + 1 :].strip()[:1] not in ("", "#"):
            raise ConfigError(f"{where}: the quoted value is not closed on its line")
        inner = raw[1:end]
        if quote == "'":
            return inner
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), inner)
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def parse_dotenv(text: str, name: str = ".env") -> dict[str, str]:
    """The variables of a ``.env`` text.

    Raises:
        ConfigError: a line is not ``NAME=value``; the message gives its number.
    """
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise ConfigError(f"{name} line {number} is not NAME=value: {line.strip()[:40]!r}")
        found[match.group(1)] = _value(match.group(2), f"{name} line {number}")
    return found


def read_dotenv(root: Path) -> dict[str, str]:
    """The variables of ``<root>/.env`` (none when there is no such file).

    Raises:
        ConfigError: the file has a line that is not ``NAME=value``.
    """
    path = root / ".env"
    return parse_dotenv(path.read_text(), str(path)) if path.is_file() else {}
