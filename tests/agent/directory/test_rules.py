"""The namespace rules parser: strict, typed errors naming the line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.directory.errors import RulesError
from agent.directory.rules import GRANT, OPEN, Rules

AUTHORITY = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"

COMPLETE = f"""
# example.org: names by the registrar's grant
[enrolment]
mode = "grant"
authority = "{AUTHORITY}"

[limits]
claims_per_name = 50
claims_per_claimer = 5
window = "1h"

[contact]
uses = 2
ttl = "3d"

[blocked]
claimers = ["{AUTHORITY}"]
"""


def test_a_complete_file() -> None:
    rules = Rules.parse(COMPLETE)
    assert rules.mode == GRANT and rules.authority == AUTHORITY
    assert (rules.claims_per_name, rules.claims_per_claimer, rules.window) == (50, 5, 3600)
    assert (rules.contact_uses, rules.contact_ttl) == (2, 3 * 86400)
    assert rules.blocked == frozenset({AUTHORITY})


def test_empty_file_is_open_mode() -> None:
    assert Rules.parse("") == Rules.open_mode()
    assert Rules.open_mode().mode == OPEN


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[enrolment]\nmode = 'closed'\n", ":2: enrolment.mode"),
        ("[enrolment]\nmode = 'grant'\n", ":2: enrolment.mode 'grant' needs"),
        ("[enrolment]\nauthority = 'did:key:nope'\n", ":2: enrolment.authority"),
        ("[limits]\n\nclaims_per_name = 0\n", ":3: limits.claims_per_name"),
        ("[limits]\nclaims_per_claimer = true\n", ":2: limits.claims_per_claimer"),
        ("[limits]\nwindow = '1 fortnight'\n", ":2: limits.window"),
        ("[limits]\nwindow = 60\n", ":2: limits.window"),
        ("[contact]\nuses = 5000\n", ":2: contact.uses"),
        ("[blocked]\nclaimers = 'x'\n", ":2: blocked.claimers"),
        ("[blocked]\nclaimers = [1]\n", ":2: blocked.claimers"),
        ("[limits]\nclaims_per_nmae = 5\n", ":2: unknown key limits.claims_per_nmae"),
        ("[limit]\nx = 1\n", ":1: unknown table [limit]"),
        ("mode = 'open'\n", "enrolment"),
        ("[limits\n", "not valid TOML"),
    ],
)
def test_bad_rules_name_line_and_key(text: str, where: str) -> None:
    with pytest.raises(RulesError) as refused:
        Rules.parse(text, source="rules.toml")
    assert where in str(refused.value) or where.lstrip(":") in str(refused.value)
    assert refused.value.code == "bad_rules"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read"):
        Rules.load(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(RulesError, match="not UTF-8"):
        Rules.load(tmp_path / "bin.toml")
