"""Operator approvals: FIDO2 assertions over a grant, from software authenticators.

Every approver is a separate ``SoftwareAuthenticator`` registered through fido2's real
``Fido2Client.make_credential`` and checked by ``Fido2Server``; approvals are requested
through ``Fido2Client.get_assertion`` (or raw ``Ctap2``), as with USB keys.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.server import Fido2Server
from fido2.webauthn import (
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from hardware.fido2_authenticator import Presence, ScriptedPresence, SoftwareAuthenticator
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle, KeyProperties, SignatureFormat
from janus_hsm.public_keys import PublicKey
from policies.abilities import Ability
from policies.approvals import (
    Approval,
    ApprovalRequestError,
    Approver,
    ApproverSet,
    approval_challenge,
    request_approval,
    verify_approvals,
    verify_capability_approvals,
)
from policies.errors import FormatError, PolicyViolationError
from policies.issue import grant, prepare_grant
from policies.policy import IssuancePolicy
from tests.policies.keys import software_keys

ORIGIN = "https://janus.example"
RP_ID = "janus.example"
PIN = "4711-janus"
NOW = 1_900_000_000
ABILITIES = (Ability("janus:payments/eur", "sign/payment"),)

POLICY = IssuancePolicy.loads(
    """
version = 1

[[rule]]
name = "two-operators"
audiences = ["*"]
abilities = [{ can = "sign/*", with = "janus:payments/*" }]
max_ttl = "1h"
max_uses = 10
require = ["pin", "approval"]
approvals = 2
"""
)


class Person(UserInteraction):
    def __init__(self) -> None:
        self.touch_prompts = 0

    def prompt_up(self) -> None:
        self.touch_prompts += 1

    def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
        return PIN


class CountingKey(KeyHandle):
    """A thin wrapper around a key that counts what it signs."""

    def __init__(self, inner: KeyHandle) -> None:
        self.inner = inner
        self.allow_extractable = inner.allow_extractable
        self.signatures = 0

    @property
    def uri(self) -> str:
        return self.inner.uri

    @property
    def properties(self) -> KeyProperties:
        return self.inner.properties

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    def sign(self, data: bytes, *, format: SignatureFormat = SignatureFormat.RAW) -> bytes:
        self.signatures += 1
        return self.inner.sign(data, format=format)


@dataclasses.dataclass
class Operator:
    approver: Approver
    device: SoftwareAuthenticator
    presence: ScriptedPresence
    client: Fido2Client
    person: Person


def _operator(name: str, *, pin: bool = False) -> Operator:
    presence = ScriptedPresence()
    device = SoftwareAuthenticator(presence=presence, presence_timeout=0.2)
    if pin:
        ClientPin(Ctap2(device)).set_pin(PIN)
    person = Person()
    client = Fido2Client(device, DefaultClientDataCollector(ORIGIN), person)
    server = Fido2Server(PublicKeyCredentialRpEntity(id=RP_ID, name="Janus"))
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=name.encode(), name=name, display_name=name),
        resident_key_requirement=ResidentKeyRequirement.DISCOURAGED,
        user_verification=UserVerificationRequirement.DISCOURAGED,
    )
    credential = server.register_complete(state, client.make_credential(options.public_key))
    assert credential.credential_data is not None
    approver = Approver(
        id=name,
        credential_id=credential.credential_data.credential_id,
        public_key=credential.credential_data.public_key,
        rp_id=RP_ID,
    )
    return Operator(approver, device, presence, client, person)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyHandle]:
    return software_keys(
        tmp_path_factory.mktemp("keys"), {"edge": Algorithm.ES256, "holder": Algorithm.EdDSA}
    )


@pytest.fixture
def issuer(keys: dict[str, KeyHandle]) -> CountingKey:
    return CountingKey(keys["edge"])


@pytest.fixture
def operators() -> list[Operator]:
    return [_operator("alice"), _operator("bob"), _operator("carol")]


@pytest.fixture
def approvers(operators: list[Operator]) -> ApproverSet:
    return ApproverSet(tuple(o.approver for o in operators))


@pytest.fixture
def request_kwargs(keys: dict[str, KeyHandle]) -> dict[str, Any]:
    return {
        "audience": keys["holder"].did,
        "abilities": ABILITIES,
        "ttl_seconds": 600,
        "uses": 3,
        "policy": POLICY,
        "now": NOW,
    }


@pytest.fixture
def claims(issuer: CountingKey, request_kwargs: dict[str, Any]) -> dict[str, Any]:
    return prepare_grant(issuer, **request_kwargs).claims


def approve(operator: Operator, claims: dict[str, Any], uv: str = "discouraged") -> Approval:
    return request_approval(
        operator.client,
        operator.approver,
        claims,
        rp_id=RP_ID,
        origin=ORIGIN,
        user_verification=uv,
    )


def check(
    approvals: list[Approval],
    approvers: ApproverSet,
    claims: dict[str, Any],
    *,
    required: int = 1,
    require_uv: bool = False,
) -> list[str]:
    return verify_approvals(
        approvals,
        approvers,
        claims,
        required=required,
        require_uv=require_uv,
        origin=ORIGIN,
        rp_id=RP_ID,
    )


def approval_kwargs(approvers: ApproverSet) -> dict[str, Any]:
    return {"approvers": approvers, "approval_origin": ORIGIN, "approval_rp_id": RP_ID}


# ------------------------------------------------------------------------ verifying


def test_approvals_verify(
    operators: list[Operator], approvers: ApproverSet, claims: dict[str, Any]
) -> None:
    prompts: list[str] = []
    approval = request_approval(
        operators[0].client,
        operators[0].approver,
        claims,
        rp_id=RP_ID,
        origin=ORIGIN,
        prompt=lambda approver: prompts.append(approver.id),
    )
    assert prompts == ["alice"]
    client_data = json.loads(approval.client_data_json)
    assert client_data["type"] == "webauthn.get"
    assert client_data["origin"] == ORIGIN
    second = approve(operators[1], claims)
    assert check([approval, second], approvers, claims, required=2) == ["alice", "bob"]
    # The evidence is self-contained JSON and survives the round trip.
    assert Approval.from_json(json.loads(json.dumps(approval.to_json()))) == approval


def test_challenge_binds_the_claims_without_the_evidence(claims: dict[str, Any]) -> None:
    assert approval_challenge(claims) == approval_challenge({**claims, "evd": {"x": 1}})
    assert approval_challenge(claims) != approval_challenge({**claims, "exp": claims["exp"] - 1})


def test_a_raw_ctap2_device_can_approve(
    operators: list[Operator], approvers: ApproverSet, claims: dict[str, Any]
) -> None:
    approval = request_approval(
        Ctap2(operators[2].device), operators[2].approver, claims, rp_id=RP_ID, origin=ORIGIN
    )
    assert check([approval], approvers, claims) == ["carol"]


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _client_data(approval: Approval, **changes: Any) -> bytes:
    return json.dumps({**json.loads(approval.client_data_json), **changes}).encode()


TAMPERINGS: dict[str, Callable[[Approval, Approval], Approval]] = {
    "authenticator data: signature counter": lambda a, _: dataclasses.replace(
        a, authenticator_data=_flip(a.authenticator_data, 36)
    ),
    "authenticator data: rp id hash": lambda a, _: dataclasses.replace(
        a, authenticator_data=_flip(a.authenticator_data, 0)
    ),
    "authenticator data: UP cleared": lambda a, _: dataclasses.replace(
        a, authenticator_data=_flip(a.authenticator_data, 32)
    ),
    "client data: extra member": lambda a, _: dataclasses.replace(
        a, client_data_json=_client_data(a, extra="x")
    ),
    "client data: origin": lambda a, _: dataclasses.replace(
        a, client_data_json=_client_data(a, origin="https://evil.example")
    ),
    "client data: type": lambda a, _: dataclasses.replace(
        a, client_data_json=_client_data(a, type="webauthn.create")
    ),
    "client data: challenge": lambda a, _: dataclasses.replace(
        a, client_data_json=_client_data(a, challenge="AAAA")
    ),
    "client data: not json": lambda a, _: dataclasses.replace(a, client_data_json=b"\xff"),
    "signature": lambda a, _: dataclasses.replace(a, signature=_flip(a.signature, 20)),
    "signature: another approver's": lambda a, b: dataclasses.replace(a, signature=b.signature),
    "credential id": lambda a, _: dataclasses.replace(a, credential_id=_flip(a.credential_id, 0)),
    "credential id: another approver's": lambda a, b: dataclasses.replace(
        a, credential_id=b.credential_id
    ),
    "approver id: another approver's": lambda a, b: dataclasses.replace(
        a, approver_id=b.approver_id
    ),
    "approver id: unknown": lambda a, _: dataclasses.replace(a, approver_id="mallory"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_tampering_with_any_part_fails(
    tampering: str, operators: list[Operator], approvers: ApproverSet, claims: dict[str, Any]
) -> None:
    approval = approve(operators[0], claims)
    other = approve(operators[1], claims)
    assert check([approval], approvers, claims) == ["alice"]
    with pytest.raises(PolicyViolationError, match="0 valid approval"):
        check([TAMPERINGS[tampering](approval, other)], approvers, claims)


@pytest.mark.parametrize(
    ("claim", "value"),
    [("aud", "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"), ("exp", NOW + 3600)],
)
def test_claims_changed_after_approval_fail(
    claim: str,
    value: Any,
    operators: list[Operator],
    approvers: ApproverSet,
    claims: dict[str, Any],
) -> None:
    approval = approve(operators[0], claims)
    with pytest.raises(PolicyViolationError, match="not the digest of this capability"):
        check([approval], approvers, {**claims, claim: value})


def test_wrong_origin_or_rp_id_at_verification_fails(
    operators: list[Operator], approvers: ApproverSet, claims: dict[str, Any]
) -> None:
    approval = approve(operators[0], claims)
    with pytest.raises(PolicyViolationError, match="origin"):
        verify_approvals(
            [approval], approvers, claims, required=1, origin="https://other", rp_id=RP_ID
        )
    with pytest.raises(PolicyViolationError, match="registered for"):
        verify_approvals(
            [approval], approvers, claims, required=1, origin=ORIGIN, rp_id="other.example"
        )


def test_m_of_n_is_enforced_and_duplicates_count_once(
    operators: list[Operator], approvers: ApproverSet, claims: dict[str, Any]
) -> None:
    alice, alice_again, bob = (
        approve(operators[0], claims),
        approve(operators[0], claims),
        approve(operators[1], claims),
    )
    with pytest.raises(PolicyViolationError, match=r"1 valid approval.*2 required"):
        check([alice], approvers, claims, required=2)
    with pytest.raises(PolicyViolationError, match="same approver again"):
        check([alice, alice], approvers, claims, required=2)
    with pytest.raises(PolicyViolationError, match="1 valid approval"):
        check([alice, alice_again], approvers, claims, required=2)
    assert check([alice, alice_again, bob], approvers, claims, required=2) == ["alice", "bob"]
    with pytest.raises(PolicyViolationError, match=r"2 valid approval.*3 required"):
        check([alice, bob], approvers, claims, required=3)


def test_user_verification_required_but_not_performed(
    approvers: ApproverSet, claims: dict[str, Any]
) -> None:
    operator = _operator("dave", pin=True)
    approvers = approvers.with_approver(operator.approver)
    without_uv = approve(operator, claims, uv="discouraged")
    with pytest.raises(PolicyViolationError, match="UV flag is not set"):
        check([without_uv], approvers, claims, require_uv=True)
    with_uv = approve(operator, claims, uv="required")
    assert check([with_uv], approvers, claims, require_uv=True) == ["dave"]


# ------------------------------------------------------------------------ grants


def test_grant_with_two_approvals_carries_evidence_that_reverifies(
    issuer: CountingKey,
    operators: list[Operator],
    approvers: ApproverSet,
    request_kwargs: dict[str, Any],
) -> None:
    draft = prepare_grant(issuer, **request_kwargs)
    assert draft.decision.approvals == 2
    approvals = [approve(operators[0], draft.claims), approve(operators[2], draft.claims)]
    bundle = grant(
        issuer,
        **request_kwargs,
        jti=draft.jti,
        approvals=approvals,
        evidence={"note": "quarterly payments"},
        **approval_kwargs(approvers),
    )
    assert issuer.signatures == 1
    capability = bundle.leaf
    assert capability.jti == draft.jti
    assert capability.evidence is not None
    assert capability.evidence["note"] == "quarterly payments"
    assert capability.evidence["approvals"] == [a.to_json() for a in approvals]
    counted = verify_capability_approvals(
        capability, approvers, 2, require_uv=False, origin=ORIGIN, rp_id=RP_ID
    )
    assert counted == ["alice", "carol"]
    with pytest.raises(PolicyViolationError, match=r"2 valid approval.*3 required"):
        verify_capability_approvals(capability, approvers, 3, origin=ORIGIN, rp_id=RP_ID)
    # An approver set without carol (e.g. after her key was removed) counts only alice.
    with pytest.raises(PolicyViolationError, match="1 valid approval"):
        verify_capability_approvals(
            capability, approvers.without("carol"), 2, origin=ORIGIN, rp_id=RP_ID
        )


def test_too_few_approvals_refuse_the_grant_and_sign_nothing(
    issuer: CountingKey,
    operators: list[Operator],
    approvers: ApproverSet,
    request_kwargs: dict[str, Any],
) -> None:
    draft = prepare_grant(issuer, **request_kwargs)
    one = [approve(operators[0], draft.claims)]
    with pytest.raises(PolicyViolationError, match=r"1 valid approval.*2 required"):
        grant(issuer, **request_kwargs, jti=draft.jti, approvals=one, **approval_kwargs(approvers))
    with pytest.raises(PolicyViolationError, match="requires approval"):
        grant(issuer, **request_kwargs)
    assert issuer.signatures == 0


def test_presence_denied_means_no_approval_and_nothing_signed(
    issuer: CountingKey,
    operators: list[Operator],
    approvers: ApproverSet,
    request_kwargs: dict[str, Any],
) -> None:
    draft = prepare_grant(issuer, **request_kwargs)
    alice = approve(operators[0], draft.claims)
    operators[1].presence.push(Presence.DENY)
    with pytest.raises(ApprovalRequestError, match="'bob' gave no approval: user presence denied"):
        approve(operators[1], draft.claims)
    operators[1].presence.push(Presence.TIMEOUT)
    with pytest.raises(ApprovalRequestError, match="timed out"):
        approve(operators[1], draft.claims)
    with pytest.raises(PolicyViolationError, match="1 valid approval"):
        grant(
            issuer, **request_kwargs, jti=draft.jti, approvals=[alice], **approval_kwargs(approvers)
        )
    assert issuer.signatures == 0


def test_approvals_for_other_claims_refuse_the_grant(
    issuer: CountingKey,
    operators: list[Operator],
    approvers: ApproverSet,
    request_kwargs: dict[str, Any],
) -> None:
    draft = prepare_grant(issuer, **request_kwargs)
    approvals = [approve(operators[0], draft.claims), approve(operators[1], draft.claims)]
    # Without the draft's jti the grant has other claims, so the approvals do not match;
    # the same holds for any other change (here: more uses).
    for changes in ({}, {"jti": draft.jti, "uses": 4}):
        with pytest.raises(PolicyViolationError, match="0 valid approval"):
            grant(
                issuer,
                **{**request_kwargs, **changes},
                approvals=approvals,
                **approval_kwargs(approvers),
            )
    assert issuer.signatures == 0


def test_grant_needs_the_approvers_to_verify_approvals(
    issuer: CountingKey,
    operators: list[Operator],
    request_kwargs: dict[str, Any],
) -> None:
    draft = prepare_grant(issuer, **request_kwargs)
    approvals = [approve(operators[0], draft.claims), approve(operators[1], draft.claims)]
    with pytest.raises(FormatError, match="needs approvers"):
        grant(issuer, **request_kwargs, jti=draft.jti, approvals=approvals)
    assert issuer.signatures == 0


def test_satisfied_approval_is_still_the_callers_assertion(
    issuer: CountingKey, request_kwargs: dict[str, Any]
) -> None:
    bundle = grant(issuer, **request_kwargs, satisfied=("approval",))
    assert issuer.signatures == 1
    assert bundle.leaf.evidence is None


# ------------------------------------------------------------------------ registry


def test_approver_set_round_trip(tmp_path: Path, approvers: ApproverSet) -> None:
    path = tmp_path / "approvers.json"
    approvers.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = ApproverSet.load(path)
    assert [a.to_json() for a in loaded] == [a.to_json() for a in approvers]
    assert len(loaded) == 3
    approvers.without("bob").save(path)
    assert [a.id for a in ApproverSet.load(path)] == ["alice", "carol"]


def test_approver_set_parsing_is_strict(tmp_path: Path, approvers: ApproverSet) -> None:
    document = json.loads(approvers.to_json())
    entry = document["approvers"][0]

    def loads(obj: Any) -> ApproverSet:
        return ApproverSet.loads(json.dumps(obj))

    with pytest.raises(FormatError, match="not an approver registry"):
        loads({**document, "typ": "other"})
    with pytest.raises(FormatError, match="exactly"):
        loads({**document, "approvers": [{**entry, "name": "x"}]})
    with pytest.raises(FormatError, match="credential_id"):
        loads({**document, "approvers": [{**entry, "credential_id": "not base64!"}]})
    with pytest.raises(FormatError, match="public_key"):
        loads({**document, "approvers": [{**entry, "public_key": {"kty": "EC"}}]})
    with pytest.raises(FormatError, match="same credential id"):
        loads({**document, "approvers": [entry, {**entry, "id": "other"}]})
    with pytest.raises(FormatError, match="same id"):
        loads({**document, "approvers": [entry, entry]})
    with pytest.raises(FormatError, match="appears twice"):
        ApproverSet.loads('{"typ": "janus-approvers/1", "approvers": [], "approvers": []}')
    with pytest.raises(FormatError, match="cannot read"):
        ApproverSet.load(tmp_path / "missing.json")
    with pytest.raises(FormatError, match="approver id"):
        Approver(id="", credential_id=b"x", public_key=entry["public_key"], rp_id=RP_ID)


def test_approval_parsing_is_strict(operators: list[Operator], claims: dict[str, Any]) -> None:
    obj = approve(operators[0], claims).to_json()
    with pytest.raises(FormatError, match="exactly"):
        Approval.from_json({**obj, "extra": "x"})
    with pytest.raises(FormatError, match="signature"):
        Approval.from_json({**obj, "signature": "a="})
    with pytest.raises(FormatError, match="must be an object"):
        Approval.from_json([obj])


def test_approvals_sign_one_capability_when_the_issuer_keeps_a_log(
    issuer: CountingKey,
    operators: list[Operator],
    approvers: ApproverSet,
    request_kwargs: dict[str, Any],
    tmp_path: Path,
) -> None:
    from policies.approval_log import ApprovalReusedError, UsedApprovals

    draft = prepare_grant(issuer, **request_kwargs)
    approvals = [approve(operators[0], draft.claims), approve(operators[2], draft.claims)]
    arguments = {**request_kwargs, "jti": draft.jti, "approvals": approvals}
    log = tmp_path / "fido2" / "used-approvals"
    grant(issuer, **arguments, **approval_kwargs(approvers), used_approvals=UsedApprovals(log))
    with pytest.raises(ApprovalReusedError):  # a second process, the same file
        grant(issuer, **arguments, **approval_kwargs(approvers), used_approvals=UsedApprovals(log))
    assert issuer.signatures == 1
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_the_approval_log_survives_a_torn_line(tmp_path: Path) -> None:
    from policies.approval_log import ApprovalReusedError, UsedApprovals

    path = tmp_path / "used-approvals"
    log = UsedApprovals(path)
    first, second = bytes(32), bytes([1]) * 32
    log.claim(first)
    with path.open("a") as f:
        f.write(second.hex()[:20])  # a crash in the middle of the next line
    log.claim(second)  # the torn line is not the digest: not refused
    with pytest.raises(ApprovalReusedError):
        log.claim(second)
    with pytest.raises(ApprovalReusedError):
        UsedApprovals(path).claim(first)
    assert path.read_text().splitlines() == [first.hex(), second.hex()[:20], second.hex()]
