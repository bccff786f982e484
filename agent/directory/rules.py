"""A namespace's rules: who may hold a name, how often names may be claimed, who may not.

The file is TOML (docs/directory.md has a complete example).  The parser is strict: an
unknown table or key, a wrong type or an out-of-range value is a :class:`RulesError`
naming the line and the key, so a typo never silently loosens a rule.  Without a rules
file the directory runs in *open mode*: a free name goes to the first owner who
publishes it, and claims are limited only by the defaults below.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.directory.errors import RulesError
from policies.durations import parse_duration
from policies.errors import FormatError
from policies.jws import public_key_for

OPEN, GRANT = "open", "grant"
#: The capability an enrolment grant must carry: resource ``janus:dir/<name>``.
ENROL_ACTION = "dir/publish"
DEFAULT_WINDOW = 3600
DEFAULT_PER_NAME = 1000
DEFAULT_PER_CLAIMER = 100
DEFAULT_CONTACT_USES = 1
DEFAULT_CONTACT_TTL = 7 * 86400

_SCHEMA: dict[str, set[str]] = {
    "enrolment": {"mode", "authority"},
    "limits": {"claims_per_name", "claims_per_claimer", "window"},
    "contact": {"uses", "ttl"},
    "blocked": {"claimers"},
}


@dataclass(frozen=True)
class Rules:
    mode: str = OPEN
    authority: str | None = None
    claims_per_name: int = DEFAULT_PER_NAME
    claims_per_claimer: int = DEFAULT_PER_CLAIMER
    window: int = DEFAULT_WINDOW
    contact_uses: int = DEFAULT_CONTACT_USES
    contact_ttl: int = DEFAULT_CONTACT_TTL
    blocked: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def open_mode(cls) -> Rules:
        return cls()

    @classmethod
    def load(cls, path: Path) -> Rules:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"cannot read the rules file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RulesError(f"the rules file {path} is not UTF-8") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "rules") -> Rules:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{source}: not valid TOML: {exc}") from None
        where = _Locator(text, source)
        for table, value in data.items():
            if not isinstance(value, dict):
                raise RulesError(
                    f"{where.top(table)}: {table!r:.40} is outside any table: rules go in "
                    "[enrolment], [limits], [contact] or [blocked]"
                )
            if table not in _SCHEMA:
                raise RulesError(f"{where.at(table)}: unknown table [{table}]")
            for key in value:
                if key not in _SCHEMA[table]:
                    raise RulesError(f"{where.at(table, key)}: unknown key {table}.{key}")
        enrol = data.get("enrolment", {})
        limits = data.get("limits", {})
        contact = data.get("contact", {})
        blocked = data.get("blocked", {})

        mode = enrol.get("mode", OPEN)
        if mode not in (OPEN, GRANT):
            raise RulesError(
                f"{where.at('enrolment', 'mode')}: enrolment.mode is 'open' or 'grant'"
            )
        authority = enrol.get("authority")
        if authority is not None:
            authority = _did(authority, where.at("enrolment", "authority"), "enrolment.authority")
        if mode == GRANT and authority is None:
            raise RulesError(
                f"{where.at('enrolment', 'mode')}: enrolment.mode 'grant' needs "
                "enrolment.authority (the did:key that grants names)"
            )
        claimers = blocked.get("claimers", [])
        if not isinstance(claimers, list):
            raise RulesError(
                f"{where.at('blocked', 'claimers')}: blocked.claimers is a list of did:key"
            )
        return cls(
            mode=mode,
            authority=authority,
            claims_per_name=_count(limits, "claims_per_name", DEFAULT_PER_NAME, where, "limits"),
            claims_per_claimer=_count(
                limits, "claims_per_claimer", DEFAULT_PER_CLAIMER, where, "limits"
            ),
            window=_duration(limits, "window", DEFAULT_WINDOW, where, "limits"),
            contact_uses=_count(contact, "uses", DEFAULT_CONTACT_USES, where, "contact", top=1000),
            contact_ttl=_duration(contact, "ttl", DEFAULT_CONTACT_TTL, where, "contact"),
            blocked=frozenset(
                _did(d, where.at("blocked", "claimers"), "blocked.claimers") for d in claimers
            ),
        )


class _Locator:
    """``source:line`` of a key, found by scanning the text (tomllib keeps no positions)."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def top(self, key: str) -> str:
        for number, line in enumerate(self.lines, start=1):
            if line.lstrip().startswith("["):
                break
            if re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return f"{self.source}:{number}"
        return self.source

    def at(self, table: str, key: str | None = None) -> str:
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        in_table = False
        for number, line in enumerate(self.lines, start=1):
            if header.match(line):
                if key is None:
                    return f"{self.source}:{number}"
                in_table = True
                continue
            if line.lstrip().startswith("["):
                in_table = False
            if in_table and key is not None and re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return f"{self.source}:{number}"
        return self.source


def _count(
    table: dict[str, Any], key: str, default: int, where: _Locator, name: str, top: int = 10**9
) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= top:
        raise RulesError(f"{where.at(name, key)}: {name}.{key} must be an integer from 1 to {top}")
    return value


def _duration(table: dict[str, Any], key: str, default: int, where: _Locator, name: str) -> int:
    value = table.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RulesError(f'{where.at(name, key)}: {name}.{key} is a duration such as "1h" or "7d"')
    try:
        seconds = parse_duration(value)
    except FormatError as exc:
        raise RulesError(f"{where.at(name, key)}: {name}.{key}: {exc}") from None
    if not 0 < seconds <= 366 * 86400:
        raise RulesError(f"{where.at(name, key)}: {name}.{key} must be between 1s and 366d")
    return seconds


def _did(value: object, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise RulesError(f"{where}: {name} must be a did:key string")
    try:
        public_key_for(value, name)
    except FormatError:
        raise RulesError(f"{where}: {name} {value!r:.80} is not a valid did:key") from None
    return value
