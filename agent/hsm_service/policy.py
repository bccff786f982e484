"""Per-key policy: KMIP-style states with dated transitions, the checks made before the
ledger is asked, and policy changes applied to a key's settings.

States follow KMIP (Key Management Interoperability Protocol 2.1, §3.31 and its state
diagram): a key is *pre-active* until its activation date, *active* until its
deactivation date, then *deactivated*; it may be declared *compromised* at any time
and is *destroyed* once the token key is gone.  Private-key operations (sign, ECDH)
run only while active; generation only before the key exists; destruction (KMIP)
only once the key is no longer active.  Leaving a state is one-way: a deactivated or
compromised key is never active again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Any, Final

from agent.hsm_service.config import (
    OPERATIONS,
    KeyPolicy,
    ServiceConfig,
    parse_did,
    parse_key,
)
from agent.hsm_service.errors import ConfigError, InvalidRequest, Refused
from janus_hsm.strictjson import canonical_json

#: Which operations each state allows (besides the policy's own list).
STATE_OPERATIONS: Final = {
    "pre-active": frozenset({"generate", "destroy"}),
    "active": frozenset({"sign", "ecdh", "generate"}),
    "deactivated": frozenset({"destroy"}),
    "compromised": frozenset({"destroy"}),
    "destroyed": frozenset(),
}
#: The transitions a policy change may make (destroyed is reached by `destroy` only).
TRANSITIONS: Final = {
    "pre-active": frozenset({"active", "deactivated", "compromised"}),
    "active": frozenset({"deactivated", "compromised"}),
    "deactivated": frozenset({"compromised"}),
    "compromised": frozenset(),
    "destroyed": frozenset(),
}
#: The order of the states: a key only ever moves to a later one.
STATE_ORDER: Final = ("pre-active", "active", "deactivated", "compromised", "destroyed")
CHANGE_ACTIONS: Final = ("add-client", "remove-client", "set-state", "set-key", "add-key")
_CHANGE_FIELDS: Final = {
    "add-client": {"action", "key", "client"},
    "remove-client": {"action", "key", "client"},
    "set-state": {"action", "key", "state"},
    "set-key": {"action", "key", "policy"},
    "add-key": {"action", "key", "policy"},
}


def effective_state(policy: KeyPolicy, now: float) -> tuple[str, int | None]:
    """The key's state at ``now`` and the date of the transition that made it, if a
    dated transition has happened since the stored state was recorded."""
    state = policy.state
    activation, deactivation = policy.activation_date, policy.deactivation_date
    if state == "pre-active" and activation is not None and now >= activation:
        state = "active"
    if state in ("pre-active", "active") and deactivation is not None and now >= deactivation:
        return "deactivated", deactivation
    if state != policy.state:
        return state, policy.activation_date
    return state, None


def later_state(a: str, b: str) -> str:
    """The later of two states (unknown text counts as the earliest)."""
    rank = {state: i for i, state in enumerate(STATE_ORDER)}
    return a if rank.get(a, -1) >= rank.get(b, -1) else b


def spec_digest(policy: KeyPolicy | None) -> str:
    """SHA-256 of a configuration file's policy for a key ("" for none): a stored
    policy change applies only while the file's policy is the one it changed."""
    if policy is None:
        return ""
    return hashlib.sha256(canonical_json(policy_spec(policy))).hexdigest()


def check_operation(policy: KeyPolicy, state: str, client: str, operation: str) -> None:
    """Refused (client, operation, state) before any counter is looked at.

    The client check comes first: a client that may not use the key learns nothing
    about its state or operations.
    """
    if client not in policy.clients:
        raise Refused("client_not_allowed", f"this client may not use key {policy.label!r}")
    if operation not in policy.operations:
        raise Refused("operation_not_allowed", f"key {policy.label!r} does not allow {operation}")
    if operation not in STATE_OPERATIONS[state]:
        raise Refused("key_state", f"key {policy.label!r} is {state}: no {operation}")


# --------------------------------------------------------------------------- changes


def policy_spec(policy: KeyPolicy) -> dict[str, Any]:
    """``policy`` in the configuration's own syntax (what a change edits and what the
    state directory stores), dates as RFC 3339 text."""
    spec: dict[str, Any] = {
        "uri": policy.uri,
        "operations": sorted(policy.operations),
        "clients": sorted(policy.clients),
        "state": policy.state,
    }
    for name, value in (
        ("activation-date", policy.activation_date),
        ("deactivation-date", policy.deactivation_date),
    ):
        if value is not None:
            spec[name] = dt.datetime.fromtimestamp(value, dt.UTC).isoformat()
    if policy.max_uses is not None:
        spec["max-uses"] = policy.max_uses
    if policy.rate is not None:
        spec["rate"] = {"count": policy.rate.count, "per-seconds": policy.rate.per_seconds}
    if policy.quorum is not None:
        spec["quorum"] = policy.quorum.to_json()
        if not policy.quorum.operations:
            del spec["quorum"]["operations"]
    if policy.algorithm is not None:
        spec["algorithm"] = policy.algorithm.value
    return spec


def policy_from_spec(
    config: ServiceConfig, label: str, spec: Mapping[str, Any], *, source: str
) -> KeyPolicy:
    """Check a key's settings exactly as the configuration file's are checked."""
    if not isinstance(spec, Mapping):
        raise ConfigError("a key policy must be an object", source=source, field=f"key.{label}")
    doc = dict(spec)
    for name in ("activation-date", "deactivation-date"):
        if isinstance(doc.get(name), str):
            try:
                doc[name] = dt.datetime.fromisoformat(doc[name])
            except ValueError:
                raise ConfigError(
                    "must be an RFC 3339 date-time", source=source, field=f"key.{label}.{name}"
                ) from None
    return parse_key(config, label, doc, source=source)


def apply_change(
    config: ServiceConfig, current: Mapping[str, KeyPolicy], change: Mapping[str, Any]
) -> KeyPolicy:
    """The key policy ``change`` results in (ConfigError naming the field if it is not
    acceptable); nothing is stored here."""
    source = "policy change"
    if not isinstance(change, Mapping):
        raise InvalidRequest("a policy change must be an object")
    action = change.get("action")
    if action not in _CHANGE_FIELDS:
        raise ConfigError(
            f"must be one of {', '.join(CHANGE_ACTIONS)}", source=source, field="action"
        )
    allowed = _CHANGE_FIELDS[action]
    unknown = sorted(set(change) - allowed)
    if unknown:
        raise ConfigError("unknown field", source=source, field=unknown[0])
    missing = sorted(allowed - set(change))
    if missing:
        raise ConfigError("is required", source=source, field=missing[0])
    label = change["key"]
    if not isinstance(label, str):
        raise ConfigError("must be a key label", source=source, field="key")
    if action == "add-key":
        if label in current:
            raise ConfigError("a key of this label exists", source=source, field="key")
        return policy_from_spec(config, label, change["policy"], source=source)
    policy = current.get(label)
    if policy is None:
        raise ConfigError("no key of this label is configured", source=source, field="key")
    spec = policy_spec(policy)
    if action in ("add-client", "remove-client"):
        client = parse_did(change["client"], source=source, field="client")
        clients = set(spec["clients"])
        if action == "add-client":
            clients.add(client)
        elif client in clients:
            clients.remove(client)
        else:
            raise ConfigError("is not a client of this key", source=source, field="client")
        spec["clients"] = sorted(clients)
    elif action == "set-state":
        state = change["state"]
        if state not in TRANSITIONS.get(policy.state, frozenset()):
            raise ConfigError(
                f"a {policy.state} key cannot become {state!r}", source=source, field="state"
            )
        spec["state"] = state
    else:  # set-key
        update = change["policy"]
        if not isinstance(update, Mapping):
            raise ConfigError("must be an object", source=source, field="policy")
        if "uri" in update and update["uri"] != spec["uri"]:
            raise ConfigError(
                "a key's uri cannot change (add a key instead)", source=source, field="policy.uri"
            )
        if "state" in update and update["state"] != policy.state:
            raise ConfigError(
                "use set-state to change the state", source=source, field="policy.state"
            )
        for name, value in update.items():
            if value is None:
                spec.pop(name, None)  # remove a limit, a quorum…
            else:
                spec[name] = value
    return policy_from_spec(config, label, spec, source=source)


def operation_names() -> tuple[str, ...]:
    return OPERATIONS
