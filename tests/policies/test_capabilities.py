"""Capabilities end to end: grant from a SoftHSM root, redelegate, invoke, verify, refuse."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jws as jose_jws
from joserfc.jwk import ECKey, OKPKey

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from policies import issue
from policies.abilities import Ability, pattern_matches
from policies.capability import CAPABILITY_TYP, Bundle, Limits, capability_claims
from policies.errors import (
    AlgorithmRefusedError,
    AttenuationError,
    CaveatFailedError,
    ChainLimitError,
    ExpiredError,
    FormatError,
    LinkageError,
    NotAuthorizedError,
    NotYetValidError,
    PolicyError,
    RevokedError,
    RootMismatchError,
    SignatureInvalidError,
    VerificationError,
    WrongHolderError,
)
from policies.invocation import Invocation, invoke
from policies.jws import canonical_json, sign_compact
from policies.policy import IssuancePolicy
from policies.revocation import Revocation, sign_revocation
from policies.verify import Verifier
from tests.policies.keys import software_keys

NOW = 1_800_000_000
OPEN_POLICY = IssuancePolicy.loads(
    """
version = 1
[[rule]]
name = "tests"
audiences = ["*"]
abilities = [{ can = "*", with = "*" }]
max_ttl = "1d"
max_uses = "unlimited"
max_depth = 9
require = []
"""
)


def grant(issuer: KeyHandle, **kw: Any) -> Bundle:
    kw.setdefault("policy", OPEN_POLICY)
    return issue.grant(issuer, **kw)


PAY = Ability("janus:payments/eur", "sign/payment", ({"field": "amount", "le": 10000},))


@pytest.fixture(scope="module")
def root(pkcs11_provider: Pkcs11Provider) -> KeyHandle:
    uri = "pkcs11:object=capability-root"
    try:
        return pkcs11_provider.find(uri)
    except KeyNotFoundError:  # first use in this session
        return pkcs11_provider.generate(uri, Algorithm.ES256)


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyHandle]:
    return software_keys(
        tmp_path_factory.mktemp("agents"),
        {
            "cloud": Algorithm.EdDSA,
            "worker": Algorithm.ES256,
            "other": Algorithm.EdDSA,
            "deep": Algorithm.EdDSA,
        },
    )


def root_grant(root: KeyHandle, audience: KeyHandle, **kw: Any) -> Bundle:
    args: dict[str, Any] = {
        "abilities": [Ability("janus:payments/*", "sign/*")],
        "ttl_seconds": 600,
        "uses": 5,
        "depth": 2,
        "now": NOW,
    }
    args.update(kw)
    return grant(root, audience=audience.did, **args)


def use(
    holder: KeyHandle,
    bundle: Bundle,
    request: dict[str, Any],
    *,
    action: str = "sign/payment",
    resource: str = "janus:payments/eur",
    now: int = NOW,
) -> str:
    return invoke(
        holder,
        capability_id=bundle.leaf.id,
        action=action,
        resource=resource,
        request=request,
        now=now,
    )


def test_grant_redelegate_invoke_verify(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    cloud, worker = agents["cloud"], agents["worker"]
    parent = root_grant(root, cloud)
    child = grant(
        cloud,
        audience=worker.did,
        abilities=[PAY],
        ttl_seconds=300,
        uses=3,
        proof=parent,
        now=NOW + 1,
    )
    assert [c.issuer for c in child.chain] == [root.did, cloud.did]
    assert child.leaf.proofs == (parent.leaf.id,)
    assert child.leaf.principal == root.did

    request = {"amount": 9900, "currency": "EUR", "to": "alice"}
    auth = Verifier().verify(
        Bundle.parse(child.to_json()),
        use(worker, child, request),
        request,
        now=NOW + 2,
        root=root.did,
    )
    assert auth.chain.principal == root.did
    assert [lim.uses for lim in auth.chain.link_limits()] == [5, 3]


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
def test_each_link_verifies_with_a_standard_jose_library(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    parent = root_grant(root, agents["cloud"])
    child = grant(
        agents["cloud"],
        audience=agents["worker"].did,
        abilities=[PAY],
        ttl_seconds=60,
        uses=1,
        proof=parent,
        now=NOW,
    )
    for cap, signer in zip(child.chain, [root, agents["cloud"]], strict=True):
        jwk = dict(signer.jwk())
        key = ECKey.import_key(jwk) if jwk["kty"] == "EC" else OKPKey.import_key(jwk)
        result = jose_jws.deserialize_compact(cap.compact, key, algorithms=[cap.jws.header["alg"]])
        assert json.loads(result.payload)["sub"] == root.did


def test_caveats_of_every_link_apply(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    cloud, worker = agents["cloud"], agents["worker"]
    parent = root_grant(root, cloud, abilities=[PAY])
    child = grant(
        cloud,
        audience=worker.did,
        uses=2,
        ttl_seconds=60,
        proof=parent,
        now=NOW,
        abilities=[
            Ability("janus:payments/eur", "sign/payment", ({"field": "to", "eq": "alice"},))
        ],
    )
    verifier = Verifier()
    ok = {"amount": 100, "to": "alice"}
    verifier.verify(child, use(worker, child, ok), ok, now=NOW)
    too_much = {"amount": 20000, "to": "alice"}  # the parent's caveat binds the child
    with pytest.raises(CaveatFailedError) as info:
        verifier.verify(child, use(worker, child, too_much), too_much, now=NOW)
    assert info.value.link == 0
    wrong_payee = {"amount": 100, "to": "mallory"}
    with pytest.raises(CaveatFailedError) as info:
        verifier.verify(child, use(worker, child, wrong_payee), wrong_payee, now=NOW)
    assert info.value.link == 1


def test_actions_and_resources_outside_the_grant(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    bundle = root_grant(root, agents["cloud"])
    with pytest.raises(NotAuthorizedError):
        Verifier().verify(bundle, use(agents["cloud"], bundle, {}, action="msg/send"), {}, now=NOW)
    with pytest.raises(NotAuthorizedError):
        Verifier().verify(
            bundle, use(agents["cloud"], bundle, {}, resource="janus:keys/x"), {}, now=NOW
        )


def test_request_must_match_the_invocation_digest(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    bundle = root_grant(root, agents["cloud"])
    invocation = use(agents["cloud"], bundle, {"amount": 1})
    with pytest.raises(VerificationError, match="digest"):
        Verifier().verify(bundle, invocation, {"amount": 2}, now=NOW)


def test_time_is_checked_with_skew_on_every_link(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    bundle = root_grant(root, agents["cloud"], ttl_seconds=600)
    verifier = Verifier()
    verifier.verify_chain(bundle, now=NOW + 600 + 59, skew=60)
    with pytest.raises(ExpiredError) as info:
        verifier.verify_chain(bundle, now=NOW + 600 + 60, skew=60)
    assert info.value.link == 0
    with pytest.raises(NotYetValidError):
        verifier.verify_chain(bundle, now=NOW - 61, skew=60)
    verifier.verify_chain(bundle, now=NOW - 59, skew=60)


def test_expired_invocation(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    bundle = root_grant(root, agents["cloud"])
    invocation = use(agents["cloud"], bundle, {}, now=NOW)
    with pytest.raises(ExpiredError, match="invocation"):
        Verifier().verify(bundle, invocation, {}, now=NOW + 60 + 61)


@pytest.mark.parametrize(
    "nonce",
    ["a" * 15 + "\x00", "a" * 16 + "\ud800", "a" * 16 + "=", "a" * 16 + "+/", "a b" * 8, "é" * 16],
)
def test_invocation_nonce_must_be_base64url(
    root: KeyHandle, agents: dict[str, KeyHandle], nonce: str
) -> None:
    """Only the documented form: what a ledger stores and compares must be plain text."""
    cloud = agents["cloud"]
    bundle = root_grant(root, cloud)
    good = use(cloud, bundle, {}, now=NOW)
    assert Invocation.parse(good).nonce  # the nonce invoke makes is accepted
    head, body, _ = good.split(".")
    claims = {**json.loads(base64.urlsafe_b64decode(body + "==")), "nonce": nonce}
    # Escaped, as any JSON encoder may write it (a lone surrogate cannot be UTF-8).
    signing_input = f"{head}.{_b64(json.dumps(claims, sort_keys=True).encode())}"
    forged = f"{signing_input}.{_b64(cloud.sign(signing_input.encode()))}"
    refusal = "lone surrogate" if "\ud800" in nonce else "nonce must be base64url"
    with pytest.raises(FormatError, match=refusal):
        Invocation.parse(forged)
    with pytest.raises(FormatError, match=refusal):
        Verifier().verify(bundle, forged, {}, now=NOW)


def test_wrong_holder_key_is_refused(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    bundle = root_grant(root, agents["cloud"])
    stolen = use(agents["other"], bundle, {})  # a key that is not the audience
    with pytest.raises(WrongHolderError):
        Verifier().verify(bundle, stolen, {}, now=NOW)
    # A forged invocation claiming to be the holder, but signed by another key.
    forged = _resign(stolen, agents["other"], iss=agents["cloud"].did, typ="janus-inv+jws")
    with pytest.raises(SignatureInvalidError):
        Verifier().verify(bundle, forged, {}, now=NOW)


def test_revocation_of_leaf_and_via_ancestor(
    root: KeyHandle, agents: dict[str, KeyHandle], tmp_path: Path
) -> None:
    from policies.ledger import open_ledger

    cloud, worker = agents["cloud"], agents["worker"]
    parent = root_grant(root, cloud)
    child = grant(
        cloud, audience=worker.did, abilities=[PAY], ttl_seconds=60, uses=1, proof=parent, now=NOW
    )
    sibling = grant(
        cloud,
        audience=agents["other"].did,
        abilities=[PAY],
        ttl_seconds=60,
        uses=1,
        proof=parent,
        now=NOW,
    )
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        verifier = Verifier(revocations=ledger)
        verifier.verify_chain(child, now=NOW)
        leaf_record = Revocation.parse(sign_revocation(cloud, revoked_id=child.leaf.id, now=NOW))
        assert leaf_record.verify(child) == 1
        ledger.revoke(child.leaf.id, record=leaf_record.compact, data={})
        with pytest.raises(RevokedError) as info:
            verifier.verify_chain(child, now=NOW)
        assert info.value.link == 1
        verifier.verify_chain(sibling, now=NOW)  # untouched
        # The root revokes its grant: every descendant falls with it.
        root_record = Revocation.parse(sign_revocation(root, revoked_id=parent.leaf.id, now=NOW))
        assert root_record.verify(sibling) == 0
        ledger.revoke(parent.leaf.id, record=root_record.compact, data={})
        with pytest.raises(RevokedError) as info:
            verifier.verify_chain(sibling, now=NOW)
        assert info.value.link == 0


def test_only_issuers_at_or_above_may_revoke(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    parent = root_grant(root, agents["cloud"])
    child = grant(
        agents["cloud"],
        audience=agents["worker"].did,
        abilities=[PAY],
        ttl_seconds=60,
        uses=1,
        proof=parent,
        now=NOW,
    )
    # The worker holds the leaf but issued nothing: it cannot revoke the root grant.
    record = Revocation.parse(sign_revocation(agents["worker"], revoked_id=parent.leaf.id, now=NOW))
    with pytest.raises(VerificationError, match="cannot revoke"):
        record.verify(child)
    # The cloud agent issued link 1 but not link 0.
    record = Revocation.parse(sign_revocation(agents["cloud"], revoked_id=parent.leaf.id, now=NOW))
    with pytest.raises(VerificationError, match="cannot revoke"):
        record.verify(child)


def test_redelegation_wider_than_the_parent_is_refused_before_signing(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    cloud, worker = agents["cloud"], agents["worker"]
    parent = root_grant(
        root,
        cloud,
        uses=5,
        ttl_seconds=600,
        depth=1,
        abilities=[Ability("janus:payments/eur", "sign/payment")],
    )
    cases: list[dict[str, Any]] = [
        {"abilities": [Ability("janus:payments/*", "sign/payment")]},
        {"abilities": [Ability("janus:payments/eur", "sign/*")]},
        {"uses": 6},
        {"uses": None},
        {"ttl_seconds": 601},
        {"depth": 1},
    ]
    for change in cases:
        args: dict[str, Any] = {"abilities": [PAY], "ttl_seconds": 60, "uses": 1, "depth": 0}
        args.update(change)
        with pytest.raises(AttenuationError):
            grant(cloud, audience=worker.did, proof=parent, now=NOW, **args)
    with pytest.raises(LinkageError, match="not the audience"):
        grant(
            worker,
            audience=cloud.did,
            abilities=[PAY],
            ttl_seconds=60,
            uses=1,
            proof=parent,
            now=NOW,
        )
    leaf = grant(
        cloud, audience=worker.did, abilities=[PAY], ttl_seconds=60, uses=1, proof=parent, now=NOW
    )
    with pytest.raises(AttenuationError, match="depth 0"):
        grant(
            worker,
            audience=agents["other"].did,
            abilities=[PAY],
            ttl_seconds=10,
            uses=1,
            proof=leaf,
            now=NOW,
        )


def test_invalid_caveats_are_refused_at_issuance(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    with pytest.raises(FormatError):
        grant(
            root,
            audience=agents["cloud"].did,
            ttl_seconds=60,
            uses=1,
            now=NOW,
            abilities=[Ability("janus:x", "a", ({"field": "amount", "le": 1.5},))],
        )


def test_root_must_be_the_principal(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    bundle = root_grant(root, agents["cloud"])
    with pytest.raises(RootMismatchError):
        Verifier().verify_chain(bundle, now=NOW, root=agents["cloud"].did)
    # A chain whose root claims a principal other than its signer.
    claims = _claims(agents["cloud"], agents["worker"], principal=root.did)
    forged = Bundle.from_compacts([sign_compact(agents["cloud"], {"typ": CAPABILITY_TYP}, claims)])
    with pytest.raises(RootMismatchError):
        Verifier().verify_chain(forged, now=NOW)


def _claims(
    issuer: KeyHandle,
    audience: KeyHandle,
    *,
    principal: str | None = None,
    proofs: list[str] | None = None,
    **limits: Any,
) -> dict[str, Any]:
    lim = {"uses": 5, "rate": None, "depth": 9}
    lim.update(limits)
    return capability_claims(
        issuer=issuer.did,
        audience=audience.did,
        principal=principal or issuer.did,
        jti="j",
        issued_at=NOW,
        not_before=NOW,
        expires=NOW + 600,
        abilities=[Ability("janus:x/*", "*")],
        limits=Limits.from_json(lim),
        proofs=proofs or [],
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _resign(compact: str, signer: KeyHandle, *, typ: str, **changes: Any) -> str:
    """Re-sign a JWS's payload with ``signer`` after changing claims (a forgery)."""
    payload = json.loads(base64.urlsafe_b64decode(compact.split(".")[1] + "=="))
    payload.update(changes)
    return sign_compact(signer, {"typ": typ}, payload)


def _with_header(compact: str, header: dict[str, Any], signature: bytes | None = None) -> str:
    parts = compact.split(".")
    sig = parts[2] if signature is None else _b64(signature)
    return ".".join([_b64(canonical_json(header)), parts[1], sig])


def test_algorithm_confusion_is_refused(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    import hashlib
    import hmac

    bundle = root_grant(root, agents["cloud"])
    compact = bundle.leaf.compact
    header = dict(bundle.leaf.jws.header)
    # alg: none with an empty signature.
    none = _with_header(compact, {**header, "alg": "none"}, b"")
    with pytest.raises(AlgorithmRefusedError):
        Bundle.from_compacts([none])
    # HS256 keyed with the issuer's public key (the classic confusion attack).
    hs_header = {**header, "alg": "HS256"}
    signing_input = (_b64(canonical_json(hs_header)) + "." + compact.split(".")[1]).encode()
    secret = json.dumps(root.jwk()).encode()
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    with pytest.raises(AlgorithmRefusedError):
        Bundle.from_compacts([signing_input.decode() + "." + _b64(mac)])
    # Unknown critical extension.
    with pytest.raises(AlgorithmRefusedError, match="critical"):
        Bundle.from_compacts([_with_header(compact, {**header, "crit": ["exp"], "exp": 1})])
    # ES384 claimed for a P-256 key.
    with pytest.raises(AlgorithmRefusedError):
        Verifier().verify_chain(
            Bundle.from_compacts([_with_header(compact, {**header, "alg": "ES384"})]), now=NOW
        )


def test_oversized_and_too_deep_chains(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    with pytest.raises(ChainLimitError):
        Bundle.parse(json.dumps({"typ": "janus-bundle/1", "chain": ["x" * 17000]}))
    bundle = root_grant(root, agents["cloud"])
    with pytest.raises(ChainLimitError, match="at most 10"):
        Bundle.from_compacts([bundle.leaf.compact] * 11)
    # Build a real 10-link chain (allowed), then an 11th is refused.
    a, b = agents["cloud"], agents["deep"]
    chain = [sign_compact(root, {"typ": CAPABILITY_TYP}, _claims(root, a))]
    holders = [a, b]
    for i in range(1, 10):
        parent = Bundle.from_compacts(chain).leaf
        issuer, audience = holders[(i - 1) % 2], holders[i % 2]
        claims = _claims(issuer, audience, principal=root.did, proofs=[parent.id], depth=9 - i)
        chain.append(sign_compact(issuer, {"typ": CAPABILITY_TYP}, claims))
    Verifier().verify_chain(Bundle.from_compacts(chain), now=NOW)
    with pytest.raises(ChainLimitError):
        Bundle.from_compacts([*chain, chain[-1]])


def test_broken_linkage_is_refused(root: KeyHandle, agents: dict[str, KeyHandle]) -> None:
    parent = root_grant(root, agents["cloud"])
    # Issued by someone who is not the parent's audience.
    wrong_issuer = sign_compact(
        agents["other"],
        {"typ": CAPABILITY_TYP},
        _claims(
            agents["other"],
            agents["worker"],
            principal=root.did,
            proofs=[parent.leaf.id],
            depth=0,
            uses=1,
        ),
    )
    with pytest.raises(LinkageError) as info:
        Verifier().verify_chain(Bundle.from_compacts([parent.leaf.compact, wrong_issuer]), now=NOW)
    assert info.value.link == 1
    # Names another parent.
    wrong_proof = sign_compact(
        agents["cloud"],
        {"typ": CAPABILITY_TYP},
        _claims(
            agents["cloud"],
            agents["worker"],
            principal=root.did,
            proofs=["x" * 43],
            depth=0,
            uses=1,
        ),
    )
    with pytest.raises(LinkageError):
        Verifier().verify_chain(Bundle.from_compacts([parent.leaf.compact, wrong_proof]), now=NOW)


def test_cache_makes_repeat_verification_skip_signatures(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    bundle = root_grant(root, agents["cloud"])
    verifier = Verifier()
    first = verifier.verify_chain(bundle, now=NOW)
    assert verifier.verify_chain(Bundle.parse(bundle.to_json()), now=NOW) is first
    # Time and revocation are still checked on a cached chain.
    with pytest.raises(ExpiredError):
        verifier.verify_chain(bundle, now=NOW + 10_000)


# --- properties -------------------------------------------------------------------

_SEGMENTS = st.sampled_from(["a", "b", "*"])
_PATTERNS = st.lists(_SEGMENTS, min_size=1, max_size=3).map("/".join)
_VALUES = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4).map("/".join)


@given(parent=_PATTERNS, child=_PATTERNS, values=st.lists(_VALUES, min_size=1, max_size=8))
def test_covering_patterns_never_widen(parent: str, child: str, values: list[str]) -> None:
    from policies.abilities import pattern_covers

    if pattern_covers(parent, child):
        for value in values:
            if pattern_matches(child, value):
                assert pattern_matches(parent, value), (parent, child, value)


@pytest.fixture(scope="module")
def signed_parent(root: KeyHandle, agents: dict[str, KeyHandle]) -> Bundle:
    return root_grant(
        root,
        agents["cloud"],
        uses=5,
        ttl_seconds=600,
        depth=2,
        abilities=[Ability("janus:pay/a/*", "sign/*"), Ability("janus:msg/b", "msg/send")],
    )


@given(
    resource=st.lists(st.sampled_from(["janus:pay", "a", "b", "*"]), min_size=1, max_size=4).map(
        "/".join
    ),
    action=st.sampled_from(["sign/*", "sign/payment", "*", "msg/send", "msg/*"]),
    uses=st.one_of(st.none(), st.integers(1, 8)),
    ttl=st.integers(1, 1200),
    depth=st.integers(0, 3),
    probe_resource=st.lists(
        st.sampled_from(["janus:pay", "janus:msg", "a", "b", "c"]), min_size=1, max_size=5
    ).map("/".join),
    probe_action=st.sampled_from(["sign/payment", "sign/x", "msg/send", "msg/read"]),
)
def test_no_child_verifies_with_more_than_its_parent(
    signed_parent: Bundle,
    agents: dict[str, KeyHandle],
    resource: str,
    action: str,
    uses: int | None,
    ttl: int,
    depth: int,
    probe_resource: str,
    probe_action: str,
) -> None:
    """Sign arbitrary (possibly wider) children directly, bypassing grant()'s checks."""
    try:
        ability = Ability(resource, action)
    except FormatError:
        return
    parent = signed_parent.leaf
    claims = capability_claims(
        issuer=agents["cloud"].did,
        audience=agents["worker"].did,
        principal=parent.principal,
        jti="p",
        issued_at=NOW,
        not_before=NOW,
        expires=NOW + ttl,
        abilities=[ability],
        limits=Limits(uses=uses, rate=None, depth=depth),
        proofs=[parent.id],
    )
    child = signed_parent.extend(
        Bundle.from_compacts([sign_compact(agents["cloud"], {"typ": CAPABILITY_TYP}, claims)]).leaf
    )
    try:
        Verifier().verify_chain(child, now=NOW)
    except VerificationError:
        return
    assert child.leaf.expires <= parent.expires
    assert child.leaf.limits.uses is not None
    assert parent.limits.uses is not None and child.leaf.limits.uses <= parent.limits.uses
    assert child.leaf.limits.depth < parent.limits.depth
    if ability.matches(probe_resource, probe_action):
        assert any(p.matches(probe_resource, probe_action) for p in parent.abilities)


@given(data=st.data())
def test_flipping_any_byte_of_any_link_fails(
    signed_parent: Bundle, agents: dict[str, KeyHandle], data: st.DataObject
) -> None:
    child = grant(
        agents["cloud"],
        audience=agents["worker"].did,
        abilities=[Ability("janus:pay/a/x", "sign/payment")],
        ttl_seconds=60,
        uses=1,
        proof=signed_parent,
        now=NOW,
    )
    compacts = [c.compact for c in child.chain]
    link = data.draw(st.integers(0, len(compacts) - 1))
    raw = bytearray(compacts[link].encode())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    compacts[link] = raw.decode("latin-1")
    with pytest.raises(PolicyError):
        Verifier().verify_chain(Bundle.from_compacts(compacts), now=NOW)


def test_authorize_counts_uses_on_every_link_and_refuses_replays(
    root: KeyHandle, agents: dict[str, KeyHandle], tmp_path: Path
) -> None:
    from policies.authorize import authorize
    from policies.errors import LimitExceededError, ReplayError
    from policies.ledger import open_ledger

    cloud, worker = agents["cloud"], agents["worker"]
    parent = root_grant(root, cloud, uses=5, abilities=[PAY])
    child = grant(
        cloud, audience=worker.did, abilities=[PAY], ttl_seconds=300, uses=5, proof=parent, now=NOW
    )
    sibling = grant(
        cloud,
        audience=agents["other"].did,
        abilities=[PAY],
        ttl_seconds=300,
        uses=5,
        proof=parent,
        now=NOW,
    )
    request = {"amount": 100}
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        verifier = Verifier(revocations=ledger)
        first = use(worker, child, request)
        receipt = authorize(verifier, ledger, child, first, request, now=NOW).receipt
        assert receipt.uses == {parent.leaf.id: 1, child.leaf.id: 1}
        with pytest.raises(ReplayError):
            authorize(verifier, ledger, child, first, request, now=NOW)
        for _ in range(2):
            authorize(verifier, ledger, child, use(worker, child, request), request, now=NOW)
        # The parent's 5 uses are shared by both children: 3 spent, 2 left.
        for _ in range(2):
            authorize(
                verifier, ledger, sibling, use(agents["other"], sibling, request), request, now=NOW
            )
        with pytest.raises(LimitExceededError) as info:
            authorize(
                verifier, ledger, sibling, use(agents["other"], sibling, request), request, now=NOW
            )
        assert info.value.link == 0
        assert ledger.uses(parent.leaf.id) == 5
        assert ledger.verify_audit() == 5
        # Refused invocations record nothing.
        bad = {"amount": 99999}
        with pytest.raises(CaveatFailedError):
            authorize(verifier, ledger, child, use(worker, child, bad), bad, now=NOW)
        assert ledger.uses(child.leaf.id) == 3


def test_rate_limit_through_authorize(
    root: KeyHandle, agents: dict[str, KeyHandle], tmp_path: Path
) -> None:
    from policies.authorize import authorize
    from policies.errors import RateLimitedError
    from policies.ledger import Rate, open_ledger

    bundle = root_grant(root, agents["cloud"], uses=100, rate=Rate(2, 60))
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        verifier = Verifier(revocations=ledger)
        for _ in range(2):
            authorize(verifier, ledger, bundle, use(agents["cloud"], bundle, {}), {}, now=NOW)
        with pytest.raises(RateLimitedError):
            authorize(verifier, ledger, bundle, use(agents["cloud"], bundle, {}), {}, now=NOW)
        later = NOW + 60
        authorize(
            verifier, ledger, bundle, use(agents["cloud"], bundle, {}, now=later), {}, now=later
        )


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _other_signature(compact: str) -> str:
    """The same ES256 JWS with (r, n - s): still a valid ECDSA signature, another text."""
    head, body, sig = compact.split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    s = P256_ORDER - int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{_b64(raw[:32] + s.to_bytes(32, 'big'))}"


def test_a_second_signature_cannot_give_a_capability_a_second_id(
    root: KeyHandle, agents: dict[str, KeyHandle], tmp_path: Path
) -> None:
    """Anyone may compute (r, n - s) from a signature; the capability it would make has
    another id (a fresh use count, not revoked), so it must not verify."""
    from policies.authorize import authorize
    from policies.errors import LimitExceededError
    from policies.ledger import open_ledger

    cloud = agents["cloud"]
    bundle = root_grant(root, cloud, uses=2, abilities=[PAY], depth=0)
    copy = _other_signature(bundle.leaf.compact)
    with pytest.raises(SignatureInvalidError, match="low-S"):
        Verifier().verify_chain(Bundle.from_compacts([copy]), now=NOW)
    request = {"amount": 1}
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        verifier = Verifier(revocations=ledger)
        for _ in range(2):
            authorize(verifier, ledger, bundle, use(cloud, bundle, request), request, now=NOW)
        with pytest.raises(LimitExceededError):
            authorize(verifier, ledger, bundle, use(cloud, bundle, request), request, now=NOW)
        twin = Bundle.from_compacts([copy])
        assert twin.leaf.id != bundle.leaf.id
        with pytest.raises(SignatureInvalidError, match="low-S"):
            authorize(verifier, ledger, twin, use(cloud, twin, request), request, now=NOW)
        assert ledger.uses(bundle.leaf.id) == 2 and ledger.uses(twin.leaf.id) == 0


def test_invocations_and_revocations_are_held_to_low_s_too(
    root: KeyHandle, agents: dict[str, KeyHandle]
) -> None:
    worker = agents["worker"]  # ES256, in software
    bundle = root_grant(root, worker, abilities=[PAY])
    invocation = use(worker, bundle, {"amount": 1})
    Verifier().verify(bundle, invocation, {"amount": 1}, now=NOW)
    with pytest.raises(SignatureInvalidError, match="low-S"):
        Verifier().verify(bundle, _other_signature(invocation), {"amount": 1}, now=NOW)
    record = Revocation.parse(sign_revocation(root, revoked_id=bundle.leaf.id, now=NOW))
    record.verify(bundle)
    with pytest.raises(SignatureInvalidError, match="low-S"):
        Revocation.parse(_other_signature(record.compact)).verify(bundle)
