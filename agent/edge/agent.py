"""The edge agent: root identity on a token, grants to cloud agents, revocation, pickup.

Its state is a directory: ``edge.toml`` (which keys, which policy), ``policy.toml``
(the issuance policy), and ``grants/<id>.json`` (what was granted to whom, so it can be
revoked later).  Keys are only ever named by URI; PINs come from the URIs'
``pin-source`` or ``JANUS_PIN``.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.cloud.service import KEYREQ_TYP, PICKUP_TYP, sign_request
from agent.edge.identity import did_document
from agent.errors import AgentError, BadRequestError, ConflictError, DeliveryError, NotFoundError
from janus_hsm import open_key, open_provider
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.capability import Bundle
from policies.issue import GrantDraft, grant, prepare_grant
from policies.policy import IssuancePolicy
from policies.revocation import sign_revocation

HTTP_TIMEOUT = 30.0

DEFAULT_POLICY = """\
# Issuance policy of this edge agent (see docs/policy.md).
version = 1

[defaults]
max_ttl = "1h"
max_uses = 100
max_depth = 0
require = ["pin"]

[[rule]]
name = "cloud-payments"
audiences = ["*"]
abilities = [
  { can = "sign/payment", with = "janus:payments/*" },
  { can = "cap/delegate", with = "janus:payments/*" },
]
max_ttl = "1h"
max_uses = 100
max_depth = 1

[[rule]]
name = "mailbox"
audiences = ["*"]
abilities = [{ can = "msg/receive", with = "janus:mailbox" }]
max_ttl = "30d"
max_uses = 100000
"""


def _toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, no raw controls).
    return json.dumps(value)


@dataclass(frozen=True)
class EdgeConfig:
    state_dir: Path
    root_uri: str
    agreement_uri: str
    policy_file: Path

    @classmethod
    def load(cls, state_dir: Path) -> EdgeConfig:
        path = state_dir / "edge.toml"
        try:
            data = tomllib.loads(path.read_text())
            return cls(
                state_dir,
                str(data["root"]),
                str(data["agreement"]),
                state_dir / str(data.get("policy", "policy.toml")),
            )
        except FileNotFoundError:
            raise NotFoundError(
                f"no edge agent in {state_dir}: run `janus edge init --state-dir {state_dir}`"
            ) from None
        except (tomllib.TOMLDecodeError, KeyError) as exc:
            raise BadRequestError(f"{path} is not a valid edge configuration: {exc}") from None

    def save(self) -> None:
        text = (
            "# Janus edge agent (written by `janus edge init`).\n"
            f"root = {_toml_string(self.root_uri)}\n"
            f"agreement = {_toml_string(self.agreement_uri)}\n"
            f"policy = {_toml_string(self.policy_file.name)}\n"
        )
        _write_atomic(self.state_dir / "edge.toml", text)


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _with_object(token_uri: str, label: str) -> str:
    from janus_hsm.uri import Pkcs11Uri

    parsed = Pkcs11Uri.parse(token_uri)
    return str(parsed.with_path(object=label))


class EdgeAgent:
    def __init__(self, config: EdgeConfig, root: KeyHandle, agreement: KeyHandle) -> None:
        self.config = config
        self.root = root
        self.agreement = agreement
        self.policy = IssuancePolicy.load(config.policy_file)

    @classmethod
    def init(
        cls,
        state_dir: Path,
        token_uri: str,
        *,
        root_algorithm: Algorithm = Algorithm.ES256,
        name: str = "edge",
    ) -> tuple[EdgeAgent, bool]:
        """Create (or reuse) the root identity on the token; idempotent.

        The root signs (ES256 or EdDSA); key agreement uses a separate X25519 key on the
        same device (a P-256 root can also agree keys itself).  Keys are labelled
        ``<name>-root`` and ``<name>-agreement``; an existing root is reused whatever its
        algorithm, and a mismatch with ``root_algorithm`` is an error, not a silent swap.
        """
        if root_algorithm not in (Algorithm.ES256, Algorithm.EdDSA):
            raise BadRequestError("the root key must be ES256 (P-256) or EdDSA (Ed25519)")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / "grants").mkdir(exist_ok=True, mode=0o700)
        provider = open_provider(token_uri)
        created = False
        handles = {}
        root_label, agreement_label = f"{name}-root", f"{name}-agreement"
        for label, alg in ((root_label, root_algorithm), (agreement_label, Algorithm.X25519)):
            uri = _with_object(token_uri, label)
            try:
                handles[label] = provider.find(uri)
            except KeyNotFoundError:
                handles[label] = provider.generate(uri, alg)
                created = True
            if handles[label].algorithm is not alg:
                raise ConflictError(
                    f"{label} on the token is {handles[label].algorithm.value}, not "
                    f"{alg.value}; pick another --name or the existing algorithm"
                )
        policy_file = state_dir / "policy.toml"
        if not policy_file.exists():
            _write_atomic(policy_file, DEFAULT_POLICY, mode=0o644)
        config = EdgeConfig(
            state_dir,
            _with_object(token_uri, root_label),
            _with_object(token_uri, agreement_label),
            policy_file,
        )
        config.save()
        return cls(config, handles[root_label], handles[agreement_label]), created

    @classmethod
    def open(cls, state_dir: Path) -> EdgeAgent:
        config = EdgeConfig.load(state_dir)
        return cls(config, open_key(config.root_uri), open_key(config.agreement_uri))

    @property
    def did(self) -> str:
        return self.root.did

    def agreement_keys(self) -> list[KeyHandle]:
        """The token keys that can decrypt (ECDH): the X25519 key, and a P-256 root."""
        return [k for k in (self.agreement, self.root) if k.algorithm.can_exchange]

    def did_document(self) -> dict[str, Any]:
        return did_document(self.root, self.agreement)

    # --- talking to a cloud agent ---------------------------------------------------

    def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = httpx.request(method, url, timeout=HTTP_TIMEOUT, **kwargs)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from None
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise DeliveryError(f"{url} answered {response.status_code} without JSON") from None
        if response.status_code >= 300:
            error = body.get("error", {})
            err = AgentError(f"cloud agent refused: {error.get('code')}: {error.get('message')}")
            err.code = str(error.get("code", "refused"))
            err.status = response.status_code
            raise err
        return body

    def cloud_did(self, cloud: str) -> str:
        return str(self._call("GET", f"{cloud}/v1/did")["did"])

    def grant(
        self,
        cloud: str,
        abilities: Sequence[Ability],
        *,
        ttl_seconds: int,
        uses: int,
        depth: int = 0,
        satisfied: Sequence[str] = (),
        approve: Callable[[GrantDraft], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Ask the cloud agent for a fresh key, sign a capability for it, install it.

        ``approve`` collects the approvals the policy requires: it gets the prepared
        draft and returns :func:`policies.issue.grant`'s approval arguments; a refusal
        (an exception) means nothing is signed and no bundle is installed.
        """
        now = int(time.time())
        agent_did = self.cloud_did(cloud)
        key_request = sign_request(self.root, typ=KEYREQ_TYP, audience=agent_did, now=now)
        created = self._call("POST", f"{cloud}/v1/grants", json={"request": key_request})
        arguments: dict[str, Any] = {
            "audience": created["did"],
            "abilities": abilities,
            "ttl_seconds": ttl_seconds,
            "uses": uses,
            "depth": depth,
            "policy": self.policy,
            "now": now,
        }
        approval_arguments: dict[str, Any] = {}
        draft = prepare_grant(self.root, **arguments)
        if draft.decision.approvals and approve is not None:
            approval_arguments = approve(draft)
        bundle = grant(
            self.root,
            **arguments,
            satisfied=satisfied,
            jti=draft.jti,
            # Lets a mediator recognise messages addressed to the X25519 key's did:key.
            evidence={"keyAgreement": [self.agreement.did]},
            **approval_arguments,
        )
        installed = self._call(
            "PUT",
            f"{cloud}/v1/grants/{created['grant_id']}/bundle",
            content=bundle.to_json().encode(),
        )
        record = {
            "grant_id": created["grant_id"],
            "cloud": cloud,
            "agent": agent_did,
            "key": created["did"],
            "capability": bundle.leaf.id,
            "expires": bundle.leaf.expires,
            "bundle": json.loads(bundle.to_json()),
        }
        _write_atomic(
            self.config.state_dir / "grants" / f"{created['grant_id']}.json",
            json.dumps(record, indent=1),
        )
        return {**record, "status": installed["status"]}

    def granted(self, grant_id: str) -> dict[str, Any]:
        path = self.config.state_dir / "grants" / f"{grant_id}.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"this edge agent issued no grant {grant_id!r}") from None
        return data

    def revoke(self, grant_id: str, *, reason: str = "") -> dict[str, Any]:
        record = self.granted(grant_id)
        bundle = Bundle.parse(json.dumps(record["bundle"]))
        revocation = sign_revocation(
            self.root, revoked_id=bundle.leaf.id, now=int(time.time()), reason=reason
        )
        return self._call("POST", f"{record['cloud']}/v1/revocations", json={"record": revocation})

    def pickup(self, cloud: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """Fetch held messages, decrypt them with the token, then acknowledge them."""
        from agent.didcomm import DIDCommError, unpack

        agent_did = self.cloud_did(cloud)
        now = int(time.time())
        signed = sign_request(self.root, typ=PICKUP_TYP, audience=agent_did, now=now, ack=[])
        held = self._call("POST", f"{cloud}/v1/pickup", json={"request": signed, "limit": limit})
        messages = []
        opened = []
        for item in held["messages"]:
            try:
                unpacked = unpack(item["envelope"], self.agreement_keys())
            except DIDCommError as exc:
                # Left on the cloud agent (not acknowledged), reported, and not allowed
                # to block the messages behind it.
                messages.append({"id": item["id"], "error": f"{exc.code}: {exc}"})
                continue
            messages.append(
                {
                    "id": item["id"],
                    "message": unpacked.message.to_dict(),
                    "metadata": unpacked.metadata.as_dict(),
                }
            )
            opened.append(item["id"])
        if opened:
            ack = sign_request(
                self.root, typ=PICKUP_TYP, audience=agent_did, now=int(time.time()), ack=opened
            )
            self._call("POST", f"{cloud}/v1/pickup", json={"request": ack, "limit": 1})
        return messages
