"""The edge agent: root identity on a token, grants to cloud agents, revocation, pickup.

Its state is a directory: ``edge.toml`` (which keys, which policy), ``policy.toml``
(the issuance policy), and ``grants/<id>.json`` (what was granted to whom, so it can be
revoked later).  Keys are only ever named by URI; PINs come from the URIs'
``pin-source`` or ``JANUS_PIN``.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.edge.identity import did_document
from agent.errors import (
    AgentError,
    BadCloudAnswerError,
    BadRequestError,
    ConflictError,
    DeliveryError,
    NotFoundError,
)
from agent.protocol import (
    KEYREQ_TYP,
    PICKUP_TYP,
    action_body,
    action_path,
    sign_request,
)
from janus_hsm import open_key, open_provider
from janus_hsm.algorithms import Algorithm
from janus_hsm.atomic_file import replace_file
from janus_hsm.errors import KeyNotFoundError, MechanismUnsupportedError
from janus_hsm.provider import KeyHandle, KeyProvider
from policies.abilities import Ability
from policies.approval_collection import ApprovalSources, collect_approvals
from policies.attestation import attestation_evidence
from policies.capability import Bundle
from policies.errors import PolicyError, PolicyViolationError
from policies.issue import grant, prepare_grant
from policies.policy import GrantRequest, IssuancePolicy, naming_policy_file
from policies.revocation import sign_revocation

HTTP_TIMEOUT = 30.0
# Grant ids as cloud agents make them (base64url); anything else is refused before it
# names a file or a URL.
_GRANT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

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

[[rule]]
name = "sending-service"
audiences = ["*"]
abilities = [{ can = "msg/submit", with = "janus:sending" }]
max_ttl = "90d"
max_uses = 1000000
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
    replace_file(path, text.encode(), mode=mode)


def _with_object(token_uri: str, label: str) -> str:
    if token_uri.lower().startswith("hsm+"):  # keys held by an HSM service, by label
        from agent.hsm_service.provider import key_uri

        return key_uri(token_uri, label)
    from janus_hsm.uri import Pkcs11Uri

    parsed = Pkcs11Uri.parse(token_uri)
    return str(parsed.with_path(object=label))


ROOT_ALGORITHMS = (Algorithm.ES256, Algorithm.ES384, Algorithm.EdDSA)


def _init_labelled(
    provider: KeyProvider, token_uri: str, root_algorithm: Algorithm, name: str
) -> tuple[KeyHandle, KeyHandle, bool]:
    """PKCS#11 (and software) stores: find the labelled keys, generate the missing ones."""
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
    return handles[root_label], handles[agreement_label], created


#: PIV slots of the edge identity (docs/yubikey.md): the root signs from 9c (PIN before
#: every signature), the agreement key decrypts from 9d (key management).
PIV_ROOT_SLOT = "9c"
PIV_AGREEMENT_SLOT = "9d"
#: Ed25519 / X25519 in PIV: YubiKey firmware 5.7 and later.
_PIV_25519_FIRMWARE = (5, 7, 0)


def _init_piv(
    provider: KeyProvider,
    state_dir: Path,
    token_uri: str,
    root_algorithm: Algorithm,
    reuse_existing: bool,
    root_touch_policy: str | None = None,
) -> tuple[KeyHandle, KeyHandle, bool]:
    """The edge identity in a PIV card's slots: root in 9c (or the URI's slot), agreement in 9d.

    A PKCS#11 key is found again by the label Janus gave it, so reusing it is safe.  A
    PIV slot carries no label: a key already in 9c may be the owner's login or e-mail
    key, and silently making it an edge root would hand it a new job.  So an occupied
    slot is refused unless ``reuse_existing`` says to adopt its key, or this state
    directory's own configuration already names the slot (re-running init stays
    idempotent).  Both slots are checked before anything is generated, so a refusal
    leaves the card as it was.
    """
    from janus_hsm.backends.piv import PivProvider
    from janus_hsm.backends.piv.slots import parse_touch_policy
    from janus_hsm.backends.piv.uri import PivUri, parse_slot

    assert isinstance(provider, PivProvider)
    try:
        root_touch = None if root_touch_policy is None else parse_touch_policy(root_touch_policy)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    parsed = PivUri.parse(token_uri)
    root_slot = parsed.slot if parsed.slot is not None else parse_slot(PIV_ROOT_SLOT)
    agreement_slot = parse_slot(PIV_AGREEMENT_SLOT)
    if root_slot == agreement_slot:
        raise BadRequestError(
            f"slot {PIV_AGREEMENT_SLOT} holds the edge agent's key-agreement key; put the "
            f"root in another slot (slot={PIV_ROOT_SLOT}, the default)"
        )
    version = provider.version
    new_firmware = version >= _PIV_25519_FIRMWARE
    if root_algorithm is Algorithm.EdDSA and not new_firmware:
        raise MechanismUnsupportedError(
            f"{provider.describe()} has firmware {'.'.join(map(str, version))}: Ed25519 "
            "keys need YubiKey firmware 5.7 or later. Use --root-alg ES256 (or ES384)"
        )
    # X25519 where the card has it (what the PKCS#11 path uses); P-256 ECDH before 5.7.
    agreement_algorithm = Algorithm.X25519 if new_firmware else Algorithm.ES256
    wanted = {
        root_slot: ("root", (root_algorithm,)),
        agreement_slot: ("agreement", (Algorithm.X25519, Algorithm.ES256)),
    }
    known = _configured_slots(state_dir, provider.card_uri)
    base = PivUri.parse(provider.card_uri)
    existing: dict[Any, KeyHandle] = {}
    for slot, (role, algorithms) in wanted.items():
        uri = str(base.with_slot(slot))
        try:
            handle = provider.lookup(uri)
        except KeyNotFoundError:
            continue
        if not (reuse_existing or slot in known):
            raise ConflictError(
                f"slot {slot:02x} on {provider.describe()} already holds a "
                f"{handle.algorithm.value} key ({handle.did}), meant here for the edge "
                f"{role} key. Janus does not take over a key it did not set up for this "
                "edge agent: pass --reuse-existing to make that key the edge "
                f"{role}, name another root slot in the URI (e.g. {base};slot=82), or "
                "delete the old key first"
            )
        if handle.algorithm not in algorithms:
            hint = (
                f"use --root-alg {handle.algorithm.value} or another root slot"
                if role == "root"
                else "delete it first, or use another card"
            )
            raise ConflictError(
                f"slot {slot:02x} on {provider.describe()} holds a {handle.algorithm.value} "
                f"key, not {' or '.join(a.value for a in algorithms)}, so it cannot be the "
                f"edge {role} key; {hint}"
            )
        handle.check_custody()
        existing[slot] = handle
    created = False
    handles = {}
    for slot, algorithm in ((root_slot, root_algorithm), (agreement_slot, agreement_algorithm)):
        if slot in existing:
            handles[slot] = existing[slot]
        else:
            uri = str(base.with_slot(slot))
            if slot == root_slot and root_touch is not None:
                handles[slot] = provider.generate(uri, algorithm, touch_policy=root_touch)
            else:
                handles[slot] = provider.generate(uri, algorithm)
            created = True
    return handles[root_slot], handles[agreement_slot], created


def _configured_slots(state_dir: Path, card_uri: str) -> set[Any]:
    """The slots of this card that the state directory's edge.toml already names."""
    from janus_hsm.backends.piv.uri import PivUri

    try:
        config = EdgeConfig.load(state_dir)
    except (NotFoundError, BadRequestError):
        return set()
    card = PivUri.parse(card_uri)
    slots = set()
    for uri in (config.root_uri, config.agreement_uri):
        try:
            parsed = PivUri.parse(uri)
        except ValueError:
            continue  # a PKCS#11 identity in this directory before
        if parsed.serial == card.serial and (
            card.serial is not None or parsed.reader == card.reader
        ):
            slots.add(parsed.slot)
    return slots


def _piv_config_uri(token_uri: str, handle: KeyHandle) -> str:
    """The key's URI for edge.toml: card by serial (stable across USB ports) and slot,
    keeping the user's pin-source / management-key-source."""
    from janus_hsm.backends.piv.uri import PivUri

    given = PivUri.parse(token_uri)
    key = PivUri.parse(handle.uri)
    return str(
        PivUri(
            serial=key.serial,
            reader=key.reader,
            slot=key.slot,
            pin_source=given.pin_source,
            management_key_source=given.management_key_source,
        )
    )


def _same_piv_card(first: str, second: str) -> bool:
    from janus_hsm.backends.piv.uri import PivUri

    if not (first.lower().startswith("piv:") and second.lower().startswith("piv:")):
        return False
    a, b = PivUri.parse(first), PivUri.parse(second)
    return (a.serial, a.reader) == (b.serial, b.reader)


def _init_warnings(provider: KeyProvider) -> list[str]:
    if getattr(provider, "default_management_key", None) is not True:
        return []
    return [
        "this card uses the FACTORY DEFAULT PIV management key: anyone holding it can "
        "replace its keys. Change it: ykman piv access change-management-key --generate --protect"
    ]


def call_cloud(method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    """One request to a cloud agent: its JSON object, or its refusal as an AgentError
    carrying the agent's own code and status."""
    try:
        response = httpx.request(method, url, timeout=HTTP_TIMEOUT, **kwargs)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        raise DeliveryError(f"{url} answered {response.status_code} without JSON") from None
    if not isinstance(body, dict):
        raise BadCloudAnswerError(f"{url} answered {response.status_code} with no object")
    if response.status_code >= 300:
        error = body.get("error")
        error = error if isinstance(error, dict) else {}
        err = AgentError(f"cloud agent refused: {error.get('code')}: {error.get('message')}")
        err.code = str(error.get("code", "refused"))
        err.status = response.status_code
        raise err
    return body


def invoke_delegated(
    cloud: str,
    bundle: Bundle,
    holder: KeyHandle,
    action: str,
    request: dict[str, Any],
    *,
    resource: str | None = None,
) -> dict[str, Any]:
    """Have a cloud agent act for the holder of a capability it delegated (``cap/delegate``).

    The holder signs an invocation addressed to that agent (so it cannot be replayed at
    another verifier); the agent checks the whole chain and counts the use.
    """
    from policies.invocation import invoke

    agent_did = str(call_cloud("GET", f"{cloud}/v1/did")["did"])
    resource = _only_resource(bundle) if resource is None else resource
    invocation = invoke(
        holder,
        capability_id=bundle.leaf.id,
        action=action,
        resource=resource,
        request=request,
        now=int(time.time()),
        audience=agent_did,
    )
    body = {"bundle": json.loads(bundle.to_json()), "invocation": invocation, "request": request}
    answer = call_cloud("POST", f"{cloud}/v1/invoke", json=body)
    if action.startswith("sign/") and not isinstance(answer.get("evidence"), dict):
        raise BadCloudAnswerError(f"the cloud agent answered {action} without evidence")
    return answer


def _record_bundle(record: dict[str, Any]) -> Bundle:
    return Bundle.parse(json.dumps(record["bundle"]))


def _only_resource(bundle: Bundle) -> str:
    """The one concrete resource a grant names, for an action that does not name one."""
    resources = sorted({a.resource for a in bundle.leaf.abilities})
    if len(resources) == 1 and "*" not in resources[0]:
        return resources[0]
    raise BadRequestError(
        f"the grant covers {', '.join(resources)}: name the resource to act on (--resource)"
    )


class EdgeAgent:
    def __init__(self, config: EdgeConfig, root: KeyHandle, agreement: KeyHandle) -> None:
        self.config = config
        self.root = root
        self.agreement = agreement
        self.policy = IssuancePolicy.load(config.policy_file)
        #: What `init` found worth telling the user (a factory-default management key).
        self.warnings: list[str] = []

    @classmethod
    def init(
        cls,
        state_dir: Path,
        token_uri: str,
        *,
        root_algorithm: Algorithm = Algorithm.ES256,
        name: str = "edge",
        reuse_existing: bool = False,
        on_touch: Callable[[str], None] | None = None,
        root_touch_policy: str | None = None,
    ) -> tuple[EdgeAgent, bool]:
        """Create (or reuse) the root identity on the token; idempotent.

        The root signs (ES256, ES384 or EdDSA); key agreement uses a separate key on the
        same device (X25519; P-256 on a PIV card too old for X25519).  On a PKCS#11
        token the keys are labelled ``<name>-root`` and ``<name>-agreement``; an existing
        root is reused whatever its algorithm, and a mismatch with ``root_algorithm`` is
        an error, not a silent swap.  On a PIV card (``piv:`` URI) slots have no labels,
        so see :func:`_init_piv`: an occupied slot is refused unless ``reuse_existing``.
        ``root_touch_policy`` (PIV only: never, always, cached) is the new root slot's
        touch policy; "always" makes the card itself enforce a policy's ``touch``.
        """
        if root_algorithm not in ROOT_ALGORITHMS:
            raise BadRequestError("the root key must be ES256 (P-256), ES384 (P-384) or EdDSA")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / "grants").mkdir(exist_ok=True, mode=0o700)
        provider = open_provider(token_uri, on_touch=on_touch)
        if token_uri.lower().startswith("piv:"):
            root, agreement, created = _init_piv(
                provider, state_dir, token_uri, root_algorithm, reuse_existing, root_touch_policy
            )
            root_uri, agreement_uri = (
                _piv_config_uri(token_uri, root),
                _piv_config_uri(token_uri, agreement),
            )
        else:
            if root_touch_policy is not None:
                raise BadRequestError("a touch policy applies to a root key on a PIV card only")
            root, agreement, created = _init_labelled(provider, token_uri, root_algorithm, name)
            root_uri = _with_object(token_uri, f"{name}-root")
            agreement_uri = _with_object(token_uri, f"{name}-agreement")
        policy_file = state_dir / "policy.toml"
        if not policy_file.exists():
            _write_atomic(policy_file, DEFAULT_POLICY, mode=0o644)
        config = EdgeConfig(state_dir, root_uri, agreement_uri, policy_file)
        config.save()
        agent = cls(config, root, agreement)
        agent.warnings = _init_warnings(provider)
        return agent, created

    @classmethod
    def open(cls, state_dir: Path, *, on_touch: Callable[[str], None] | None = None) -> EdgeAgent:
        config = EdgeConfig.load(state_dir)
        if _same_piv_card(config.root_uri, config.agreement_uri):
            # One provider for both slots: discovery opens readers exclusively, so a
            # second discovery in this process would not see the card the first holds.
            provider = open_provider(config.root_uri, on_touch=on_touch)
            return cls(config, provider.find(config.root_uri), provider.find(config.agreement_uri))
        return cls(
            config,
            open_key(config.root_uri, on_touch=on_touch),
            open_key(config.agreement_uri, on_touch=on_touch),
        )

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
        return call_cloud(method, url, **kwargs)

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
        approvals: ApprovalSources | None = None,
        attest: bool = False,
    ) -> dict[str, Any]:
        """Ask the cloud agent for a fresh key, sign a capability for it, install it.

        ``attest`` carries the root key's hardware attestation in the capability (see
        policies/attestation.py); it is read before the cloud agent is asked for a key,
        so a root without attestation (e.g. SoftHSM) costs nothing there.

        ``approvals`` says where the approvals a policy rule requires come from
        (:func:`policies.approval_collection.collect_approvals`); a refusal means
        nothing is signed and no bundle is installed.  A refusal by the issuance policy
        names the policy file to edit; the policy is asked once before the cloud agent
        makes a key, so a grant it refuses leaves no pending key there.
        """
        # Lets a mediator recognise messages addressed to the X25519 key's did:key.
        evidence: dict[str, Any] = {"keyAgreement": [self.agreement.did]}
        if attest:
            evidence.update(attestation_evidence(self.root.attest()))
        self._check_policy_for_new_key(abilities, ttl_seconds, uses, depth)
        now = int(time.time())
        agent_did = self.cloud_did(cloud)
        key_request = sign_request(self.root, typ=KEYREQ_TYP, audience=agent_did, now=now)
        created = self._call("POST", f"{cloud}/v1/grants", json={"request": key_request})
        grant_id, key_did = self._check_new_grant(created, agent_did)
        arguments: dict[str, Any] = {
            "audience": key_did,
            "abilities": abilities,
            "ttl_seconds": ttl_seconds,
            "uses": uses,
            "depth": depth,
            "policy": self.policy,
            "now": now,
        }
        approval_arguments: dict[str, Any] = {}
        try:
            draft = prepare_grant(self.root, **arguments)
        except PolicyViolationError as exc:
            raise naming_policy_file(exc, self.config.policy_file) from None
        if draft.decision.approvals and approvals is not None:
            approval_arguments = collect_approvals(draft, approvals)
        bundle = grant(
            self.root,
            **arguments,
            satisfied=satisfied,
            jti=draft.jti,
            evidence=evidence,
            **approval_arguments,
        )
        installed = self._call(
            "PUT",
            f"{cloud}/v1/grants/{grant_id}/bundle",
            content=bundle.to_json().encode(),
        )
        record = {
            "grant_id": grant_id,
            "cloud": cloud,
            "agent": agent_did,
            "key": key_did,
            "capability": bundle.leaf.id,
            "expires": bundle.leaf.expires,
            "bundle": json.loads(bundle.to_json()),
        }
        _write_atomic(self._grant_path(grant_id), json.dumps(record, indent=1))
        return {**record, "status": installed["status"]}

    def _check_policy_for_new_key(
        self, abilities: Sequence[Ability], ttl_seconds: int, uses: int, depth: int
    ) -> None:
        """What the policy says before the key exists: only rules for any holder can apply.

        Rules name holders by did:key, and the key the cloud agent will make is not one
        of them yet, so this stand-in audience matches exactly the ``"*"`` rules.  The
        full check, with the key, still runs before anything is signed.
        """
        request = GrantRequest(
            audience="a new key of the cloud agent",
            abilities=tuple(abilities),
            ttl_seconds=ttl_seconds,
            uses=uses,
            depth=depth,
        )
        try:
            self.policy.check(request)
        except PolicyViolationError as exc:
            raise naming_policy_file(exc, self.config.policy_file) from None

    def _check_new_grant(self, created: Any, agent_did: str) -> tuple[str, str]:
        """The grant id and key a cloud agent answered, before anything is signed for them.

        The id names a file here and a URL there: a cloud agent (or whoever answers in
        its place) must not be able to write outside the grants directory, or overwrite
        the record of an earlier grant (whose capability could then no longer be
        revoked by its id).  The key must be a did:key that is new: not the owner's,
        not the agent's own, not an earlier grant's.
        """
        from janus_hsm.public_keys import PublicKeyFormatError, from_did_key

        grant_id = created.get("grant_id") if isinstance(created, dict) else None
        key_did = created.get("did") if isinstance(created, dict) else None
        if not isinstance(grant_id, str) or not _GRANT_ID.fullmatch(grant_id):
            raise BadCloudAnswerError(f"the cloud agent answered a bad grant id: {grant_id!r:.80}")
        if self._grant_path(grant_id).exists():
            raise BadCloudAnswerError(f"the cloud agent reused the grant id {grant_id!r}")
        try:
            if not isinstance(key_did, str):
                raise PublicKeyFormatError("not a string")
            from_did_key(key_did)
        except PublicKeyFormatError as exc:
            raise BadCloudAnswerError(f"the cloud agent answered a bad key: {exc}") from None
        earlier = {g.get("key") for g in self._grant_records()}
        if key_did in {self.did, self.agreement.did, agent_did} or key_did in earlier:
            raise BadCloudAnswerError(f"the cloud agent answered a key that is not new: {key_did}")
        return grant_id, key_did

    def _grant_records(self) -> list[dict[str, Any]]:
        directory = self.config.state_dir / "grants"
        if not directory.is_dir():
            return []
        records = []
        for path in sorted(directory.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # not a record this agent wrote: not a grant
                continue
        return [r for r in records if isinstance(r, dict)]

    def _grant_path(self, grant_id: str) -> Path:
        if not _GRANT_ID.fullmatch(grant_id):
            raise BadRequestError(f"not a grant id: {grant_id!r:.80}")
        return self.config.state_dir / "grants" / f"{grant_id}.json"

    def granted(self, grant_id: str) -> dict[str, Any]:
        path = self._grant_path(grant_id)
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"this edge agent issued no grant {grant_id!r}") from None
        return data

    def revoke(self, grant_id: str, *, reason: str = "") -> dict[str, Any]:
        record = self.granted(grant_id)
        bundle = _record_bundle(record)
        now = int(time.time())
        revocation = sign_revocation(self.root, revoked_id=bundle.leaf.id, now=now, reason=reason)
        answer = self._call(
            "POST", f"{record['cloud']}/v1/revocations", json={"record": revocation}
        )
        self._update_record(grant_id, revoked={"at": now, "reason": reason})
        return answer

    def act(
        self,
        grant_id: str,
        action: str,
        request: dict[str, Any],
        *,
        resource: str | None = None,
        api_token: str | None = None,
    ) -> dict[str, Any]:
        """Have the cloud agent perform ``action`` under one of this owner's grants.

        ``resource`` defaults to the grant's resource when it names exactly one (no
        wildcard).  For ``sign/…`` actions the answer's ``evidence`` is what ``janus
        edge verify`` checks; it is checked here to be there before it is handed on.
        The uses the cloud agent reports are kept in the grant's record
        (:meth:`grants`).
        """
        record = self.granted(grant_id)
        bundle = _record_bundle(record)
        if resource is None:
            resource = _only_resource(bundle)
        headers = {"authorization": f"Bearer {api_token}"} if api_token is not None else {}
        answer = self._call(
            "POST",
            f"{record['cloud']}{action_path(grant_id, action)}",
            json=action_body(resource, request),
            headers=headers,
        )
        if action.startswith("sign/") and not isinstance(answer.get("evidence"), dict):
            raise BadCloudAnswerError(f"the cloud agent answered {action} without evidence")
        uses = answer.get("uses")
        used = uses.get(bundle.leaf.id) if isinstance(uses, dict) else None
        if isinstance(used, int) and not isinstance(used, bool):
            self._update_record(grant_id, used=used, last_used=int(time.time()))
        return answer

    def grants(self, *, refresh: bool = False, now: float | None = None) -> list[dict[str, Any]]:
        """Every grant this edge agent issued, with its state as far as it knows.

        The state is ``revoked`` (revoked from here), ``expired``, ``used up`` (by the
        uses last reported to ``act``) or ``active``.  With ``refresh`` each cloud agent
        is asked too, and a grant it has ended takes the reason it gives; a cloud agent
        that cannot be reached leaves the local state and says why under ``cloud``.
        """
        now = time.time() if now is None else now
        listed = []
        for record in self._grant_records():
            grant_id = record.get("grant_id")
            if not isinstance(grant_id, str) or not _GRANT_ID.fullmatch(grant_id):
                continue
            try:
                leaf = _record_bundle(record).leaf
            except (PolicyError, KeyError, TypeError, ValueError):
                listed.append({"grant_id": grant_id, "state": "unreadable"})
                continue
            used = record.get("used")
            limit = leaf.limits.uses
            if record.get("revoked"):
                state = "revoked"
            elif now >= leaf.expires:
                state = "expired"
            elif isinstance(used, int) and limit is not None and used >= limit:
                state = "used up"
            else:
                state = "active"
            entry: dict[str, Any] = {
                "grant_id": grant_id,
                "cloud": record.get("cloud"),
                "key": leaf.audience,
                "capability": leaf.id,
                "abilities": [a.to_json() for a in leaf.abilities],
                "expires": leaf.expires,
                "uses": {"limit": limit, "used": used if isinstance(used, int) else None},
                "state": state,
            }
            if refresh and isinstance(record.get("cloud"), str):
                entry["cloud_status"] = self._cloud_status(record["cloud"], grant_id)
                status = entry["cloud_status"].get("status")
                if status not in (None, "active", "pending") and state == "active":
                    entry["state"] = str(entry["cloud_status"].get("reason") or status)
            listed.append(entry)
        return listed

    def _cloud_status(self, cloud: str, grant_id: str) -> dict[str, Any]:
        try:
            answer = self._call("GET", f"{cloud}/v1/grants/{grant_id}")
        except AgentError as exc:
            return {"error": exc.code, "message": str(exc)}
        return {"status": answer.get("status"), "reason": answer.get("reason")}

    def _update_record(self, grant_id: str, **changes: Any) -> None:
        record = self.granted(grant_id)
        record.update(changes)
        _write_atomic(self._grant_path(grant_id), json.dumps(record, indent=1))

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
            except Exception as exc:  # a fault of ours on one message: the same applies
                messages.append({"id": item["id"], "error": f"internal: {type(exc).__name__}"})
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
