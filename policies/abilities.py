"""Abilities: what a capability lets its holder do, and when one covers another.

An ability is a resource URI plus an action, e.g. ``janus:payments/eur`` +
``sign/payment``.  Resources are matched segment by segment on ``/``; actions are
namespaced the same way.  A ``*`` segment matches exactly one segment, except as the
last segment, where it matches one or more.  So ``janus:payments/*`` covers
``janus:payments/eur`` and ``janus:payments/eur/large``; ``sign/*`` covers
``sign/payment``; ``*`` alone covers every action, and every resource.

Covering is what attenuation checks: a child's ability must be covered by one of its
parent's.  A pattern covers another pattern only if it matches every string the other
can match, so a child cannot widen its grant by using wildcards of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from policies.errors import FormatError

_MAX_LEN = 512
_ACTION = re.compile(r"[a-z0-9*][a-z0-9._*-]*(/[a-z0-9*][a-z0-9._*-]*)*")
_RESOURCE = re.compile(r"\*|[a-zA-Z][a-zA-Z0-9+.-]*:[^\s*]*(/[^\s/]*)*")


def _segments(text: str) -> list[str]:
    return text.split("/")


def _check_wildcards(kind: str, text: str) -> None:
    for segment in _segments(text):
        if "*" in segment and segment != "*":
            raise FormatError(f"{kind} {text!r}: '*' must be a whole segment")


def pattern_matches(pattern: str, value: str) -> bool:
    """Does ``pattern`` (with wildcards) match the concrete ``value``?"""
    pat, val = _segments(pattern), _segments(value)
    for i, seg in enumerate(pat):
        last = i == len(pat) - 1
        if seg == "*" and last:
            return len(val) >= len(pat)
        if i >= len(val):
            return False
        if seg != "*" and seg != val[i]:
            return False
    return len(val) == len(pat)


def pattern_covers(parent: str, child: str) -> bool:
    """Does every value ``child`` matches also match ``parent``?"""
    par, chi = _segments(parent), _segments(child)
    for i, seg in enumerate(par):
        if seg == "*" and i == len(par) - 1:
            return len(chi) >= len(par)  # parent's trailing '*' takes whatever follows
        if i >= len(chi):
            return False  # child matches shorter values than parent can
        if chi[i] == "*" and i == len(chi) - 1:
            return False  # child's trailing '*' reaches values parent cannot match here
        if seg != "*" and chi[i] != seg:
            return False  # parent is concrete here; child must be the same segment
    return len(chi) == len(par)


@dataclass(frozen=True)
class Ability:
    """One grant: ``can`` (action) ``with`` (resource), under caveats ``nb``."""

    resource: str
    action: str
    caveats: tuple[Any, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for kind, text, pattern in (
            ("resource", self.resource, _RESOURCE),
            ("action", self.action, _ACTION),
        ):
            if not isinstance(text, str) or not text or len(text) > _MAX_LEN:
                raise FormatError(f"{kind} must be a non-empty string of at most {_MAX_LEN}")
            if not pattern.fullmatch(text):
                raise FormatError(f"{kind} {text!r} is not well formed")
            _check_wildcards(kind, text)

    @classmethod
    def from_json(cls, obj: Any) -> Ability:
        if not isinstance(obj, dict):
            raise FormatError("an ability must be a JSON object")
        unknown = set(obj) - {"with", "can", "nb"}
        if unknown:
            raise FormatError(f"unknown ability member(s): {', '.join(sorted(unknown))}")
        caveats = obj.get("nb", [])
        if not isinstance(caveats, list):
            raise FormatError("ability 'nb' (caveats) must be a list")
        return cls(obj.get("with"), obj.get("can"), tuple(caveats))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"with": self.resource, "can": self.action}
        if self.caveats:
            out["nb"] = list(self.caveats)
        return out

    def matches(self, resource: str, action: str) -> bool:
        """Does this ability allow ``action`` on ``resource`` (caveats aside)?"""
        return pattern_matches(self.resource, resource) and pattern_matches(self.action, action)

    def covers(self, other: Ability) -> bool:
        """Is everything ``other`` allows (caveats aside) allowed by this ability?"""
        return pattern_covers(self.resource, other.resource) and pattern_covers(
            self.action, other.action
        )
