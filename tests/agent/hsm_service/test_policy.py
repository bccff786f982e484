"""Key states and their dated transitions, and policy changes: approved by the admin
quorum, stored in the state directory (they survive a restart), audited."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.hsm_service.config import KeyPolicy, load_config
from agent.hsm_service.engine import HsmEngine, policy_change_request
from agent.hsm_service.errors import ConfigError, InvalidRequest, Refused
from agent.hsm_service.policy import apply_change, check_operation, effective_state
from tests.agent.hsm_service.conftest import ConfigWriter, Operator, sign_request

Engine = Callable[..., HsmEngine]
ADMIN_QUORUM = {"policy-changes": {"quorum": {"m": 2, "approvers": ["alice", "bob", "carol"]}}}


def _policy(**changes: Any) -> KeyPolicy:
    base: dict[str, Any] = {
        "label": "k",
        "uri": "pkcs11:object=k;type=private",
        "token": "main",
        "operations": frozenset({"sign", "destroy"}),
        "clients": frozenset({"did:key:zX"}),
    }
    return KeyPolicy(**{**base, **changes})


def test_effective_state_follows_the_dates() -> None:
    assert effective_state(_policy(state="pre-active"), 100) == ("pre-active", None)
    assert effective_state(_policy(state="pre-active", activation_date=50), 100) == ("active", 50)
    assert effective_state(_policy(state="pre-active", activation_date=150), 100) == (
        "pre-active",
        None,
    )
    dated = _policy(state="pre-active", activation_date=50, deactivation_date=80)
    assert effective_state(dated, 100) == ("deactivated", 80)
    assert effective_state(_policy(deactivation_date=80), 100) == ("deactivated", 80)
    # Compromised and destroyed are not left by any date.
    assert effective_state(_policy(state="compromised", activation_date=1), 100)[0] == "compromised"


def test_operations_by_state() -> None:
    client = "did:key:zX"
    for state, allowed in (
        ("active", {"sign"}),
        ("pre-active", {"destroy"}),
        ("deactivated", {"destroy"}),
        ("compromised", {"destroy"}),
        ("destroyed", set()),
    ):
        for op in ("sign", "destroy"):
            if op in allowed:
                check_operation(_policy(), state, client, op)
            else:
                with pytest.raises(Refused) as caught:
                    check_operation(_policy(), state, client, op)
                assert caught.value.reason == "key_state"


def test_changes_are_checked_like_the_configuration(
    write_config: ConfigWriter, clients: dict[str, str]
) -> None:
    config = load_config(write_config({"hsm-sign": {}}, extra=ADMIN_QUORUM))
    keys = dict(config.keys)
    bob = clients["bob-app"]
    added = apply_change(config, keys, {"action": "add-client", "key": "hsm-sign", "client": bob})
    assert bob in added.clients
    limited = apply_change(
        config, keys, {"action": "set-key", "key": "hsm-sign", "policy": {"max-uses": 3}}
    )
    assert limited.max_uses == 3 and limited.clients == keys["hsm-sign"].clients
    for change, field in (
        ({"action": "add-client", "key": "hsm-sign", "client": "bob"}, "client"),
        ({"action": "add-client", "key": "nope", "client": bob}, "key"),
        ({"action": "set-state", "key": "hsm-sign", "state": "pre-active"}, "state"),
        (
            {"action": "set-key", "key": "hsm-sign", "policy": {"max-uses": -1}},
            "key.hsm-sign.max-uses",
        ),
        (
            {
                "action": "set-key",
                "key": "hsm-sign",
                "policy": {"quorum": {"m": 0, "approvers": ["alice"]}},
            },
            "key.hsm-sign.quorum.m",
        ),
        (
            {"action": "set-key", "key": "hsm-sign", "policy": {"uri": "pkcs11:object=x"}},
            "policy.uri",
        ),
        ({"action": "remove-client", "key": "hsm-sign", "client": bob}, "client"),
        ({"action": "drop-key", "key": "hsm-sign"}, "action"),
        ({"action": "add-client", "key": "hsm-sign", "client": bob, "x": 1}, "x"),
    ):
        with pytest.raises(ConfigError) as caught:
            apply_change(config, keys, change)
        assert caught.value.field == field, (change, str(caught.value))


def _approved(
    engine: HsmEngine, change: dict[str, Any], nonce: str, *who: Operator, expires: int = 0
) -> dict[str, Any]:
    expires = expires or int(time.time()) + 300
    request = policy_change_request(change, requester="did:admin", nonce=nonce, expires=expires)
    claims = engine.approval_claims(request, expires=expires)
    assert claims["operation"] == "policy-change"
    return {
        "change": change,
        "approvals": [o.approve(claims) for o in who],
        "requester": "did:admin",
        "nonce": nonce,
        "expires": expires,
    }


def test_a_policy_change_needs_the_quorum_and_survives_a_restart(
    open_engine: Engine, clients: dict[str, str], operators: dict[str, Operator], tmp_path: Path
) -> None:
    alice, bob, carol = operators["alice"], operators["bob"], operators["carol"]
    state = tmp_path / "state"
    engine = open_engine({"hsm-sign": {}}, extra=ADMIN_QUORUM, state_dir=state)
    bob_app = clients["bob-app"]
    change = {"action": "add-client", "key": "hsm-sign", "client": bob_app}

    def apply(args: dict[str, Any]) -> None:
        engine.change_policy(
            args["change"],
            args["approvals"],
            requester=args["requester"],
            nonce=args["nonce"],
            expires=args["expires"],
        )

    for reason, args in (
        ("quorum_required", _approved(engine, change, "c1", alice)),  # M-1
        ("quorum_required", _approved(engine, change, "c1", alice, alice)),  # one approver twice
        ("quorum_invalid", {**_approved(engine, change, "c1", alice, bob), "nonce": "c2"}),
        (
            "quorum_invalid",
            {
                **_approved(engine, change, "c1", alice, bob),
                "change": {**change, "client": clients["alice-app"]},
            },
        ),
        (
            "quorum_invalid",
            _approved(engine, change, "c1", alice, bob, expires=int(time.time()) - 5),
        ),
    ):
        with pytest.raises(Refused) as caught:
            apply(args)
        assert caught.value.reason == reason
    with pytest.raises(Refused):
        engine.perform(sign_request(bob_app, "hsm-sign"))
    good = _approved(engine, change, "c1", alice, carol)
    apply(good)
    engine.perform(sign_request(bob_app, "hsm-sign"))
    with pytest.raises(Refused) as reused:
        apply(good)
    assert reused.value.reason == "approval_reused"
    compromise = {"action": "set-state", "key": "hsm-sign", "state": "compromised"}
    apply(_approved(engine, compromise, "c3", bob, carol))
    engine.close()

    restarted = open_engine({"hsm-sign": {}}, extra=ADMIN_QUORUM, state_dir=state)
    view = restarted.key(bob_app, "hsm-sign")  # bob's app is still a client…
    assert view.state == "compromised"  # …of a key still compromised
    assert restarted.config.keys["hsm-sign"].clients == {clients["alice-app"], bob_app}
    with pytest.raises(Refused) as caught:
        restarted.perform(sign_request(bob_app, "hsm-sign"))
    assert caught.value.reason == "key_state"
    changes = [
        e.data
        for e in restarted._log.ledger.audit_entries()
        if e.kind == "policy" and e.data.get("event") == "change"
    ]
    outcomes = [(c["outcome"], c.get("reason")) for c in changes]
    assert outcomes == [
        ("refused", "quorum_required"),
        ("refused", "quorum_required"),
        ("refused", "quorum_invalid"),
        ("refused", "quorum_invalid"),
        ("refused", "quorum_invalid"),
        ("allowed", None),
        ("refused", "approval_reused"),
        ("allowed", None),
    ]


def test_a_later_file_edit_wins_over_a_change_but_states_never_go_back(
    open_engine: Engine, clients: dict[str, str], operators: dict[str, Operator], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    keys: dict[str, Any] = {"hsm-sign": {}, "hsm-ed": {}}
    engine = open_engine(keys, extra=ADMIN_QUORUM, state_dir=state)
    bob_app = clients["bob-app"]
    a, b = operators["alice"], operators["bob"]
    for nonce, change in (
        ("e1", {"action": "add-client", "key": "hsm-sign", "client": bob_app}),
        ("e2", {"action": "add-client", "key": "hsm-ed", "client": bob_app}),
        ("e3", {"action": "set-state", "key": "hsm-ed", "state": "compromised"}),
    ):
        args = _approved(engine, change, nonce, a, b)
        engine.change_policy(
            change, args["approvals"], requester="did:admin", nonce=nonce, expires=args["expires"]
        )
    engine.close()

    # The same file: the changes stand.
    again = open_engine(keys, extra=ADMIN_QUORUM, state_dir=state)
    assert bob_app in again.config.keys["hsm-sign"].clients
    again.close()
    # The file edited for both keys afterwards: its policies apply, but the compromised
    # key stays compromised although the file says active.
    edited = {"hsm-sign": {"max-uses": 5}, "hsm-ed": {"state": "active", "max-uses": 5}}
    later = open_engine(edited, extra=ADMIN_QUORUM, state_dir=state)
    assert bob_app not in later.config.keys["hsm-sign"].clients
    assert later.config.keys["hsm-sign"].max_uses == 5
    assert later.key(clients["alice-app"], "hsm-ed").state == "compromised"
    overrides = [
        e.data["key"]
        for e in later._log.ledger.audit_entries()
        if e.data.get("event") == "override"
    ]
    assert sorted(overrides) == ["hsm-ed", "hsm-sign"]


def test_a_change_that_is_not_plain_json_is_a_bad_request(open_engine: Engine) -> None:
    engine = open_engine({"hsm-sign": {}}, extra=ADMIN_QUORUM)
    for change in ({"action": b"x"}, {"action": float("nan")}, ["add-client"]):
        with pytest.raises(InvalidRequest):
            engine.change_policy(change, [], requester="did:admin", nonce="n", expires=0)  # type: ignore[arg-type]


def test_without_a_policy_change_quorum_nothing_changes(
    open_engine: Engine, clients: dict[str, str], operators: dict[str, Operator]
) -> None:
    engine = open_engine({"hsm-sign": {}})
    change = {"action": "add-client", "key": "hsm-sign", "client": clients["bob-app"]}
    with pytest.raises(Refused) as caught:
        engine.change_policy(change, [], requester="did:admin", nonce="n", expires=0)
    assert caught.value.reason == "quorum_required"
    with pytest.raises(Refused):
        engine.perform(sign_request(clients["bob-app"], "hsm-sign"))


def test_a_changed_limit_applies_at_once(
    open_engine: Engine, clients: dict[str, str], operators: dict[str, Operator]
) -> None:
    engine = open_engine({"hsm-sign": {}}, extra=ADMIN_QUORUM)
    alice = clients["alice-app"]
    engine.perform(sign_request(alice, "hsm-sign"))
    change = {"action": "set-key", "key": "hsm-sign", "policy": {"max-uses": 2}}
    args = _approved(engine, change, "l1", operators["alice"], operators["bob"])
    engine.change_policy(
        change, args["approvals"], requester="did:admin", nonce="l1", expires=args["expires"]
    )
    engine.perform(sign_request(alice, "hsm-sign"))  # the 2nd use
    with pytest.raises(Refused) as caught:
        engine.perform(sign_request(alice, "hsm-sign"))
    assert caught.value.reason == "max_uses"
