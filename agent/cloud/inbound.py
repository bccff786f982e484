"""Messages for an offline owner: unwrap the forward addressed to this agent, hold it.

The cloud agent is the owner's mediator.  Senders wrap their envelope (encrypted to the
owner, unreadable here) in a routing 2.0 forward encrypted to the agent's routing key;
the agent opens only that outer layer, and holding the inner envelope is a
``msg/receive`` use of a capability the owner granted, counted like any other.
"""

from __future__ import annotations

import json
import time
from typing import Any

from agent.cloud.service import CloudAgent
from agent.cloud.store import ACTIVE
from agent.didcomm import NotEncryptedError, parse_forward, unpack
from agent.didcomm.keys import did_of
from agent.didcomm.unpack import ANONCRYPT, AUTHCRYPT
from agent.errors import GrantInactiveError, NotFoundError, NoUsableGrantError
from policies.capability import Bundle
from policies.errors import (
    ExpiredError,
    LimitExceededError,
    PolicyError,
    RevokedError,
    VerificationError,
)

MAILBOX = "janus:mailbox"
RECEIVE = "msg/receive"


def receive_forward(agent: CloudAgent, envelope: bytes) -> dict[str, Any]:
    unpacked = unpack(envelope, [agent.routing_key])
    # ``unpack`` also opens plaintext and signed-only messages: whatever comes here is
    # refused unless its outer layer was encrypted to the routing key.
    outer = unpacked.metadata.layers[0] if unpacked.metadata.layers else None
    if (
        outer is None
        or outer.kind not in (ANONCRYPT, AUTHCRYPT)
        or outer.kid is None
        or did_of(outer.kid) != agent.routing_key.did
    ):
        raise NotEncryptedError(
            "a forward to this agent must be encrypted to its routing key "
            f"(GET /v1/did); this envelope is {unpacked.metadata.mode}"
        )
    forward = parse_forward(unpacked.message)
    owner = did_of(forward.next) if "#" in forward.next else forward.next
    inner = json.loads(forward.payload)
    now = time.time()
    candidates = [
        g
        for g in agent.store.grants(ACTIVE)
        if g.bundle is not None and _receives_for(Bundle.parse(g.bundle), owner, agent.config.owner)
    ]
    if not candidates:
        raise NotFoundError(f"this agent holds no mailbox grant for {owner}")
    # The store may still list as active a grant that ended (expired while the agent
    # was stopped, until the sweep retires it; used up or revoked by another instance):
    # skip those, so one stale grant never hides a valid one.
    live = [g for g in candidates if g.expires_at is None or g.expires_at > now]
    live_ids = {g.grant_id for g in live}
    ended = [f"{g.grant_id}: expired" for g in candidates if g.grant_id not in live_ids]
    refusal: PolicyError | None = None
    for record in live:
        try:
            result = agent.act(record.grant_id, RECEIVE, MAILBOX, {"message": inner})
        except (GrantInactiveError, LimitExceededError, ExpiredError, RevokedError) as exc:
            ended.append(f"{record.grant_id}: {exc.code}")  # that grant is over: next one
            continue
        except VerificationError as exc:
            refusal = exc  # this grant refuses this message (a caveat…): another may not
            continue
        return {"held": result.result["held"], "for": owner}
    if refusal is not None:
        raise refusal
    raise NoUsableGrantError(
        f"every mailbox grant this agent holds for {owner} has ended ({'; '.join(ended)}): "
        "the owner must grant a new one"
    )


def _receives_for(bundle: Bundle, recipient: str, agent_owner: str | None) -> bool:
    """Is ``recipient`` the principal, or a key-agreement DID the root link names?

    The root's evidence is the root signer's own word: nothing proves it controls
    the key-agreement keys it names.  An agent with an owner trusts its owner's word;
    an agent without one (anyone may grant to it) would let anyone claim anyone's
    key-agreement DID and take their mail, so there only the principal's DID counts.
    """
    root = bundle.root
    agreement = (root.evidence or {}).get("keyAgreement", [])
    trusted = agent_owner is not None and root.principal == agent_owner
    named = recipient == root.principal or (
        trusted and isinstance(agreement, list) and recipient in agreement
    )
    return named and any(a.matches(MAILBOX, RECEIVE) for a in bundle.leaf.abilities)
