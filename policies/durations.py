"""Durations as people write them: ``90s``, ``10m``, ``1h30m``, ``7d``, or ``600``.

The issuance policy (``max_ttl``) and the CLI (``--ttl``) both take durations, and both
must read them the same way, so there is one parser.  It is deliberately strict:

- units are ``d``, ``h``, ``m``, ``s`` (lower case), each at most once and largest
  first, so ``1h30m`` is accepted and ``30m1h`` or ``1h1h`` are refused, because an
  operator who typed them most likely meant something else;
- a bare integer is seconds (``600`` = ``10m``), the usual Unix convention;
- the total must be at least one second and at most :data:`MAX_SECONDS` (ten years of
  365 days): zero, negative and absurd lifetimes are typos, never intentions;
- no spaces, signs, fractions, or other units (``1.5h``, ``1w``, ``1 h``): one
  spelling per value keeps the policy file unambiguous to every reader.

:func:`format_duration` is the inverse, writing the canonical form (largest units
first, zero components left out: 5400 → ``1h30m``), so an error message shows a limit
the way an operator would write it in the policy file.
"""

from __future__ import annotations

import re

from policies.errors import FormatError

__all__ = ["MAX_SECONDS", "format_duration", "parse_duration"]

#: Ten years of 365 days.  Capabilities are meant to be short-lived; anything longer is
#: a mistake, and the bound keeps every duration far inside any timestamp arithmetic.
MAX_SECONDS = 10 * 365 * 86_400

_UNITS: tuple[tuple[str, int], ...] = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
_COMPOUND = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", re.ASCII)
_SECONDS = re.compile(r"[0-9]+", re.ASCII)
# Longer inputs cannot be valid (the longest canonical form is about 17 characters);
# refusing them early keeps int() away from huge digit strings.
_MAX_TEXT = 32
_HINT = "write e.g. 90s, 10m, 1h30m, 7d, or whole seconds such as 600"


def parse_duration(text: str) -> int:
    """Return the number of seconds ``text`` stands for, or raise :class:`FormatError`."""
    if not isinstance(text, str):
        raise FormatError(f"a duration must be a string, not {type(text).__name__}")
    shown = text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"
    if not text:
        raise FormatError(f"empty duration: {_HINT}")
    if len(text) > _MAX_TEXT:
        raise FormatError(f"duration {shown!r} is too long: {_HINT}")
    if text.startswith("-"):
        raise FormatError(f"duration {text!r} is negative: a duration must be positive")
    if _SECONDS.fullmatch(text):
        total = int(text)
    else:
        match = _COMPOUND.fullmatch(text)
        if match is None or not any(match.groups()):
            raise FormatError(f"not a duration: {text!r}: {_HINT}")
        total = sum(
            int(group) * size
            for group, (_, size) in zip(match.groups(), _UNITS, strict=True)
            if group is not None
        )
    if total == 0:
        raise FormatError(f"duration {text!r} is zero: a duration must be at least 1s")
    if total > MAX_SECONDS:
        raise FormatError(
            f"duration {text!r} is longer than the maximum, {format_duration(MAX_SECONDS)}"
        )
    return total


def format_duration(seconds: int) -> str:
    """Write ``seconds`` (a positive integer) canonically: ``5400`` → ``"1h30m"``.

    Values above :data:`MAX_SECONDS` are written too (they appear in messages about
    requests that are too long), although :func:`parse_duration` refuses them.
    """
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        raise FormatError(f"a duration must be an integer number of seconds, not {seconds!r}")
    if seconds <= 0:
        raise FormatError(f"a duration must be positive, not {seconds}")
    parts = []
    rest = seconds
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
