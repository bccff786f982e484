"""Caveats (policies/caveats.py, docs/caveats.md): parsing, evaluation and requests.

Evaluation is security-relevant in one direction only: a caveat must never pass a
request it should refuse.  So besides true/false cases for each operator, the tests pin
down every way a value could sneak past a comparison (bool as int, float as int, a
list for a scalar, a missing field) and check with hypothesis that evaluation never
raises and that adding a caveat never widens what passes.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from policies.caveats import (
    MAX_REQUEST_BYTES,
    Caveat,
    DailyWindowCaveat,
    FieldCaveat,
    TimeRangeCaveat,
    check_request,
    evaluate,
    load_request,
    parse_caveat,
    parse_caveats,
)
from policies.errors import FormatError

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z, a Tuesday


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def run(caveats: list[Any], request: dict[str, Any], now: float = NOW) -> str | None:
    return evaluate(parse_caveats(caveats), request, now=now)


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize(
    ("caveat", "value", "holds"),
    [
        ({"eq": "EUR"}, "EUR", True),
        ({"eq": "EUR"}, "USD", False),
        ({"eq": "EUR"}, "eur", False),
        ({"eq": 5}, 5, True),
        ({"eq": 5}, 6, False),
        ({"eq": 5}, "5", False),
        ({"eq": True}, True, True),
        ({"eq": True}, False, False),
        ({"eq": None}, None, True),
        ({"eq": None}, 0, False),
        ({"eq": None}, "", False),
        ({"ne": "KP"}, "FR", True),
        ({"ne": "KP"}, "KP", False),
        ({"ne": 0}, 1, True),
        ({"ne": 0}, 0, False),
        ({"ne": None}, "x", True),
        ({"ne": None}, None, False),
        ({"in": ["EUR", "CHF"]}, "CHF", True),
        ({"in": ["EUR", "CHF"]}, "USD", False),
        ({"in": [1, "1", None]}, None, True),
        ({"in": [1, "1", None]}, 2, False),
        ({"prefix": "FR76"}, "FR7630006000011234567890189", True),
        ({"prefix": "FR76"}, "DE89370400440532013000", False),
        ({"prefix": "FR76"}, "FR7", False),
        ({"lt": 100}, 99, True),
        ({"lt": 100}, 100, False),
        ({"le": 100}, 100, True),
        ({"le": 100}, 101, False),
        ({"gt": 0}, 1, True),
        ({"gt": 0}, 0, False),
        ({"ge": 0}, 0, True),
        ({"ge": 0}, -1, False),
        ({"ge": -5}, -5, True),
        ({"lt": -5}, -5, False),
    ],
)
def test_operator(caveat: dict[str, Any], value: Any, holds: bool) -> None:
    reason = run([{"field": "x", **caveat}], {"x": value})
    if holds:
        assert reason is None
    else:
        assert reason is not None and reason.startswith("x ")


def test_reasons_are_short_and_name_the_caveat() -> None:
    assert run([{"field": "amount", "le": 100}], {"amount": 200}) == "amount 200 is not <= 100"
    assert run([{"field": "c", "eq": "EUR"}], {"c": "USD"}) == 'c "USD" is not "EUR"'
    assert run([{"field": "c", "ne": "KP"}], {"c": "KP"}) == 'c must not be "KP"'
    assert run([{"field": "c", "in": ["A", "B"]}], {"c": "Z"}) == 'c "Z" is not one of ["A", "B"]'
    assert run([{"field": "i", "prefix": "FR"}], {"i": "DE1"}) == 'i "DE1" does not start with "FR"'
    long = run([{"field": "s", "eq": "a"}], {"s": "b" * 10_000})
    assert long is not None and len(long) < 100
    huge = run([{"field": "n", "le": 1}], {"n": 10**5000})  # str() of it would raise
    assert huge is not None and "integer" in huge


def test_first_failing_caveat_is_reported() -> None:
    caveats = [
        {"field": "amount", "le": 10_000},
        {"field": "currency", "eq": "EUR"},
        {"field": "payee.country", "ne": "KP"},
    ]
    assert run(caveats, {"amount": 5, "currency": "EUR", "payee": {"country": "FR"}}) is None
    assert run(caveats, {"amount": 5, "currency": "USD", "payee": {"country": "KP"}}) == (
        'currency "USD" is not "EUR"'
    )
    assert run(caveats, {"amount": 5, "currency": "EUR", "payee": {"country": "KP"}}) == (
        'payee.country must not be "KP"'
    )


def test_no_caveats_always_hold() -> None:
    assert evaluate((), {}, now=NOW) is None
    assert parse_caveats([]) == ()


# --------------------------------------------------------------------------- missing, nested


@pytest.mark.parametrize("op", ["eq", "ne", "in", "prefix", "lt", "le", "gt", "ge"])
def test_missing_field_fails_every_operator(op: str) -> None:
    operand: Any = {"in": ["x"], "prefix": "x", "eq": "x", "ne": "x"}.get(op, 0)
    assert run([{"field": "f", op: operand}], {}) == "f is missing"
    assert run([{"field": "f", op: operand}], {"g": "x"}) == "f is missing"
    # "ne" is the tempting one: an absent value is not "different", it is unknown.
    assert run([{"field": "a.f", op: operand}], {"a": {}}) == "a.f is missing"


def test_nested_paths() -> None:
    request = {"payee": {"iban": "FR7630006", "bank": {"country": "FR"}}, "amount": 5}
    assert run([{"field": "payee.iban", "prefix": "FR76"}], request) is None
    assert run([{"field": "payee.bank.country", "eq": "FR"}], request) is None
    assert run([{"field": "payee.bank.country", "eq": "DE"}], request) is not None
    assert (
        run([{"field": "payee.bank.city", "eq": "Paris"}], request) == "payee.bank.city is missing"
    )
    # through a scalar, or through an array: arrays are not indexed, so missing
    assert run([{"field": "amount.x", "eq": 1}], request) == "amount.x is missing"
    assert run([{"field": "l.0", "eq": 1}], {"l": [1]}) == "l.0 is missing"
    assert run([{"field": "l.0", "eq": 1}], {"l": {"0": 1}}) is None
    deep: dict[str, Any] = {"h": 1}
    for name in "gfedcba":
        deep = {name: deep}
    assert run([{"field": "a.b.c.d.e.f.g.h", "eq": 1}], deep) is None
    # a dotted key is not a path
    assert run([{"field": "a.b", "eq": 1}], {"a.b": 1}) == "a.b is missing"


# --------------------------------------------------------------------------- types


def test_bool_is_not_an_integer() -> None:
    for op, operand in (("le", 1), ("lt", 2), ("ge", 0), ("gt", -1)):
        reason = run([{"field": "n", op: operand}], {"n": True})
        assert reason == "n is a boolean, not an integer"
    assert run([{"field": "n", "eq": 1}], {"n": True}) is not None
    assert run([{"field": "n", "eq": 0}], {"n": False}) is not None
    assert run([{"field": "n", "eq": True}], {"n": 1}) is not None
    assert run([{"field": "n", "in": [1, 0]}], {"n": True}) is not None
    assert run([{"field": "n", "ne": 1}], {"n": True}) is None  # true is not 1, it differs
    with pytest.raises(FormatError, match="not a boolean"):
        parse_caveat({"field": "n", "le": True})
    # and as caveats, "eq 1" and "eq true" are different things
    assert parse_caveat({"field": "n", "eq": 1}) != parse_caveat({"field": "n", "eq": True})
    assert parse_caveat({"field": "n", "in": [1]}) != parse_caveat({"field": "n", "in": [True]})
    assert len({parse_caveat({"field": "n", "eq": v}) for v in (1, True, "1", 1)}) == 3


def test_type_mismatch_fails_instead_of_raising() -> None:
    assert run([{"field": "a", "le": 100}], {"a": "50"}) == "a is a string, not an integer"
    assert run([{"field": "a", "le": 100}], {"a": None}) == "a is null, not an integer"
    assert run([{"field": "a", "le": 100}], {"a": [1]}) == "a is an array, not an integer"
    assert run([{"field": "a", "prefix": "1"}], {"a": 12}) == "a is an integer, not a string"
    assert run([{"field": "a", "eq": "x"}], {"a": {"x": 1}}) is not None
    # "ne" must not be passed by wrapping the forbidden value
    assert run([{"field": "c", "ne": "KP"}], {"c": ["KP"]}) is not None
    assert run([{"field": "c", "ne": "KP"}], {"c": {"KP": 1}}) is not None
    assert run([{"field": "c", "in": ["FR"]}], {"c": ["FR"]}) is not None


def test_floats_in_unchecked_requests_fail() -> None:
    """Python says 1.0 == 1 and 99.5 <= 100; caveats must not."""
    for caveat in (
        {"field": "a", "eq": 1},
        {"field": "a", "in": [1]},
        {"field": "a", "le": 100},
        {"field": "a", "ge": 0},
        {"field": "a", "ne": 2},
    ):
        for value in (1.0, 99.5, math.nan, math.inf):
            reason = run([caveat], {"a": value})
            assert reason is not None and "float" in reason


def test_floats_refused_in_caveats() -> None:
    for caveat in (
        {"field": "a", "eq": 1.0},
        {"field": "a", "ne": 0.5},
        {"field": "a", "le": 100.0},
        {"field": "a", "in": [1, 2.5]},
        {"time": {"not_before": 1.5}},
        {"time": {"hours": [9.0, 17], "tz": "UTC"}},
    ):
        with pytest.raises(FormatError, match=r"floats are not allowed.*cents.*string"):
            parse_caveat(caveat)


# --------------------------------------------------------------------------- time


def test_time_period_bounds_are_inclusive() -> None:
    caveat = [{"time": {"not_before": 1_700_000_000, "not_after": 1_700_003_600}}]
    assert run(caveat, {}, now=1_700_000_000) is None
    assert run(caveat, {}, now=1_700_003_600) is None
    assert run(caveat, {}, now=1_700_001_234.5) is None
    before = run(caveat, {}, now=1_699_999_999.9)
    assert before is not None and "before time.not_before (2023-11-14T22:13:20Z)" in before
    after = run(caveat, {}, now=1_700_003_600.1)
    assert after is not None and "after time.not_after" in after
    assert run([{"time": {"not_before": 100}}], {}, now=10**12) is None
    assert run([{"time": {"not_after": 100}}], {}, now=101) is not None
    for bad in (math.nan, math.inf, -math.inf):
        assert run(caveat, {}, now=bad) is not None


def test_daily_window_utc() -> None:
    caveat = [{"time": {"hours": [9, 17], "tz": "UTC"}}]
    assert run(caveat, {}, now=utc(2024, 3, 5, 9, 0, 0)) is None  # start inclusive
    assert run(caveat, {}, now=utc(2024, 3, 5, 16, 59, 59)) is None
    end = run(caveat, {}, now=utc(2024, 3, 5, 17, 0, 0))  # end exclusive
    assert end == "local time tue 2024-03-05 17:00 in UTC is outside 09:00-17:00"
    assert run(caveat, {}, now=utc(2024, 3, 5, 8, 59, 59)) is not None
    whole_day = [{"time": {"hours": [0, 24], "tz": "UTC"}}]
    assert run(whole_day, {}, now=utc(2024, 3, 5, 23, 59, 59)) is None


def test_daily_window_days() -> None:
    weekdays = [
        {"time": {"hours": [9, 17], "days": ["mon", "tue", "wed", "thu", "fri"], "tz": "UTC"}}
    ]
    assert run(weekdays, {}, now=utc(2024, 3, 8, 12)) is None  # Friday
    saturday = run(weekdays, {}, now=utc(2024, 3, 9, 12))
    assert saturday == ("local time sat 2024-03-09 12:00 in UTC is not on mon, tue, wed, thu, fri")
    # The day is the local day: Saturday 02:00 UTC is still Friday in New York.
    friday = [{"time": {"hours": [0, 24], "days": ["fri"], "tz": "America/New_York"}}]
    assert run(friday, {}, now=utc(2024, 3, 9, 2)) is None
    friday_utc = [{"time": {"hours": [0, 24], "days": ["fri"], "tz": "UTC"}}]
    assert run(friday_utc, {}, now=utc(2024, 3, 9, 2)) is not None


def test_daily_window_follows_dst_in_europe_paris() -> None:
    """Paris moves from UTC+1 to UTC+2 at 2024-03-31 01:00 UTC, and back on 10-27."""
    office = [{"time": {"hours": [9, 17], "tz": "Europe/Paris"}}]
    # 07:30 UTC is 08:30 in winter (closed) but 09:30 in summer (open)
    assert run(office, {}, now=utc(2024, 3, 29, 7, 30)) == (
        "local time fri 2024-03-29 08:30 in Europe/Paris is outside 09:00-17:00"
    )
    assert run(office, {}, now=utc(2024, 4, 2, 7, 30)) is None
    # 15:30 UTC is 16:30 in winter (open) but 17:30 in summer (closed)
    assert run(office, {}, now=utc(2024, 3, 29, 15, 30)) is None
    assert run(office, {}, now=utc(2024, 4, 2, 15, 30)) is not None
    # and back in October
    assert run(office, {}, now=utc(2024, 10, 25, 7, 30)) is None
    assert run(office, {}, now=utc(2024, 10, 28, 7, 30)) is not None
    # around the change itself: 00:59:59 UTC is 01:59:59 CET, 01:00 UTC is 03:00 CEST
    night = [{"time": {"hours": [1, 2], "tz": "Europe/Paris"}}]
    assert run(night, {}, now=utc(2024, 3, 31, 0, 59, 59)) is None
    assert run(night, {}, now=utc(2024, 3, 31, 1, 0, 0)) is not None
    three = [{"time": {"hours": [3, 4], "tz": "Europe/Paris"}}]
    assert run(three, {}, now=utc(2024, 3, 31, 1, 0, 0)) is None
    # the repeated hour in October (02:00-03:00 happens twice) is inside [2, 3) both times
    two = [{"time": {"hours": [2, 3], "tz": "Europe/Paris"}}]
    assert run(two, {}, now=utc(2024, 10, 27, 0, 30)) is None
    assert run(two, {}, now=utc(2024, 10, 27, 1, 30)) is None


def test_time_uses_the_given_now_not_the_clock() -> None:
    caveat = [{"time": {"not_after": 1_000}}]  # 1970: long past on any real clock
    assert run(caveat, {}, now=999) is None
    assert run([{"time": {"hours": [9, 17], "tz": "UTC"}}], {}, now=10**20) is not None


# --------------------------------------------------------------------------- parsing


INVALID: list[tuple[Any, str]] = [
    ({"field": "a", "eq": 1, "ne": 2}, "several operators"),
    ({"field": "a", "le": 1, "ge": 0}, "several operators"),
    ({"field": "a"}, "no operator"),
    ({"field": "a", "le": 1, "note": "x"}, "unknown member(s) 'note'"),
    ({"field": "a", "lte": 1}, "unknown member(s) 'lte'"),
    ({"field": "a", "regex": ".*"}, "unknown member"),
    ({"field": "a", "le": 1.0}, "floats are not allowed"),
    ({"field": "a", "le": True}, "must be an integer, not a boolean"),
    ({"field": "a", "le": "100"}, "must be an integer, not a string"),
    ({"field": "a", "le": None}, "must be an integer, not null"),
    ({"field": "a", "eq": [1]}, "expected a JSON scalar"),
    ({"field": "a", "eq": {"b": 1}}, "expected a JSON scalar"),
    ({"field": "a", "eq": 2**53}, "2**53"),
    ({"field": "a", "le": -(2**53)}, "2**53"),
    ({"field": "a", "eq": "x" * 1025}, "at most 1024"),
    ({"field": "a", "eq": "\ud800"}, "lone surrogates"),
    ({"field": "a", "in": []}, "1 to 256"),
    ({"field": "a", "in": list(range(257))}, "1 to 256"),
    ({"field": "a", "in": [1, 2, 1]}, "value 2 (1) is listed twice"),
    ({"field": "a", "in": "EUR"}, "must be an array"),
    ({"field": "a", "in": [["EUR"]]}, "'in' value 0"),
    ({"field": "a", "prefix": ""}, "must not be empty"),
    ({"field": "a", "prefix": 76}, "must be a string"),
    ({"field": "", "eq": 1}, "1 to 256 characters"),
    ({"field": "a" * 257, "eq": 1}, "1 to 256 characters"),
    ({"field": 7, "eq": 1}, "must be a string path"),
    ({"field": "a..b", "eq": 1}, "segment ''"),
    ({"field": ".a", "eq": 1}, "segment ''"),
    ({"field": "a b", "eq": 1}, "segment 'a b'"),
    ({"field": "a/b", "eq": 1}, "segment"),
    ({"field": "a.b.c.d.e.f.g.h.i", "eq": 1}, "deeper than 8"),
    ({"field": "a", "eq": 1, "time": {}}, "unknown member(s) 'time'"),
    ({"time": {}}, "needs not_before/not_after, or hours and tz"),
    ({"time": 5}, "'time' must be an object"),
    ({"time": {"not_before": 1}, "x": 1}, "unknown member(s) 'x' beside 'time'"),
    ({"time": {"since": 1}}, "unknown time member(s) 'since'"),
    ({"time": {"not_before": "2024-01-01"}}, "must be an integer (epoch seconds)"),
    ({"time": {"not_before": True}}, "not a boolean"),
    ({"time": {"not_before": None}}, "leave it out instead of null"),
    ({"time": {"not_before": -1}}, "between 0 and"),
    ({"time": {"not_before": 10, "not_after": 5}}, "later than"),
    ({"time": {"not_after": 5, "hours": [9, 17], "tz": "UTC"}}, "not both"),
    ({"time": {"hours": [9, 17]}}, "needs 'tz'"),
    ({"time": {"tz": "UTC"}}, "needs 'hours'"),
    ({"time": {"hours": [9, 17], "tz": "Mars/Olympus_Mons"}}, "unknown IANA time zone"),
    ({"time": {"hours": [9, 17], "tz": "localtime"}}, "unknown IANA time zone"),
    ({"time": {"hours": [9, 17], "tz": "../../etc/passwd"}}, "unknown IANA time zone"),
    ({"time": {"hours": [9, 17], "tz": 1}}, "unknown IANA time zone"),
    ({"time": {"hours": [9, 25], "tz": "UTC"}}, "1 <= end <= 24"),
    ({"time": {"hours": [-1, 17], "tz": "UTC"}}, "0 <= start <= 23"),
    ({"time": {"hours": [24, 24], "tz": "UTC"}}, "0 <= start <= 23"),
    ({"time": {"hours": [17, 9], "tz": "UTC"}}, "do not wrap past midnight"),
    ({"time": {"hours": [9, 9], "tz": "UTC"}}, "start must be before end"),
    ({"time": {"hours": [9], "tz": "UTC"}}, "[start, end]"),
    ({"time": {"hours": "9-17", "tz": "UTC"}}, "[start, end]"),
    ({"time": {"hours": [9, "17"], "tz": "UTC"}}, "must be an integer, not a string"),
    ({"time": {"hours": [9, 17], "tz": "UTC", "days": []}}, "non-empty"),
    ({"time": {"hours": [9, 17], "tz": "UTC", "days": "mon"}}, "must be an array"),
    ({"time": {"hours": [9, 17], "tz": "UTC", "days": ["monday"]}}, '"monday" is not one of'),
    ({"time": {"hours": [9, 17], "tz": "UTC", "days": ["Mon"]}}, "is not one of"),
    ({"time": {"hours": [9, 17], "tz": "UTC", "days": ["mon", "mon"]}}, "twice"),
    ({"time": {"hours": [9, 17], "tz": "UTC", "week": 1}}, "unknown time member(s) 'week'"),
    ("amount <= 100", "must be a JSON object, not a string"),
    ([{"field": "a", "eq": 1}], "must be a JSON object, not an array"),
    (None, "must be a JSON object, not null"),
    ({}, "needs a 'field' or a 'time' member"),
    ({"comment": "x"}, "needs a 'field' or a 'time' member"),
    ({1: 2}, "member names must be strings"),
]


@pytest.mark.parametrize(("caveat", "problem"), INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_caveat_is_refused_naming_its_index(caveat: Any, problem: str) -> None:
    valid = {"field": "amount", "le": 100}
    with pytest.raises(FormatError) as info:
        parse_caveats([valid, valid, caveat, valid])
    message = str(info.value)
    assert message.startswith("caveat 2: ")
    assert problem in message
    with pytest.raises(FormatError, match=r"^caveat: "):
        parse_caveat(caveat)


def test_too_many_caveats() -> None:
    thirty_two = [{"field": "a", "ge": i} for i in range(32)]
    assert len(parse_caveats(thirty_two)) == 32
    with pytest.raises(FormatError, match=r"^caveat 32: too many caveats \(33; at most 32\)"):
        parse_caveats([*thirty_two, {"field": "a", "ge": 0}])


def test_caveat_list_must_be_an_array() -> None:
    for items in ("[]", b"[]", {"field": "a"}, 5):
        with pytest.raises(FormatError, match="caveats must be an array"):
            parse_caveats(items)  # type: ignore[arg-type]
    # the tuple an Ability carries is fine
    assert len(parse_caveats(({"field": "a", "eq": 1},))) == 1


def test_canonical_json() -> None:
    daily = parse_caveat({"time": {"tz": "Europe/Paris", "days": ["fri", "mon"], "hours": [9, 17]}})
    assert daily.to_json() == {
        "time": {"hours": [9, 17], "days": ["mon", "fri"], "tz": "Europe/Paris"}
    }
    assert isinstance(daily, DailyWindowCaveat) and daily.days == ("mon", "fri")
    assert parse_caveat({"time": {"not_after": 5}}).to_json() == {"time": {"not_after": 5}}
    assert parse_caveat({"in": ["b", "a"], "field": "x"}).to_json() == {
        "field": "x",
        "in": ["b", "a"],
    }


def test_constructors_validate_too() -> None:
    assert FieldCaveat("amount", "le", 100) == parse_caveat({"field": "amount", "le": 100})
    assert TimeRangeCaveat(not_after=5) == parse_caveat({"time": {"not_after": 5}})
    with pytest.raises(FormatError, match="floats"):
        FieldCaveat("amount", "le", 1.5)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="unknown operator"):
        FieldCaveat("amount", "matches", "x")
    with pytest.raises(FormatError, match="unknown IANA"):
        DailyWindowCaveat(9, 17, "Nowhere/Land")
    with pytest.raises(FormatError, match="not_before, not_after or both"):
        TimeRangeCaveat()


def test_evaluate_refuses_raw_json() -> None:
    with pytest.raises(TypeError, match="parse_caveats"):
        evaluate([{"field": "a", "eq": 1}], {"a": 1}, now=NOW)  # type: ignore[list-item]


# --------------------------------------------------------------------------- requests


def test_check_request_accepts_json_and_returns_a_copy() -> None:
    request: dict[str, Any] = {
        "amount": 10_000,
        "currency": "EUR",
        "urgent": False,
        "memo": None,
        "payee": {"iban": "FR76", "tags": ["a", 1, True, None, {"x": []}]},
        "unicode": "Zürich €",
    }
    checked = check_request(request)
    assert checked == request
    request["amount"] = 10**9
    assert checked["amount"] == 10_000
    assert check_request({}) == {}


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        ([], "must be a JSON object, not an array"),
        ("{}", "must be a JSON object, not a string"),
        (None, "must be a JSON object, not null"),
        ({"amount": 1.5}, "request.amount: floats are not allowed"),
        ({"amount": 100.0}, "floats are not allowed"),
        ({"a": {"b": [1, 2, 0.5]}}, "request.a.b[2]: floats are not allowed"),
        ({"a": math.nan}, "floats"),
        ({"a": math.inf}, "floats"),
        ({1: "x"}, "member names must be strings"),
        ({"a": {2: "x"}}, "request.a: member names must be strings"),
        ({"a": (1, 2)}, "tuple is not a JSON type"),
        ({"a": {1, 2}}, "set is not a JSON type"),
        ({"a": b"x"}, "bytes is not a JSON type"),
        ({"a": 2**53}, "within ±(2**53 - 1)"),
        ({"a": -(2**53)}, "within ±(2**53 - 1)"),
        ({"a": "\udc80"}, "valid Unicode"),
        ({"\ud800": 1}, "valid Unicode"),
        ({"a": "x" * MAX_REQUEST_BYTES}, "larger than 65536 bytes"),
        ({"a": list(range(100_000))}, "larger than 65536 bytes"),
        ({"a": "€" * 30_000}, "larger than 65536 bytes"),  # 30 000 chars, 90 000 bytes
    ],
)
def test_check_request_refuses(request_: Any, problem: str) -> None:
    with pytest.raises(FormatError) as info:
        check_request(request_)
    assert problem in str(info.value)


def test_check_request_depth_and_size_limits() -> None:
    def nested(levels: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(levels - 1):
            value = {"a": value}
        return value

    check_request(nested(8))
    with pytest.raises(FormatError, match="nested deeper than 8"):
        check_request(nested(9))
    with pytest.raises(FormatError, match="nested deeper than 8"):
        check_request({"a": [[[[[[[[]]]]]]]]})
    deep: list[Any] = []
    for _ in range(100_000):  # no RecursionError
        deep = [deep]
    with pytest.raises(FormatError, match="nested deeper"):
        check_request({"a": deep})
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(FormatError, match="nested deeper"):
        check_request(cyclic)
    # exactly the limit passes: {"a":"xxx…"} is 8 bytes of framing
    check_request({"a": "x" * (MAX_REQUEST_BYTES - 8)})
    with pytest.raises(FormatError, match="larger than"):
        check_request({"a": "x" * (MAX_REQUEST_BYTES - 7)})


def test_load_request() -> None:
    assert load_request(b'{"amount": 100, "payee": {"iban": "FR76"}}') == {
        "amount": 100,
        "payee": {"iban": "FR76"},
    }
    for text, problem in (
        (b'{"amount": 1, "amount": 100000}', "appears twice"),
        (b'{"p": {"x": 1, "x": 2}}', "appears twice"),
        (b'{"amount": 1.0}', "floats are not allowed"),
        (b'{"amount": 1e3}', "floats are not allowed"),
        (b'{"amount": NaN}', "NaN is not JSON"),
        (b'{"amount": -Infinity}', "-Infinity is not JSON"),
        (b'{"a": "\xff"}', "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"a": "\\ud800"}', "valid Unicode"),
        (b" " * (4 * MAX_REQUEST_BYTES + 1), "bytes of JSON text"),
    ):
        with pytest.raises(FormatError) as info:
            load_request(text)
        assert problem in str(info.value)


# --------------------------------------------------------------------------- properties

KEYS = st.sampled_from(["a", "b", "amount", "x-y", "n_1"])
INTS = st.integers(-(2**53) + 1, 2**53 - 1)
SMALL_INTS = st.integers(-3, 3)
SCALARS = st.none() | st.booleans() | SMALL_INTS | INTS | st.sampled_from(["", "a", "ab", "b"])
SCALARS |= st.text(max_size=8)
PATHS = st.lists(KEYS, min_size=1, max_size=3).map(".".join)

FIELD_CAVEATS = st.one_of(
    st.builds(lambda p, o, v: {"field": p, o: v}, PATHS, st.sampled_from(["eq", "ne"]), SCALARS),
    st.builds(
        lambda p, v: {"field": p, "in": v},
        PATHS,
        st.lists(SCALARS, min_size=1, max_size=5, unique_by=lambda v: (type(v), v)),
    ),
    st.builds(lambda p, v: {"field": p, "prefix": v}, PATHS, st.text(min_size=1, max_size=3)),
    st.builds(
        lambda p, o, v: {"field": p, o: v},
        PATHS,
        st.sampled_from(["lt", "le", "gt", "ge"]),
        SMALL_INTS | INTS,
    ),
)
EPOCHS = st.integers(1_600_000_000, 1_800_000_000)
TIME_CAVEATS = st.one_of(
    st.builds(lambda t: {"time": {"not_before": t}}, EPOCHS),
    st.builds(lambda t: {"time": {"not_after": t}}, EPOCHS),
    st.builds(
        lambda a, b: {"time": {"not_before": min(a, b), "not_after": max(a, b)}}, EPOCHS, EPOCHS
    ),
    st.builds(
        lambda hours, days, tz: {
            "time": {"hours": sorted(hours), "tz": tz, **({"days": days} if days else {})}
        },
        st.lists(st.integers(0, 24), min_size=2, max_size=2, unique=True).filter(
            lambda h: min(h) <= 23
        ),
        st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), unique=True),
        st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
    ),
)
CAVEAT_JSON = FIELD_CAVEATS | TIME_CAVEATS
CAVEATS = CAVEAT_JSON.map(parse_caveat)

# Arbitrary JSON, floats included: evaluate() also sees requests nobody checked.
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["a", "ab", "b"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=3), inner),
    max_leaves=20,
)
REQUESTS = st.dictionaries(KEYS, ANY_JSON, max_size=5)
NOWS = EPOCHS.map(float) | st.floats(1_600_000_000, 1_800_000_000) | st.floats()


@given(st.lists(CAVEATS, max_size=6), REQUESTS, NOWS)
def test_evaluate_never_raises(caveats: list[Caveat], request: dict[str, Any], now: float) -> None:
    reason = evaluate(caveats, request, now=now)
    assert reason is None or (isinstance(reason, str) and 0 < len(reason) < 300)


@given(st.lists(CAVEATS, max_size=5), CAVEATS, st.integers(0, 5), REQUESTS, NOWS)
def test_adding_a_caveat_never_widens(
    caveats: list[Caveat], extra: Caveat, where: int, request: dict[str, Any], now: float
) -> None:
    before = evaluate(caveats, request, now=now)
    more = [*caveats[:where], extra, *caveats[where:]]
    after = evaluate(more, request, now=now)
    if before is not None:
        assert after is not None
    # and the whole list holds exactly when each caveat holds on its own
    assert (after is None) == all(evaluate([c], request, now=now) is None for c in more)


@given(CAVEAT_JSON)
def test_canonical_json_round_trips(obj: dict[str, Any]) -> None:
    caveat = parse_caveat(obj)
    canonical = caveat.to_json()
    assert parse_caveat(json.loads(json.dumps(canonical))) == caveat
    assert parse_caveat(canonical).to_json() == canonical


@given(CAVEATS, REQUESTS, NOWS)
def test_canonical_form_evaluates_the_same(
    caveat: Caveat, request: dict[str, Any], now: float
) -> None:
    again = parse_caveat(caveat.to_json())
    assert evaluate([again], request, now=now) == evaluate([caveat], request, now=now)


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@given(st.dictionaries(KEYS, ANY_JSON, max_size=5))
def test_check_request_refuses_exactly_floats_huge_ints_and_depth(request: dict[str, Any]) -> None:
    def huge(value: Any) -> bool:
        if isinstance(value, dict):
            return any(huge(v) for v in value.values())
        if isinstance(value, list):
            return any(huge(v) for v in value)
        return type(value) is int and abs(value) >= 2**53

    bad = _has_float(request) or huge(request) or _depth(request) > 8
    try:
        checked = check_request(request)
    except FormatError:
        assert bad
    else:
        assert not bad
        assert checked == request
        assert json.loads(json.dumps(checked)) == checked


@given(st.dictionaries(KEYS, ANY_JSON, max_size=5), st.floats(), KEYS)
def test_any_float_in_a_request_is_refused(request: dict[str, Any], value: float, key: str) -> None:
    assume(_depth(request) <= 7)
    with pytest.raises(FormatError, match="floats are not allowed"):
        check_request({**request, "zz": {key: value}})
