"""Messages for an offline owner: unwrap the forward addressed to this agent, hold it.

The cloud agent is the owner's mediator.  Senders wrap their envelope (encrypted to the
owner, unreadable here) in a routing 2.0 forward encrypted to the agent's routing key;
the agent opens only that outer layer, and holding the inner envelope is a
``msg/receive`` use of a capability the owner granted, counted like any other.
"""

from __future__ import annotations

import json
from typing import Any

from agent.cloud.service import CloudAgent
from agent.cloud.store import ACTIVE
from agent.didcomm import unwrap_forward
from agent.didcomm.keys import did_of
from agent.errors import NotFoundError
from policies.capability import Bundle
from policies.errors import LimitExceededError, VerificationError

MAILBOX = "janus:mailbox"
RECEIVE = "msg/receive"


def receive_forward(agent: CloudAgent, envelope: bytes) -> dict[str, Any]:
    forward, _ = unwrap_forward(envelope, [agent.routing_key])
    owner = did_of(forward.next) if "#" in forward.next else forward.next
    inner = json.loads(forward.payload)
    candidates = [
        g
        for g in agent.store.grants(ACTIVE)
        if g.bundle is not None and _receives_for(Bundle.parse(g.bundle), owner, agent.config.owner)
    ]
    if not candidates:
        raise NotFoundError(f"this agent holds no mailbox grant for {owner}")
    last_error: Exception | None = None
    for record in candidates:
        try:
            result = agent.act(record.grant_id, RECEIVE, MAILBOX, {"message": inner})
        except (LimitExceededError, VerificationError) as exc:
            last_error = exc  # that grant is used up or expired: try the next one
            continue
        return {"held": result.result["held"], "for": owner}
    assert last_error is not None
    raise last_error


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
