"""The issuance policy: strict loading, first-matching-rule semantics, named refusals."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.abilities import Ability
from policies.errors import FormatError, PolicyViolationError
from policies.policy import (
    MAX_USES,
    GrantRequest,
    IssuancePolicy,
    PolicyDecision,
    Rule,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "policy.toml"
REFERENCE = ROOT / "docs" / "policy.md"

# Real did:keys (Ed25519, P-256), so the loader's decoding accepts them.
ALICE = "did:key:z6MknBRWsTDkyk3C8HhsCMP31J5QsZaDtxzyKaJzzg1dE2X4"
BOB = "did:key:z6MkgiQtxXBMd7Uxac2MmxwqjPtQjffT2u2YmoJtHdetpLMj"
CAROL = "did:key:z6Mksqe8Es3ZiRZ2LaDoibTyXALJVYmBmzMCuWVwdG4GWSjL"
DAVE_P256 = "did:key:zDnaeySR1N6KLv9ii9XT9a9XkNJzWshucZbP6onBamHSEUpxR"
X25519_KEY = "did:key:z6LSc5Daw1aN92c87RdxDkVxeWG4uLrWYJXqQyRT9Ho1qTVu"
STRANGER = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"

PAY = Ability("janus:payments/eur", "sign/payment")


def policy(text: str, source: str = "test.toml") -> IssuancePolicy:
    return IssuancePolicy.loads(textwrap.dedent(text), source=source)


def request(
    audience: str = ALICE,
    *abilities: Ability,
    ttl: int = 600,
    uses: int | None = 1,
    depth: int = 0,
    attested: bool = False,
) -> GrantRequest:
    return GrantRequest(
        audience=audience,
        abilities=abilities or (PAY,),
        ttl_seconds=ttl,
        uses=uses,
        depth=depth,
        holder_attested=attested,
    )


def refusal(pol: IssuancePolicy, req: GrantRequest) -> PolicyViolationError:
    with pytest.raises(PolicyViolationError) as info:
        pol.check(req)
    return info.value


PAYMENTS = f"""
    version = 1
    [defaults]
    max_ttl = "1h"
    max_uses = 100
    max_depth = 0
    require = ["pin"]

    [[rule]]
    name = "cloud-payments"
    audiences = ["{ALICE}", "{DAVE_P256}"]
    abilities = [ {{ can = "sign/payment", with = "janus:payments/*" }} ]
    max_ttl = "10m"
    max_uses = 5
    max_depth = 1
    require = ["pin", "touch", "approval", "attested-holder"]
    approvals = 2
"""


# --- the documented example, and each kind of refusal naming its rule ---------------


def test_allowed_request_returns_the_rule_and_its_requirements() -> None:
    decision = policy(PAYMENTS).check(request(ttl=600, uses=5, depth=1, attested=True))
    assert decision == PolicyDecision(
        rule="cloud-payments",
        requirements=frozenset({"pin", "touch", "approval", "attested-holder"}),
        approvals=2,
    )


def test_limits_are_inclusive() -> None:
    pol = policy(PAYMENTS)
    assert pol.check(request(DAVE_P256, ttl=600, uses=5, depth=1, attested=True))
    assert pol.check(request(ttl=1, uses=1, depth=0, attested=True))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ttl": 3600}, "rule 'cloud-payments': ttl 1h exceeds max_ttl 10m"),
        ({"ttl": 601}, "rule 'cloud-payments': ttl 10m1s exceeds max_ttl 10m"),
        ({"uses": 6}, "rule 'cloud-payments': uses 6 exceeds max_uses 5"),
        ({"uses": None}, "rule 'cloud-payments': unlimited uses requested, but max_uses is 5"),
        ({"depth": 2}, "rule 'cloud-payments': depth 2 exceeds max_depth 1"),
        ({"attested": False}, "rule 'cloud-payments': requires an attested holder key"),
    ],
)
def test_each_refusal_names_its_rule_and_limit(changes: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"ttl": 600, "uses": 5, "depth": 1, "attested": True} | changes
    error = refusal(policy(PAYMENTS), request(ALICE, **args))
    assert error.rule == "cloud-payments"
    assert str(error).startswith(message)
    assert error.code == "outside_policy"


def test_all_violations_are_reported_together() -> None:
    error = refusal(policy(PAYMENTS), request(ttl=7200, uses=50, depth=3))
    assert str(error) == (
        "rule 'cloud-payments': ttl 2h exceeds max_ttl 10m; uses 50 exceeds max_uses 5;"
        " depth 3 exceeds max_depth 1; requires an attested holder key ('attested-holder'),"
        " and the holder key's attestation has not been verified"
    )


# --- no rule applies --------------------------------------------------------------


def test_unknown_audience_is_named() -> None:
    error = refusal(policy(PAYMENTS), request(STRANGER))
    assert error.rule is None
    assert str(error) == f"no rule allows audience {STRANGER!r}"


def test_uncovered_ability_is_named() -> None:
    wanted = Ability("janus:treasury/eur", "sign/transfer")
    error = refusal(policy(PAYMENTS), request(ALICE, PAY, wanted))
    assert error.rule is None
    assert str(error) == (
        f"no rule allows 'sign/transfer' on 'janus:treasury/eur' for audience {ALICE!r}"
    )


def test_abilities_split_over_rules_need_separate_grants() -> None:
    pol = policy(
        f"""
        version = 1
        [defaults]
        max_ttl = "1h"
        max_uses = 10
        [[rule]]
        name = "pay"
        audiences = ["{ALICE}"]
        abilities = [ {{ can = "sign/payment", with = "janus:payments/*" }} ]
        [[rule]]
        name = "mail"
        audiences = ["{ALICE}"]
        abilities = [ {{ can = "msg/send", with = "janus:mailbox/ops" }} ]
        """
    )
    mail = Ability("janus:mailbox/ops", "msg/send")
    assert pol.check(request(ALICE, PAY)).rule == "pay"
    assert pol.check(request(ALICE, mail)).rule == "mail"
    error = refusal(pol, request(ALICE, PAY, mail))
    assert error.rule is None
    assert "no single rule" in str(error) and "separate grants" in str(error)


# --- first matching rule ----------------------------------------------------------

ORDERED = f"""
    version = 1
    [defaults]
    max_ttl = "1h"
    max_uses = 100

    [[rule]]
    name = "alice-large"
    audiences = ["{ALICE}"]
    abilities = [ {{ can = "sign/payment", with = "janus:payments/eur/large" }} ]
    max_ttl = "5m"
    max_uses = 1
    require = ["pin", "approval"]

    [[rule]]
    name = "alice-payments"
    audiences = ["{ALICE}"]
    abilities = [ {{ can = "sign/payment", with = "janus:payments/*" }} ]
    max_ttl = "30m"

    [[rule]]
    name = "anyone-payments"
    audiences = ["*"]
    abilities = [ {{ can = "sign/*", with = "janus:payments/*" }} ]
"""


def test_first_matching_rule_in_file_order_applies() -> None:
    pol = policy(ORDERED)
    large = Ability("janus:payments/eur/large", "sign/payment")
    assert pol.check(request(ALICE, large, ttl=300)).rule == "alice-large"
    assert pol.check(request(ALICE, PAY, ttl=1800)).rule == "alice-payments"
    assert pol.check(request(BOB, large, ttl=3600, uses=100)).rule == "anyone-payments"


def test_a_refusing_first_rule_is_not_bypassed_by_a_looser_later_one() -> None:
    # "anyone-payments" would allow 1h and 100 uses for Alice, but "alice-large" comes
    # first and applies: policies read like firewalls, top down.
    large = Ability("janus:payments/eur/large", "sign/payment")
    error = refusal(policy(ORDERED), request(ALICE, large, ttl=3600, uses=2))
    assert error.rule == "alice-large"
    assert "ttl 1h exceeds max_ttl 5m" in str(error)
    assert "uses 2 exceeds max_uses 1" in str(error)


def test_rule_applies_only_when_it_covers_every_requested_ability() -> None:
    pol = policy(ORDERED)
    large = Ability("janus:payments/eur/large", "sign/payment")
    # alice-large does not cover PAY, so the pair falls to alice-payments.
    assert pol.check(request(ALICE, large, PAY)).rule == "alice-payments"
    refund = Ability("janus:payments/eur", "sign/refund")
    assert pol.check(request(ALICE, PAY, refund)).rule == "anyone-payments"


def test_audience_mismatch_skips_a_rule() -> None:
    pol = policy(ORDERED)
    large = Ability("janus:payments/eur/large", "sign/payment")
    assert pol.check(request(CAROL, large, ttl=3600)).rule == "anyone-payments"


# --- wildcards ---------------------------------------------------------------------


def test_wildcard_audience_matches_any_holder() -> None:
    pol = policy(ORDERED)
    for audience in (ALICE, BOB, CAROL, DAVE_P256, STRANGER):
        refund = Ability("janus:payments/usd", "sign/refund")
        assert pol.check(request(audience, refund)).rule == "anyone-payments"


@pytest.mark.parametrize(
    ("resource", "action", "allowed"),
    [
        ("janus:payments/eur", "sign/payment", True),
        ("janus:payments/eur/large/x", "sign/payment", True),
        ("janus:payments/*", "sign/payment", True),  # a wildcard request, covered
        ("janus:payments/eur/*", "sign/payment", True),
        ("janus:payments", "sign/payment", False),  # trailing '*' needs a segment
        ("janus:paymentsx/eur", "sign/payment", False),
        ("janus:payments/eur", "sign/payment/extra", False),
        ("janus:payments/eur", "sign/*", False),  # wider than the rule's action
        ("janus:payments/eur", "*", False),
    ],
)
def test_wildcard_abilities(resource: str, action: str, allowed: bool) -> None:
    pol = policy(PAYMENTS)
    req = request(ALICE, Ability(resource, action), ttl=60, uses=1, attested=True)
    if allowed:
        assert pol.check(req).rule == "cloud-payments"
    else:
        assert refusal(pol, req).rule is None


def test_star_action_covers_every_action_on_the_resource() -> None:
    pol = policy(
        f"""
        version = 1
        [[rule]]
        name = "all-actions"
        audiences = ["{BOB}"]
        abilities = [ {{ can = "*", with = "janus:mailbox/*" }} ]
        max_ttl = "1d"
        max_uses = "unlimited"
        """
    )
    for action in ("msg/send", "msg/receive", "read", "*", "msg/*"):
        req = request(BOB, Ability("janus:mailbox/ops", action), uses=None)
        assert pol.check(req).rule == "all-actions"
    assert refusal(pol, request(BOB, Ability("janus:payments/eur", "read"))).rule is None


def test_caveats_are_ignored_by_the_policy() -> None:
    capped = Ability("janus:payments/eur", "sign/payment", ({"le": ["amount", 100]},))
    decision = policy(PAYMENTS).check(request(ALICE, capped, attested=True))
    assert decision.rule == "cloud-payments"


# --- defaults ----------------------------------------------------------------------


def test_rules_inherit_defaults_and_may_override_them() -> None:
    pol = policy(
        f"""
        version = 1
        [defaults]
        max_ttl = "1h"
        max_uses = 100
        max_depth = 2
        require = ["pin", "touch"]

        [[rule]]
        name = "inherits"
        audiences = ["{ALICE}"]
        abilities = [ {{ can = "read", with = "janus:reports/*" }} ]

        [[rule]]
        name = "overrides"
        audiences = ["{BOB}"]
        abilities = [ {{ can = "read", with = "janus:reports/*" }} ]
        max_ttl = "2h"
        max_uses = 3
        max_depth = 0
        require = []
        """
    )
    inherits, overrides = pol.rules
    assert (inherits.max_ttl, inherits.max_uses, inherits.max_depth) == (3600, 100, 2)
    assert inherits.require == {"pin", "touch"} and inherits.approvals == 0
    assert (overrides.max_ttl, overrides.max_uses, overrides.max_depth) == (7200, 3, 0)
    assert overrides.require == frozenset()
    report = Ability("janus:reports/q4", "read")
    assert pol.check(request(ALICE, report, ttl=3600, uses=100, depth=2)).requirements == {
        "pin",
        "touch",
    }
    assert refusal(pol, request(ALICE, report, ttl=3601)).rule == "inherits"
    assert refusal(pol, request(ALICE, report, uses=101)).rule == "inherits"
    assert refusal(pol, request(ALICE, report, depth=3)).rule == "inherits"
    assert pol.check(request(BOB, report, ttl=7200, uses=3)).requirements == frozenset()
    assert refusal(pol, request(BOB, report, depth=1)).rule == "overrides"


def test_built_in_defaults_without_a_defaults_table() -> None:
    pol = policy(
        f"""
        version = 1
        [[rule]]
        name = "minimal"
        audiences = ["{ALICE}"]
        abilities = [ {{ can = "read", with = "janus:reports/*" }} ]
        max_ttl = "1h"
        max_uses = 1
        """
    )
    (rule,) = pol.rules
    assert rule.max_depth == 0  # no redelegation unless allowed
    assert rule.require == {"pin"}
    assert rule.approvals == 0


def test_approvals_default_to_one_and_can_come_from_defaults() -> None:
    text = f"""
        version = 1
        [defaults]
        max_ttl = "1h"
        max_uses = 1
        {{approvals}}
        [[rule]]
        name = "one"
        audiences = ["{ALICE}"]
        abilities = [ {{{{ can = "read", with = "janus:x/*" }}}} ]
        require = ["approval"]
        [[rule]]
        name = "none"
        audiences = ["{BOB}"]
        abilities = [ {{{{ can = "read", with = "janus:x/*" }}}} ]
        """
    one, none = policy(text.format(approvals="")).rules
    assert (one.approvals, none.approvals) == (1, 0)
    one, none = policy(text.format(approvals="approvals = 3")).rules
    # A default count applies to rules that require approval, and only to them.
    assert (one.approvals, none.approvals) == (3, 0)
    decision = policy(text.format(approvals="approvals = 3")).check(
        request(ALICE, Ability("janus:x/y", "read"))
    )
    assert decision == PolicyDecision("one", frozenset({"approval"}), 3)


def test_unlimited_uses_must_be_explicit() -> None:
    pol = policy(
        f"""
        version = 1
        [defaults]
        max_ttl = "7d"
        max_uses = "unlimited"
        [[rule]]
        name = "mailbox"
        audiences = ["{CAROL}"]
        abilities = [ {{ can = "msg/*", with = "janus:mailbox/ops" }} ]
        [[rule]]
        name = "counted"
        audiences = ["{ALICE}"]
        abilities = [ {{ can = "msg/*", with = "janus:mailbox/ops" }} ]
        max_uses = 10
        """
    )
    mail = Ability("janus:mailbox/ops", "msg/receive")
    assert pol.rules[0].max_uses is None
    assert pol.check(request(CAROL, mail, uses=None, ttl=7 * 86400)).rule == "mailbox"
    assert pol.check(request(CAROL, mail, uses=10**9)).rule == "mailbox"
    assert "unlimited uses requested" in str(refusal(pol, request(ALICE, mail, uses=None)))


# --- permissive --------------------------------------------------------------------


def test_permissive_policy_allows_anything_within_its_bounds() -> None:
    pol = IssuancePolicy.permissive()
    anything = (
        Ability("janus:payments/*", "*"),
        Ability("https://example.com/api", "http/post"),
        Ability("did:key:z6MknBRWsTDkyk3C8HhsCMP31J5QsZaDtxzyKaJzzg1dE2X4", "msg/send"),
    )
    decision = pol.check(request(STRANGER, *anything, ttl=86400, uses=1000, depth=1))
    assert decision == PolicyDecision("permissive", frozenset({"pin"}), 0)
    limits: list[tuple[dict[str, Any], str]] = [
        ({"ttl": 86401}, "ttl 1d1s exceeds max_ttl 1d"),
        ({"uses": 1001}, "uses 1001 exceeds max_uses 1000"),
        ({"uses": None}, "unlimited uses requested, but max_uses is 1000"),
        ({"depth": 2}, "depth 2 exceeds max_depth 1"),
    ]
    for changes, limit in limits:
        error = refusal(pol, request(STRANGER, PAY, **changes))
        assert error.rule == "permissive"
        assert str(error) == f"rule 'permissive': {limit}"


# --- immutability ------------------------------------------------------------------


def test_policy_is_immutable_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(PAYMENTS))
    good = IssuancePolicy.load(path)
    before = good.rules
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.rules = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.rules[0].max_uses = 10**6  # type: ignore[misc]
    path.write_text(textwrap.dedent(PAYMENTS).replace("max_uses = 5", 'max_uses = "lots"'))
    with pytest.raises(FormatError, match="max_uses"):
        IssuancePolicy.load(path)
    assert good.rules is before
    assert good.source == str(path)
    assert "uses 6 exceeds max_uses 5" in str(refusal(good, request(uses=6, attested=True)))


# --- loading: every malformed case names the file, the rule and the key ------------

RULE = f"""
[[rule]]
name = "r1"
audiences = ["{ALICE}"]
abilities = [ {{ can = "sign/payment", with = "janus:payments/*" }} ]
max_ttl = "10m"
max_uses = 5
"""


def with_rule(**replace: str | None) -> str:
    """The minimal valid policy, with rule keys replaced (None deletes the key)."""
    lines = []
    for line in RULE.strip().splitlines()[1:]:
        key = line.split("=", 1)[0].strip()
        if key in replace:
            value = replace.pop(key)
            if value is not None:
                lines.append(f"{key} = {value}")
        else:
            lines.append(line)
    lines += [f"{key} = {value}" for key, value in replace.items() if value is not None]
    return "version = 1\n[[rule]]\n" + "\n".join(lines) + "\n"


def test_minimal_policy_loads() -> None:
    (rule,) = policy(with_rule()).rules
    assert rule == Rule(
        name="r1",
        audiences=(ALICE,),
        abilities=(Ability("janus:payments/*", "sign/payment"),),
        max_ttl=600,
        max_uses=5,
        max_depth=0,
        require=frozenset({"pin"}),
        approvals=0,
    )


R1 = "rule #1 'r1'"

MALFORMED_RULES: list[tuple[dict[str, str | None], str]] = [
    ({"name": None}, "rule #1: name: missing"),
    ({"name": "42"}, "rule #1: name: 42"),
    ({"name": '"has space"'}, "rule #1: name: 'has space'"),
    ({"name": '""'}, "rule #1: name: ''"),
    ({"name": '"-leading"'}, "rule #1: name:"),
    ({"max_use": "5"}, f"{R1}: unknown key(s) 'max_use'"),
    ({"audience": f'"{ALICE}"'}, f"{R1}: unknown key(s) 'audience'"),
    ({"audiences": None}, f"{R1}: audiences: missing"),
    ({"audiences": "[]"}, f"{R1}: audiences: must be a non-empty array"),
    ({"audiences": f'"{ALICE}"'}, f"{R1}: audiences: must be a non-empty array"),
    ({"audiences": "[1]"}, f"{R1}: audiences: 1 is not a string"),
    ({"audiences": f'["{ALICE}", "{ALICE}"]'}, f"{R1}: audiences: '{ALICE}' is listed twice"),
    ({"audiences": '["alice"]'}, f"{R1}: audiences: 'alice' must be '*' or a did:key"),
    ({"audiences": '["did:web:example.com"]'}, f"{R1}: audiences: 'did:web:example.com'"),
    ({"audiences": f'["{ALICE}#{ALICE[8:]}"]'}, f"{R1}: audiences:"),
    ({"audiences": f'["{ALICE[:-3]}"]'}, f"{R1}: audiences: '{ALICE[:-3]}'"),
    ({"audiences": '["did:key:z0OIl"]'}, f"{R1}: audiences: 'did:key:z0OIl'"),
    ({"audiences": f'["{X25519_KEY}"]'}, f"{R1}: audiences: '{X25519_KEY}' is an X25519 key"),
    ({"audiences": '["**"]'}, f"{R1}: audiences: '**'"),
    ({"abilities": None}, f"{R1}: abilities: missing"),
    ({"abilities": "[]"}, f"{R1}: abilities: must be a non-empty array"),
    ({"abilities": '"sign/payment"'}, f"{R1}: abilities: must be a non-empty array"),
    ({"abilities": '["sign/payment"]'}, f"{R1}: abilities #1: must be a table"),
    ({"abilities": '[{ with = "janus:x" }]'}, f"{R1}: abilities #1: can: missing"),
    ({"abilities": '[{ can = "read" }]'}, f"{R1}: abilities #1: with: missing"),
    ({"abilities": '[{ can = 1, with = "janus:x" }]'}, f"{R1}: abilities #1: can: must be a"),
    (
        {"abilities": '[{ can = "read", with = "janus:x", nb = [] }]'},
        f"{R1}: abilities #1: unknown key(s) 'nb'",
    ),
    (
        {"abilities": '[{ can = "read", with = "janus:x" }, { can = "Read", with = "janus:x" }]'},
        f"{R1}: abilities #2: action 'Read' is not well formed",
    ),
    ({"abilities": '[{ can = "read", with = "no scheme" }]'}, f"{R1}: abilities #1: resource"),
    ({"abilities": '[{ can = "read", with = "janus:a*" }]'}, f"{R1}: abilities #1: resource"),
    ({"abilities": '[{ can = "read", with = "janus:x/a*" }]'}, "must be a whole segment"),
    ({"abilities": '[{ can = "sign/pay*", with = "janus:x" }]'}, "must be a whole segment"),
    ({"abilities": '[{ can = "", with = "janus:x" }]'}, f"{R1}: abilities #1: action"),
    (
        {"abilities": '[{ can = "read", with = "janus:x" }, { with = "janus:x", can = "read" }]'},
        f"{R1}: abilities #2: listed twice",
    ),
    ({"max_ttl": '"10x"'}, f"{R1}: max_ttl: not a duration: '10x'"),
    ({"max_ttl": "600"}, f'{R1}: max_ttl: must be a duration string such as "10m", not 600'),
    ({"max_ttl": '"0s"'}, f"{R1}: max_ttl: duration '0s' is zero"),
    ({"max_ttl": '"-1h"'}, f"{R1}: max_ttl: duration '-1h' is negative"),
    ({"max_ttl": '"3651d"'}, f"{R1}: max_ttl: duration '3651d' is longer than the maximum"),
    ({"max_ttl": None}, f"{R1}: max_ttl: not set, here or in [defaults]"),
    ({"max_uses": None}, f"{R1}: max_uses: not set, here or in [defaults]"),
    ({"max_uses": "0"}, f"{R1}: max_uses: must be an integer from 1 to {MAX_USES}"),
    ({"max_uses": "-5"}, f"{R1}: max_uses: must be an integer"),
    ({"max_uses": "true"}, f"{R1}: max_uses: must be an integer from 1 to {MAX_USES} or"),
    ({"max_uses": "5.0"}, f"{R1}: max_uses: must be an integer"),
    ({"max_uses": '"5"'}, f"{R1}: max_uses: must be an integer"),
    ({"max_uses": '"Unlimited"'}, f"{R1}: max_uses: must be an integer"),
    ({"max_uses": str(MAX_USES + 1)}, f"{R1}: max_uses: must be an integer"),
    ({"max_depth": "-1"}, f"{R1}: max_depth: must be an integer from 0 to 9, not -1"),
    ({"max_depth": "10"}, f"{R1}: max_depth: must be an integer from 0 to 9, not 10"),
    ({"max_depth": '"1"'}, f"{R1}: max_depth: must be an integer from 0 to 9, not '1'"),
    ({"max_depth": "false"}, f"{R1}: max_depth: must be an integer"),
    ({"require": '"pin"'}, f"{R1}: require: must be an array, not a string"),
    ({"require": '["pin", "retina"]'}, f"{R1}: require: unknown requirement 'retina'"),
    ({"require": '["PIN"]'}, f"{R1}: require: unknown requirement 'PIN'"),
    ({"require": "[1]"}, f"{R1}: require: unknown requirement 1"),
    ({"require": '["pin", "pin"]'}, f"{R1}: require: 'pin' is listed twice"),
    ({"approvals": "2"}, f"{R1}: approvals: set, but require does not include 'approval'"),
    (
        {"require": '["approval"]', "approvals": "0"},
        f"{R1}: approvals: must be an integer from 1 to 100, not 0",
    ),
    ({"require": '["approval"]', "approvals": "101"}, f"{R1}: approvals: must be an integer"),
    ({"require": '["approval"]', "approvals": '"2"'}, f"{R1}: approvals: must be an integer"),
]


@pytest.mark.parametrize(("replace", "message"), MALFORMED_RULES)
def test_malformed_rule_is_refused_naming_file_rule_and_key(
    replace: dict[str, str | None], message: str
) -> None:
    with pytest.raises(FormatError) as info:
        policy(with_rule(**replace), source="bank.toml")
    assert str(info.value).startswith("bank.toml: ")
    assert message in str(info.value)


def test_the_rule_index_and_name_point_at_the_bad_rule() -> None:
    second = RULE.replace('"r1"', '"r2"').replace("max_uses = 5", "max_uses = 0")
    with pytest.raises(FormatError, match=re.escape("x.toml: rule #2 'r2': max_uses:")):
        policy("version = 1\n" + RULE + second, source="x.toml")


MALFORMED_DOCUMENTS: list[tuple[str, str]] = [
    ("version = 1\n[[rule]\n", "x.toml: not valid TOML"),
    ('version = 1\nname = "a"\nname = "b"\n' + RULE, "x.toml: not valid TOML"),
    (RULE, "x.toml: version: missing"),
    ("version = 2\n" + RULE, "x.toml: version: must be 1, not 2"),
    ('version = "1"\n' + RULE, "x.toml: version: must be 1, not '1'"),
    ("version = true\n" + RULE, "x.toml: version: must be 1, not True"),
    ("version = 1.0\n" + RULE, "x.toml: version: must be 1, not 1.0"),
    ("version = 1\nrules = []\n" + RULE, "x.toml: the top level: unknown key(s) 'rules'"),
    ("version = 1\n", "x.toml: rule: no rules"),
    ("version = 1\nrule = []\n", "x.toml: rule: no rules"),
    ("version = 1\nrule = 3\n", "x.toml: rule: must be an array of tables"),
    ('version = 1\n[rule]\nname = "r1"\n', "x.toml: rule: must be an array of tables"),
    ("version = 1\nrule = [1]\n", "x.toml: rule #1: must be a table, not an integer"),
    ("version = 1\ndefaults = 1\n" + RULE, "x.toml: defaults: must be a table, not an integer"),
    (
        "version = 1\n[defaults]\nname = 'x'\n" + RULE,
        "x.toml: [defaults]: unknown key(s) 'name'",
    ),
    (
        "version = 1\n[defaults]\nmax_ttl = '1 hour'\n" + RULE,
        "x.toml: [defaults]: max_ttl: not a duration: '1 hour'",
    ),
    (
        "version = 1\n[defaults]\nmax_uses = 0\n" + RULE,
        "x.toml: [defaults]: max_uses: must be an integer",
    ),
    (
        "version = 1\n[defaults]\nmax_depth = 99\n" + RULE,
        "x.toml: [defaults]: max_depth: must be an integer from 0 to 9",
    ),
    (
        "version = 1\n[defaults]\nrequire = ['touch', 'fingerprint']\n" + RULE,
        "x.toml: [defaults]: require: unknown requirement 'fingerprint'",
    ),
    (
        "version = 1\n[defaults]\napprovals = -1\n" + RULE,
        "x.toml: [defaults]: approvals: must be an integer from 1 to 100",
    ),
    (
        "version = 1\n" + RULE + RULE.replace("max_uses = 5", "max_uses = 6"),
        "x.toml: rule #2 'r1': name: duplicate of rule #1",
    ),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED_DOCUMENTS)
def test_malformed_document_is_refused(text: str, message: str) -> None:
    with pytest.raises(FormatError) as info:
        IssuancePolicy.loads(text, source="x.toml")
    assert str(info.value).startswith(message)


def test_default_source_name() -> None:
    with pytest.raises(FormatError, match=r"^<string>: version: missing"):
        IssuancePolicy.loads("")


def test_unreadable_or_binary_file_is_a_format_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(FormatError, match=re.escape(f"{missing}: cannot read the policy")):
        IssuancePolicy.load(missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"version = 1\n# \xff\xfe\n")
    with pytest.raises(FormatError, match=re.escape(f"{binary}: not UTF-8")):
        IssuancePolicy.load(binary)


def test_from_mapping_refuses_a_non_table() -> None:
    with pytest.raises(FormatError, match=r"^conf: a policy must be a table"):
        IssuancePolicy.from_mapping([], source="conf")  # type: ignore[arg-type]


def test_rules_built_in_code_keep_the_loader_invariants() -> None:
    base: dict[str, Any] = {
        "name": "r",
        "audiences": ("*",),
        "abilities": (PAY,),
        "max_ttl": 60,
        "max_uses": 1,
        "max_depth": 0,
        "require": frozenset({"pin"}),
        "approvals": 0,
    }
    Rule(**base)
    for bad in (
        {"name": "no spaces"},
        {"audiences": ()},
        {"abilities": ()},
        {"require": frozenset({"retina"})},
        {"require": frozenset({"approval"})},
        {"approvals": 2},
    ):
        with pytest.raises(FormatError):
            Rule(**(base | bad))
    rule = Rule(**base)
    with pytest.raises(FormatError, match="at least one rule"):
        IssuancePolicy(())
    with pytest.raises(FormatError, match="duplicate rule name 'r'"):
        IssuancePolicy((rule, rule))


@pytest.mark.parametrize(
    "changes",
    [
        {"audience": ""},
        {"abilities": ()},
        {"abilities": ("sign/payment",)},
        {"ttl_seconds": 0},
        {"ttl_seconds": -60},
        {"ttl_seconds": True},
        {"uses": 0},
        {"uses": -1},
        {"depth": -1},
        {"depth": 1.0},
        {"holder_attested": 1},
    ],
)
def test_malformed_requests_are_refused_before_any_rule(changes: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "audience": ALICE,
        "abilities": (PAY,),
        "ttl_seconds": 60,
        "uses": 1,
        "depth": 0,
    } | changes
    with pytest.raises(FormatError, match=r"^grant request: "):
        GrantRequest(**args)


def test_request_abilities_given_as_a_list_become_a_tuple() -> None:
    req = GrantRequest(ALICE, [PAY], 60, 1, 0)  # type: ignore[arg-type]
    assert req.abilities == (PAY,)


def test_check_needs_a_grant_request() -> None:
    with pytest.raises(TypeError):
        IssuancePolicy.permissive().check({"audience": ALICE})  # type: ignore[arg-type]


# --- robustness: anything TOML can hold is a policy or a FormatError ---------------

toml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["*", "10m", "unlimited", "pin", "approval", ALICE, "janus:x/*"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["name", "can", "with", "max_ttl", "max_uses", "require", "x"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)


def _valid_document() -> dict[str, Any]:
    import tomllib

    return tomllib.loads(textwrap.dedent(PAYMENTS))


@given(
    st.sampled_from(["top", "defaults", "rule"]),
    st.sampled_from(
        [
            "version",
            "defaults",
            "rule",
            "name",
            "audiences",
            "abilities",
            "max_ttl",
            "max_uses",
            "max_depth",
            "require",
            "approvals",
            "other",
        ]
    ),
    toml_values,
)
def test_any_mutation_loads_or_is_a_format_error(where: str, key: str, value: object) -> None:
    document = _valid_document()
    table = {
        "top": document,
        "defaults": document["defaults"],
        "rule": document["rule"][0],
    }[where]
    table[key] = value
    try:
        pol = IssuancePolicy.from_mapping(document, source="fuzz")
    except FormatError as exc:
        assert str(exc).startswith("fuzz: ")
        return
    assert pol.rules


# --- the example file and the reference's examples ----------------------------------


def test_example_file_grants_what_its_comments_say() -> None:
    pol = IssuancePolicy.load(EXAMPLE)
    changes: dict[str, Any]
    treasury = "did:key:z6MkgiQtxXBMd7Uxac2MmxwqjPtQjffT2u2YmoJtHdetpLMj"
    payments = (
        "did:key:z6MknBRWsTDkyk3C8HhsCMP31J5QsZaDtxzyKaJzzg1dE2X4",
        "did:key:zDnaeySR1N6KLv9ii9XT9a9XkNJzWshucZbP6onBamHSEUpxR",
    )
    mailbox = "did:key:z6Mksqe8Es3ZiRZ2LaDoibTyXALJVYmBmzMCuWVwdG4GWSjL"
    assert [r.name for r in pol.rules] == [
        "treasury-transfers",
        "cloud-payments",
        "ops-mailbox",
        "read-reports",
    ]

    # treasury-transfers
    transfer = Ability("janus:treasury/eur/ops", "sign/transfer")
    decision = pol.check(request(treasury, transfer, ttl=900, uses=1, attested=True))
    assert decision == PolicyDecision(
        "treasury-transfers", frozenset({"pin", "approval", "attested-holder"}), 2
    )
    for changes in ({"uses": 2}, {"attested": False}, {"depth": 1}):
        args: dict[str, Any] = {"ttl": 900, "uses": 1, "attested": True} | changes
        assert refusal(pol, request(treasury, transfer, **args)).rule == "treasury-transfers"

    # cloud-payments
    for agent in payments:
        for ability in (PAY, Ability("janus:payments/*", "sign/payment")):
            decision = pol.check(request(agent, ability, ttl=600, uses=5, depth=1))
            assert decision == PolicyDecision("cloud-payments", frozenset({"pin", "approval"}), 1)
    assert str(refusal(pol, request(payments[0], PAY, ttl=3600))) == (
        "rule 'cloud-payments': ttl 1h exceeds max_ttl 10m"
    )
    for changes in ({"uses": 6}, {"uses": None}, {"depth": 2}):
        assert refusal(pol, request(payments[0], PAY, **changes)).rule == "cloud-payments"
    assert refusal(pol, request(payments[0], transfer, attested=True)).rule is None

    # ops-mailbox
    for action in ("msg/receive", "msg/send"):
        mail = Ability("janus:mailbox/ops", action)
        decision = pol.check(request(mailbox, mail, ttl=7 * 86400, uses=None))
        assert decision == PolicyDecision("ops-mailbox", frozenset({"pin"}), 0)
    week_and_a_day = request(mailbox, Ability("janus:mailbox/ops", "msg/send"), ttl=8 * 86400)
    assert refusal(pol, week_and_a_day).rule == "ops-mailbox"
    assert refusal(pol, request(mailbox, Ability("janus:mailbox/hr", "msg/send"))).rule is None

    # read-reports, for anyone, within the defaults
    report = Ability("janus:reports/2024/q4", "read/summary")
    for agent in (STRANGER, treasury, mailbox, *payments):
        decision = pol.check(request(agent, report, ttl=3600, uses=100))
        assert decision == PolicyDecision("read-reports", frozenset({"pin"}), 0)
    too_much: list[dict[str, Any]] = [{"ttl": 7200}, {"uses": 101}, {"depth": 1}]
    for changes in too_much:
        assert refusal(pol, request(STRANGER, report, **changes)).rule == "read-reports"
    write = Ability("janus:reports/2024/q4", "write/summary")
    assert refusal(pol, request(STRANGER, write)).rule is None


def _reference_policies() -> list[str]:
    text = REFERENCE.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    return [block for block in blocks if block.lstrip().startswith("version")]


def test_reference_examples_load() -> None:
    examples = _reference_policies()
    assert len(examples) >= 2
    for number, text in enumerate(examples, start=1):
        assert IssuancePolicy.loads(text, source=f"docs/policy.md example {number}").rules


def test_reference_describes_the_permissive_policy_exactly() -> None:
    (described,) = [text for text in _reference_policies() if 'name = "permissive"' in text]
    assert IssuancePolicy.loads(described).rules == IssuancePolicy.permissive().rules
