"""Durations: the one spelling of time shared by the policy file and ``--ttl``."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.durations import MAX_SECONDS, format_duration, parse_duration
from policies.errors import FormatError

CANONICAL = re.compile(
    r"(?:[1-9][0-9]*d)?(?:([1-9]|1[0-9]|2[0-3])h)?(?:[1-5]?[0-9]m)?(?:[1-5]?[0-9]s)?"
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        ("2d30s", 2 * 86400 + 30),
        ("600", 600),
        ("1", 1),
        ("90m", 5400),
        ("1h0m", 3600),
        ("3650d", MAX_SECONDS),
        (str(MAX_SECONDS), MAX_SECONDS),
    ],
)
def test_parse_accepts(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("0", "zero"),
        ("0s", "zero"),
        ("0d0h0m0s", "zero"),
        ("-5m", "negative"),
        ("-600", "negative"),
        ("+5m", "not a duration"),
        ("1.5h", "not a duration"),
        ("1w", "not a duration"),
        ("1 h", "not a duration"),
        (" 1h", "not a duration"),
        ("1h ", "not a duration"),
        ("1H", "not a duration"),
        ("h", "not a duration"),
        ("1m1h", "not a duration"),
        ("1h1h", "not a duration"),
        ("1hh", "not a duration"),
        ("1d2", "not a duration"),
        ("ten minutes", "not a duration"),
        ("0x10", "not a duration"),
        ("1_000", "not a duration"),
        ("\u0661\u0662", "not a duration"),  # Arabic-Indic digits are digits to str.isdigit
        ("3651d", "longer than the maximum, 3650d"),
        (str(MAX_SECONDS + 1), "longer than the maximum"),
        ("9" * 40, "too long"),
    ],
)
def test_parse_refuses(text: str, why: str) -> None:
    with pytest.raises(FormatError, match=re.escape(why)):
        parse_duration(text)


@pytest.mark.parametrize("value", [None, 600, 1.5, b"10m"])
def test_parse_refuses_non_strings(value: object) -> None:
    with pytest.raises(FormatError, match="must be a string"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1, "1s"),
        (90, "1m30s"),
        (600, "10m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (86400, "1d"),
        (93784, "1d2h3m4s"),
        (86401, "1d1s"),
        (MAX_SECONDS, "3650d"),
        (MAX_SECONDS + 1, "3650d1s"),  # written for messages, though not parseable
    ],
)
def test_format(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "60"])
def test_format_refuses(value: object) -> None:
    with pytest.raises(FormatError):
        format_duration(value)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=MAX_SECONDS))
def test_round_trip(seconds: int) -> None:
    text = format_duration(seconds)
    assert CANONICAL.fullmatch(text)
    assert parse_duration(text) == seconds
    assert parse_duration(str(seconds)) == seconds


@given(
    st.tuples(
        st.none() | st.integers(0, 3650),
        st.none() | st.integers(0, 10**6),
        st.none() | st.integers(0, 10**6),
        st.none() | st.integers(0, 10**8),
    )
)
def test_compound_forms_sum_their_parts(parts: tuple[int | None, ...]) -> None:
    sizes = (86400, 3600, 60, 1)
    text = "".join(f"{n}{unit}" for n, unit in zip(parts, "dhms", strict=True) if n is not None)
    total = sum(n * size for n, size in zip(parts, sizes, strict=True) if n is not None)
    if not text or total == 0 or total > MAX_SECONDS:
        with pytest.raises(FormatError):
            parse_duration(text)
    else:
        assert parse_duration(text) == total
        # The canonical form is the same duration and is a fixed point.
        assert format_duration(parse_duration(format_duration(total))) == format_duration(total)


@given(
    st.text(max_size=40) | st.from_regex(r"-?[0-9]{0,12}[dhmsw]?[0-9]{0,4}[dhms]?", fullmatch=True)
)
def test_any_text_is_a_valid_duration_or_a_format_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except FormatError:
        return
    assert 1 <= seconds <= MAX_SECONDS
    assert parse_duration(format_duration(seconds)) == seconds
