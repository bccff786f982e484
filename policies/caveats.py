"""Caveats: a small declarative language that limits an ability to some requests.

A capability's ability carries its caveats as raw JSON (the ``nb`` list).  This module
turns that JSON into checked :class:`Caveat` objects (:func:`parse_caveats`) and
evaluates them on a request's JSON fields (:func:`evaluate`).  The reference, with
examples, is ``docs/caveats.md``.

The language is deliberately small, so that anyone can read a capability and know
exactly which requests it allows, and so that another implementation gets the same
answer:

* a caveat tests one field with one operator (``eq``, ``ne``, ``in``, ``prefix``,
  ``lt``, ``le``, ``gt``, ``ge``), or the verifier's clock (``time``);
* the caveats of an ability, and of every link of a chain, form a conjunction, so a
  child capability can add restrictions but never drop one;
* there are no floats (money is an integer count of the smallest unit, or a string),
  no regular expressions and no OR: every caveat is decided by a few comparisons, and
  alternatives are written as several abilities.

Validation is strict (an unknown member, a second operator or a float is refused, not
ignored) because a caveat that is silently dropped is a grant that is silently wider.
Evaluation, by contrast, never raises on a request: a missing field or a value of the
wrong type fails the caveat, because a request is untrusted input and the only safe
answer to "cannot tell" is "no".
"""

from __future__ import annotations

import json
import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any, Final, TypeAlias
from zoneinfo import ZoneInfo, available_timezones

from janus_hsm.strictjson import FLOATS_REFUSED, loads
from policies.errors import FormatError

__all__ = [
    "MAX_CAVEATS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_DEPTH",
    "Caveat",
    "DailyWindowCaveat",
    "FieldCaveat",
    "Scalar",
    "TimeRangeCaveat",
    "check_request",
    "evaluate",
    "load_request",
    "parse_caveat",
    "parse_caveats",
]

Scalar: TypeAlias = str | int | bool | None
"""A JSON scalar as caveats see it.  ``bool`` is its own type here, never an integer."""

MAX_CAVEATS: Final = 32
"""Caveats per ability: enough for real policies, few enough to audit by eye."""
MAX_PATH_DEPTH: Final = 8
MAX_PATH_LENGTH: Final = 256
MAX_IN_VALUES: Final = 256
MAX_STRING: Final = 1024
"""Characters in any string inside a caveat (operands, ``in`` members)."""
MAX_REQUEST_BYTES: Final = 64 * 1024
"""Bytes of a request in compact UTF-8 JSON (no whitespace outside strings)."""
MAX_REQUEST_DEPTH: Final = 8
"""Nested objects/arrays in a request, the top-level object counting as 1."""
MAX_RAW_REQUEST_BYTES: Final = 4 * MAX_REQUEST_BYTES
"""Bytes :func:`load_request` reads before parsing (room for pretty-printing)."""
MAX_SAFE_INTEGER: Final = 2**53 - 1
"""I-JSON (RFC 7493) limit: beyond it, many JSON parsers silently round integers."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_INT_OPS: Final[dict[str, tuple[str, Callable[[int, int], bool]]]] = {
    "lt": ("<", operator.lt),
    "le": ("<=", operator.le),
    "gt": (">", operator.gt),
    "ge": (">=", operator.ge),
}
OPERATORS: Final = ("eq", "ne", "in", "prefix", *_INT_OPS)
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Names the tz database ships that are not zones, or that mean "this host's zone":
# two verifiers must never disagree about what a capability allows.
_NOT_ZONES: Final = frozenset({"localtime", "posixrules", "Factory"})


# --------------------------------------------------------------------------- helpers


def _json_kind(value: object) -> str:
    """How a value reads in an error message ("a string", "an object"…)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__} (not a JSON type)"


def _is_int(value: object) -> bool:
    """Integers in the JSON sense: ``True`` is not 1, so a flag never passes ``le``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_valid_unicode(text: str) -> bool:
    """Lone surrogates (``"\\ud800"``) are legal in Python and JSON text, not in UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scalar_problem(value: object) -> str | None:
    """Why ``value`` cannot appear in a caveat, or None when it can."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return FLOATS_REFUSED
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            return "integers must be within ±(2**53 - 1); write larger ones as strings"
        return None
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            return f"strings must be at most {MAX_STRING} characters"
        if not _is_valid_unicode(value):
            return "strings must be valid Unicode (no lone surrogates)"
        return None
    return f"expected a JSON scalar (string, integer, boolean or null), got {_json_kind(value)}"


def _typed(value: Scalar) -> tuple[str, Scalar]:
    """A comparison key where ``1``, ``True`` and ``"1"`` all differ (Python says 1 == True)."""
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", int(value))
    return ("str", str(value))


def _show(value: object) -> str:
    """A short JSON-ish rendering of a request value for a reason; never raises.

    Request values are untrusted and may be huge, so strings are cut and containers are
    only named.  Python refuses to print integers of more than 4300 digits, hence the
    bit-length guard.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 64:
            return f"<{value.bit_length()}-bit integer>"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        cut = value[:64]
        text = json.dumps(cut, ensure_ascii=False)
        if not _is_valid_unicode(text):
            text = json.dumps(cut)
        return text[:-1] + '…"' if len(value) > len(cut) else text
    return f"<{_json_kind(value)}>"


def _show_list(values: Sequence[Scalar]) -> str:
    shown = ", ".join(_show(v) for v in values[:8])
    return f"[{shown}, …]" if len(values) > 8 else f"[{shown}]"


def _parse_path(path: object) -> tuple[str, ...]:
    """Split a dotted path, refusing anything a reader could misread."""
    if not isinstance(path, str):
        raise FormatError(f"'field' must be a string path, not {_json_kind(path)}")
    if not path or len(path) > MAX_PATH_LENGTH:
        raise FormatError(f"'field' must be 1 to {MAX_PATH_LENGTH} characters")
    segments = tuple(path.split("."))
    if len(segments) > MAX_PATH_DEPTH:
        raise FormatError(f"field {path!r} is deeper than {MAX_PATH_DEPTH} segments")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise FormatError(
                f"field {path!r}: segment {segment!r} must be made of A-Z a-z 0-9 _ -"
            )
    return segments


_MISSING: Final = object()


def _lookup(request: object, segments: tuple[str, ...]) -> object:
    """The value at ``segments``, or ``_MISSING``.  Paths go through objects only."""
    current = request
    for segment in segments:
        if not isinstance(current, Mapping):
            return _MISSING
        current = current.get(segment, _MISSING)
        if current is _MISSING:
            return _MISSING
    return current


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(t)


def _check_epoch(name: str, value: object) -> int:
    if isinstance(value, float):
        raise FormatError(f"time.{name}: {FLOATS_REFUSED}")
    if not _is_int(value):
        raise FormatError(
            f"time.{name} must be an integer (epoch seconds), not {_json_kind(value)}"
        )
    assert isinstance(value, int)
    if not 0 <= value <= MAX_SAFE_INTEGER:
        raise FormatError(f"time.{name} must be between 0 and 2**53 - 1")
    return value


@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


# --------------------------------------------------------------------------- caveats


class Caveat(ABC):
    """One restriction on the requests an ability allows.

    Concrete caveats are frozen dataclasses, validated on construction, so a
    ``Caveat`` object is always one that :func:`parse_caveat` would accept.
    """

    __slots__ = ()

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The canonical JSON form: what goes into a capability's ``nb`` list.

        ``parse_caveat(c.to_json()) == c`` for every caveat ``c``.
        """

    @abstractmethod
    def check(self, request: Mapping[str, Any], now: float) -> str | None:
        """None when the caveat holds for ``request`` at ``now``, else a short reason.

        Never raises on any request: a missing or ill-typed field fails the caveat.
        """


@dataclass(frozen=True)
class FieldCaveat(Caveat):
    """``{"field": PATH, OP: VALUE}``: one test on one field of the request."""

    path: str
    op: str
    value: Scalar | tuple[Scalar, ...] = field(compare=False)
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # What equality and hashing use: values tagged with their JSON type, so that the
    # caveats "eq 1" and "eq true" are different caveats, as they are in JSON.
    _key: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "segments", _parse_path(self.path))
        if self.op not in OPERATORS:
            raise FormatError(f"unknown operator {self.op!r} (one of {', '.join(OPERATORS)})")
        value: object = self.value
        if self.op in ("eq", "ne"):
            problem = _scalar_problem(value)
            if problem:
                raise FormatError(f"'{self.op}': {problem}")
            key: object = _typed(self.value)  # type: ignore[arg-type]
        elif self.op == "in":
            if not isinstance(value, list | tuple):
                raise FormatError(f"'in' must be an array of scalars, not {_json_kind(value)}")
            if not 1 <= len(value) <= MAX_IN_VALUES:
                raise FormatError(f"'in' must list 1 to {MAX_IN_VALUES} values")
            seen: set[tuple[str, Scalar]] = set()
            for i, item in enumerate(value):
                problem = _scalar_problem(item)
                if problem:
                    raise FormatError(f"'in' value {i}: {problem}")
                typed = _typed(item)
                if typed in seen:
                    raise FormatError(f"'in' value {i} ({_show(item)}) is listed twice")
                seen.add(typed)
            set_(self, "value", tuple(value))
            key = frozenset(seen)
        elif self.op == "prefix":
            if not isinstance(value, str):
                raise FormatError(f"'prefix' must be a string, not {_json_kind(value)}")
            if not value:
                raise FormatError("'prefix' must not be empty")
            problem = _scalar_problem(value)
            if problem:
                raise FormatError(f"'prefix': {problem}")
            key = value
        else:
            if isinstance(value, float):
                raise FormatError(f"'{self.op}': {FLOATS_REFUSED}")
            if not _is_int(value):
                raise FormatError(f"'{self.op}' must be an integer, not {_json_kind(value)}")
            problem = _scalar_problem(value)
            if problem:
                raise FormatError(f"'{self.op}': {problem}")
            key = value
        set_(self, "_key", key)

    def to_json(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"field": self.path, self.op: value}

    def check(self, request: Mapping[str, Any], now: float) -> str | None:
        found = _lookup(request, self.segments)
        if found is _MISSING:
            return f"{self.path} is missing"
        if self.op in _INT_OPS:
            if not _is_int(found):
                return f"{self.path} is {_json_kind(found)}, not an integer"
            symbol, compare = _INT_OPS[self.op]
            assert isinstance(found, int) and isinstance(self.value, int)
            if compare(found, self.value):
                return None
            return f"{self.path} {_show(found)} is not {symbol} {self.value}"
        if self.op == "prefix":
            if not isinstance(found, str):
                return f"{self.path} is {_json_kind(found)}, not a string"
            assert isinstance(self.value, str)
            if found.startswith(self.value):
                return None
            return f"{self.path} {_show(found)} does not start with {_show(self.value)}"
        # eq, ne, in: JSON scalars only.  A float, an object or an array fails rather
        # than compares unequal, so "ne" cannot be passed by sending ["KP"] for "KP".
        if not (found is None or isinstance(found, str | int)):  # bool is an int
            return f"{self.path} is {_json_kind(found)}, not a comparable scalar"
        typed = _typed(found)
        if self.op == "eq":
            if typed == self._key:
                return None
            return f"{self.path} {_show(found)} is not {_show(self.value)}"
        if self.op == "ne":
            if typed != self._key:
                return None
            return f"{self.path} must not be {_show(self.value)}"
        assert isinstance(self._key, frozenset) and isinstance(self.value, tuple)
        if typed in self._key:
            return None
        return f"{self.path} {_show(found)} is not one of {_show_list(self.value)}"


@dataclass(frozen=True)
class TimeRangeCaveat(Caveat):
    """``{"time": {"not_before": T1, "not_after": T2}}``: an absolute period, inclusive.

    Narrower than the capability's own nbf/exp when, say, a payment may only be signed
    during a settlement window, while the capability lives longer for other abilities.
    """

    not_before: int | None = None
    not_after: int | None = None

    def __post_init__(self) -> None:
        if self.not_before is None and self.not_after is None:
            raise FormatError("time needs not_before, not_after or both")
        if self.not_before is not None:
            _check_epoch("not_before", self.not_before)
        if self.not_after is not None:
            _check_epoch("not_after", self.not_after)
        if (
            self.not_before is not None
            and self.not_after is not None
            and self.not_before > self.not_after
        ):
            raise FormatError("time.not_before is later than time.not_after")

    def to_json(self) -> dict[str, Any]:
        window: dict[str, Any] = {}
        if self.not_before is not None:
            window["not_before"] = self.not_before
        if self.not_after is not None:
            window["not_after"] = self.not_after
        return {"time": window}

    def check(self, request: Mapping[str, Any], now: float) -> str | None:
        if not math.isfinite(now):
            return "the verifier's clock is not a finite number"
        if self.not_before is not None and now < self.not_before:
            return f"now ({_iso(now)}) is before time.not_before ({_iso(self.not_before)})"
        if self.not_after is not None and now > self.not_after:
            return f"now ({_iso(now)}) is after time.not_after ({_iso(self.not_after)})"
        return None


@dataclass(frozen=True)
class DailyWindowCaveat(Caveat):
    """``{"time": {"hours": [START, END], "days": [...], "tz": ZONE}}``: office hours.

    The window is [START:00, END:00) in local wall-clock time of an IANA zone, so it
    follows daylight saving time the way people do.  ``days`` (optional) limits it to
    some weekdays, judged on the local date.  Windows do not wrap past midnight: one
    window per caveat keeps "which day does 01:00 belong to?" out of the language.
    """

    start_hour: int
    end_hour: int
    tz: str
    days: tuple[str, ...] | None = None
    zone: tzinfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, hour in (("start", self.start_hour), ("end", self.end_hour)):
            if isinstance(hour, float):
                raise FormatError(f"time.hours {name}: {FLOATS_REFUSED}")
            if not _is_int(hour):
                raise FormatError(f"time.hours {name} must be an integer, not {_json_kind(hour)}")
        if not 0 <= self.start_hour <= 23 or not 1 <= self.end_hour <= 24:
            raise FormatError(
                "time.hours must be [start, end] with 0 <= start <= 23, 1 <= end <= 24"
            )
        if self.start_hour >= self.end_hour:
            raise FormatError(
                "time.hours start must be before end (windows do not wrap past midnight; "
                "use several abilities for a night shift)"
            )
        if not isinstance(self.tz, str) or self.tz not in _known_zones():
            raise FormatError(f"time.tz: unknown IANA time zone {_show(self.tz)}")
        object.__setattr__(self, "zone", ZoneInfo(self.tz))
        if self.days is not None:
            days: object = self.days
            if not isinstance(days, list | tuple) or not days:
                raise FormatError(f"time.days must be a non-empty array of {', '.join(DAYS)}")
            for day in days:
                if day not in DAYS:
                    raise FormatError(f"time.days: {_show(day)} is not one of {', '.join(DAYS)}")
            if len(set(days)) != len(days):
                raise FormatError("time.days lists a day twice")
            # Canonical order, so that equal windows have equal JSON.
            object.__setattr__(self, "days", tuple(d for d in DAYS if d in days))

    def to_json(self) -> dict[str, Any]:
        window: dict[str, Any] = {"hours": [self.start_hour, self.end_hour]}
        if self.days is not None:
            window["days"] = list(self.days)
        window["tz"] = self.tz
        return {"time": window}

    def check(self, request: Mapping[str, Any], now: float) -> str | None:
        try:
            local = datetime.fromtimestamp(now, self.zone)
        except (OverflowError, OSError, ValueError):
            return "the verifier's clock is out of range"
        day = DAYS[local.weekday()]
        when = f"local time {day} {local:%Y-%m-%d %H:%M} in {self.tz}"
        if self.days is not None and day not in self.days:
            return f"{when} is not on {', '.join(self.days)}"
        if not self.start_hour <= local.hour < self.end_hour:
            return f"{when} is outside {self.start_hour:02d}:00-{self.end_hour:02d}:00"
        return None


# --------------------------------------------------------------------------- parsing


def _parse_time(spec: object) -> Caveat:
    if not isinstance(spec, Mapping):
        raise FormatError(f"'time' must be an object, not {_json_kind(spec)}")
    keys = set(spec)
    period, daily = {"not_before", "not_after"}, {"hours", "days", "tz"}
    unknown = keys - period - daily
    if unknown:
        names = ", ".join(sorted(repr(k) for k in unknown))
        raise FormatError(f"unknown time member(s) {names}")
    if keys & period and keys & daily:
        raise FormatError(
            "a time caveat is either a period (not_before/not_after) or a daily window "
            "(hours/days/tz), not both: write two caveats"
        )
    if keys & daily:
        for required in ("hours", "tz"):
            if required not in spec:
                raise FormatError(f"a daily time window needs {required!r}")
        hours = spec["hours"]
        if not isinstance(hours, list) or len(hours) != 2:
            raise FormatError("time.hours must be [start, end]")
        days = spec.get("days")
        if days is not None and not isinstance(days, list):
            raise FormatError(f"time.days must be an array, not {_json_kind(days)}")
        return DailyWindowCaveat(
            hours[0], hours[1], spec["tz"], tuple(days) if days is not None else None
        )
    if not keys:
        raise FormatError("'time' needs not_before/not_after, or hours and tz")
    for name in sorted(period):
        if name in spec and spec[name] is None:
            raise FormatError(f"time.{name} must be an integer; leave it out instead of null")
    return TimeRangeCaveat(spec.get("not_before"), spec.get("not_after"))


def _parse(obj: object) -> Caveat:
    if not isinstance(obj, Mapping):
        raise FormatError(f"must be a JSON object, not {_json_kind(obj)}")
    for key in obj:
        if not isinstance(key, str):
            raise FormatError("member names must be strings")
    if "field" in obj:
        ops = [k for k in obj if k != "field"]
        unknown = [k for k in ops if k not in OPERATORS]
        if unknown:
            raise FormatError(
                f"unknown member(s) {', '.join(map(repr, unknown))} "
                f"(operators: {', '.join(OPERATORS)})"
            )
        if not ops:
            raise FormatError(f"no operator: add one of {', '.join(OPERATORS)}")
        if len(ops) > 1:
            raise FormatError(
                f"several operators ({', '.join(ops)}): one per caveat, "
                "write several caveats for a conjunction"
            )
        return FieldCaveat(obj["field"], ops[0], obj[ops[0]])
    if "time" in obj:
        unknown = [k for k in obj if k != "time"]
        if unknown:
            raise FormatError(f"unknown member(s) {', '.join(map(repr, unknown))} beside 'time'")
        return _parse_time(obj["time"])
    raise FormatError("needs a 'field' or a 'time' member")


def parse_caveat(obj: object, *, index: int | None = None) -> Caveat:
    """Validate one caveat's JSON.  Raises FormatError naming ``index`` and the problem.

    Used at issuance (a malformed caveat is refused before anything is signed) and at
    verification (a verifier that cannot read a caveat must not guess what it allows).
    """
    try:
        return _parse(obj)
    except FormatError as exc:
        where = "caveat" if index is None else f"caveat {index}"
        raise FormatError(f"{where}: {exc}") from None


def parse_caveats(items: Sequence[object]) -> tuple[Caveat, ...]:
    """Validate an ability's caveat list (its ``nb`` member), at most ``MAX_CAVEATS``."""
    if isinstance(items, str | bytes | bytearray) or not isinstance(items, Sequence):
        raise FormatError(f"caveats must be an array, not {_json_kind(items)}")
    if len(items) > MAX_CAVEATS:
        raise FormatError(
            f"caveat {MAX_CAVEATS}: too many caveats ({len(items)}; at most {MAX_CAVEATS})"
        )
    return tuple(parse_caveat(item, index=i) for i, item in enumerate(items))


# --------------------------------------------------------------------------- evaluation


def evaluate(caveats: Sequence[Caveat], request: Mapping[str, Any], *, now: float) -> str | None:
    """None when every caveat holds (a conjunction); else the first failing one's reason.

    ``now`` (epoch seconds) comes from the verifier, never from the wall clock here, so
    a verification is reproducible and testable.  An empty list always holds.
    """
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError("now must be epoch seconds (int or float)")
    for caveat in caveats:
        if not isinstance(caveat, Caveat):
            raise TypeError("evaluate() takes parsed caveats (see parse_caveats), not raw JSON")
        reason = caveat.check(request, now)
        if reason is not None:
            return reason
    return None


# --------------------------------------------------------------------------- requests


# One encoder for every request (json.dumps with options builds one per call).
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def check_request(request: object) -> Mapping[str, Any]:
    """Validate a request from outside; return a plain-JSON copy of it.

    A request must be an object with string keys, made of JSON types only (no floats,
    integers within ±(2**53 - 1), valid Unicode strings), nested at most
    ``MAX_REQUEST_DEPTH`` deep and at most ``MAX_REQUEST_BYTES`` in compact UTF-8 JSON.
    The limits bound the verifier's work; refusing floats and huge integers means two
    implementations cannot read different numbers out of the same request.  The copy
    cannot be changed behind the verifier's back after it was checked.
    """
    if not isinstance(request, dict):
        raise FormatError(f"a request must be a JSON object, not {_json_kind(request)}")
    # A lower bound of the serialised size, counted during the walk, so that a huge
    # request is refused before any of it is serialised.
    budget = MAX_REQUEST_BYTES
    stack: list[tuple[object, int, str]] = [(request, 1, "request")]
    while stack:
        value, depth, where = stack.pop()
        budget -= 1 + (len(value) if isinstance(value, str) else 0)
        if budget < 0:
            raise FormatError(f"request: larger than {MAX_REQUEST_BYTES} bytes as JSON")
        if isinstance(value, dict | list) and depth > MAX_REQUEST_DEPTH:
            raise FormatError(f"{where}: nested deeper than {MAX_REQUEST_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise FormatError(f"{where}: member names must be strings")
                if not _is_valid_unicode(key):
                    raise FormatError(f"{where}: member names must be valid Unicode")
                budget -= len(key) + 3
                stack.append((item, depth + 1, f"{where}.{key[:64]}"))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str):
            if not _is_valid_unicode(value):
                raise FormatError(f"{where}: strings must be valid Unicode (no lone surrogates)")
        elif isinstance(value, float):
            raise FormatError(f"{where}: {FLOATS_REFUSED}")
        elif value is not None and not isinstance(value, bool | int):
            raise FormatError(f"{where}: {type(value).__name__} is not a JSON type")
        elif _is_int(value) and abs(value) > MAX_SAFE_INTEGER:  # type: ignore[arg-type]
            raise FormatError(f"{where}: integers must be within ±(2**53 - 1); send a string")
    text = _COMPACT_JSON(request)
    if len(text.encode("utf-8")) > MAX_REQUEST_BYTES:
        raise FormatError(f"request: larger than {MAX_REQUEST_BYTES} bytes as JSON")
    result: dict[str, Any] = json.loads(text)
    return result


def load_request(data: bytes | str) -> Mapping[str, Any]:
    """Parse a request's JSON text (UTF-8) strictly, then :func:`check_request` it.

    Duplicate member names are refused rather than "last one wins": parsers disagree
    on which one wins, and a caveat must judge the same value the application uses.
    """
    if len(data) > MAX_RAW_REQUEST_BYTES:
        raise FormatError(f"request: more than {MAX_RAW_REQUEST_BYTES} bytes of JSON text")
    return check_request(loads(data, "request", error=FormatError))
