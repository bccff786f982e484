"""A device's fan-out state as one record, for the encrypted vault (it holds ratchet
secrets: never a plain file).

JSON: ``{"v": 1, "device", "owner", "bundle", "removed", "seen": [B64…], "waiting":
[[OWNER, B64]…], "views": [{"owner", "list", "bundles": [BUNDLE…], "sessions":
[SESSION…]}…]}``.  It is read back only from the vault, whose records authenticate, so
reading checks structure and signatures (lists, bundles), not intent; a bundle that
expired meanwhile is dropped (its device announces a new one), and this device's own is
published again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.relationships.errors import RelationshipError
from agent.relationships.prekeys import PrekeyBundle
from agent.relationships.ratchet import RatchetState
from agent.relationships.x3dh import parse_initial_header
from agent.sync.device_errors import DeviceError, DeviceStateError
from agent.sync.device_list import DeviceListVerifier, parse_device_list
from agent.sync.fanout import FanoutNode, OwnerView
from agent.sync.fanout_bundle import parse_device_bundle
from agent.sync.fanout_session import DeviceSession
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle

STATE_VERSION = 1


def dump_node(node: FanoutNode) -> bytes:
    """Everything a node holds, to commit (in the vault) before its messages go out."""
    return json.dumps(
        {
            "v": STATE_VERSION,
            "device": node.did,
            "owner": node.owner,
            "bundle": node.bundle.to_dict(),
            "removed": node.removed,
            "seen": sorted(b64url.encode(d) for d in node.seen_initial),
            "waiting": [[o, b64url.encode(w)] for o, w in node.waiting.values()],
            "views": [
                {
                    "owner": owner,
                    "list": view.current.compact,
                    "bundles": [b.to_dict() for b in view.bundles.values()],
                    "addresses": view.addresses,
                    "sessions": [_session(s) for s in view.sessions.values()],
                }
                for owner, view in node.views.items()
            ],
        },
        sort_keys=True,
    ).encode()


def _session(s: DeviceSession) -> dict[str, Any]:
    return {
        "device": s.device,
        "owner": s.owner,
        "initiator": s.initiator,
        "state": b64url.encode(s.state.to_bytes()),
        "digest": b64url.encode(s.initial_digest),
        "initial": None if s.initial is None else b64url.encode(s.initial),
        "ended": s.ended,
        "sent": s.sent,
        "received": s.received,
    }


def load_node(device: KeyHandle, agreement: KeyHandle, data: bytes, prekeys: Path) -> FanoutNode:
    """The node :func:`dump_node` wrote, for this device's keys; DeviceStateError if
    the record is damaged or another device's."""
    try:
        d = json.loads(data)
        if d["v"] != STATE_VERSION or d["device"] != device.did:
            raise DeviceStateError("the fan-out state is of another version or device")
        views = {v["owner"]: v for v in d["views"]}
        own = views[d["owner"]]
        own_list = parse_device_list(own["list"])
        try:
            bundle: PrekeyBundle | None = parse_device_bundle(d["bundle"])
        except DeviceError:
            bundle = None  # expired: the node publishes a new one
        removed = bool(d["removed"])
        node = FanoutNode(device, agreement, own_list, prekeys, bundle=bundle, removed=removed)
        node.seen_initial = {b64url.decode(x) for x in d["seen"]}
        for owner, wire in d["waiting"]:
            wire_bytes = b64url.decode(wire)
            node.waiting[parse_initial_header(wire_bytes)[0].digest] = (str(owner), wire_bytes)
        for owner, v in views.items():
            dl = parse_device_list(v["list"])
            if dl.owner != owner:
                raise DeviceStateError("a list of the fan-out state is another owner's")
            view = node.views.setdefault(owner, OwnerView(DeviceListVerifier(owner)))
            view.verifier.current = dl
            for raw in v["bundles"]:
                try:
                    b = parse_device_bundle(raw)
                except DeviceError:
                    continue
                if b.root_did != node.did:
                    view.bundles[b.root_did] = b
            view.addresses.update(
                {str(d): {str(k): str(x) for k, x in a.items()}
                 for d, a in v.get("addresses", {}).items()}
            )  # fmt: skip
            for s in v["sessions"]:
                view.sessions[s["device"]] = DeviceSession(
                    device=str(s["device"]),
                    owner=str(s["owner"]),
                    initiator=bool(s["initiator"]),
                    state=RatchetState.from_bytes(b64url.decode(s["state"])),
                    initial_digest=b64url.decode(s["digest"]),
                    initial=None if s["initial"] is None else b64url.decode(s["initial"]),
                    ended=bool(s["ended"]),
                    sent=int(s["sent"]),
                    received=int(s["received"]),
                )
        return node
    except DeviceStateError:
        raise
    except (KeyError, TypeError, ValueError, DeviceError, RelationshipError) as exc:
        raise DeviceStateError(f"the fan-out state is damaged: {type(exc).__name__}") from None
