"""``lim.fresh``: a capability usable only where revocation state is known fresh.

Absent unless set (capabilities without it are byte-for-byte as before), written only
as ``true``, kept by every redelegation, and a child that drops it is refused.
"""

from __future__ import annotations

import time

import pytest

from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.capability import CAPABILITY_TYP, Bundle, Capability, Limits, capability_claims
from policies.errors import AttenuationError, FormatError
from policies.issue import grant
from policies.jws import sign_compact
from policies.verify import Verifier
from tests.policies.keys import software_keys

PAY = Ability("janus:payments/eur", "sign/payment")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyHandle]:
    names = ("root", "operator", "holder")
    return software_keys(tmp_path_factory.mktemp("keys"), dict.fromkeys(names, Algorithm.EdDSA))


def _parent(keys: dict[str, KeyHandle], *, fresh: bool) -> Bundle:
    return grant(
        keys["root"],
        audience=keys["operator"].did,
        abilities=[PAY],
        ttl_seconds=600,
        uses=10,
        depth=1,
        fresh=fresh,
    )


def test_not_fresh_unless_asked(keys: dict[str, KeyHandle]) -> None:
    bundle = _parent(keys, fresh=False)
    assert "fresh" not in bundle.leaf.jws.payload["lim"]
    assert not bundle.leaf.limits.fresh


def test_fresh_is_written_as_true_and_kept_by_a_redelegation(keys: dict[str, KeyHandle]) -> None:
    parent = _parent(keys, fresh=True)
    assert parent.leaf.jws.payload["lim"]["fresh"] is True
    child = grant(
        keys["operator"], audience=keys["holder"].did, abilities=[PAY], ttl_seconds=60,
        uses=5, proof=parent,
    )  # fmt: skip
    assert child.leaf.limits.fresh  # inherited without being asked
    Verifier().verify_chain(child, now=time.time())


def test_a_child_that_drops_fresh_is_refused(keys: dict[str, KeyHandle]) -> None:
    parent = _parent(keys, fresh=True)
    now = int(time.time())
    claims = capability_claims(
        issuer=keys["operator"].did,
        audience=keys["holder"].did,
        principal=keys["root"].did,
        jti="f" * 22,
        issued_at=now,
        not_before=now,
        expires=now + 60,
        abilities=[PAY],
        limits=Limits(5, None, 0),
        proofs=[parent.leaf.id],
    )
    compact = sign_compact(keys["operator"], {"typ": CAPABILITY_TYP}, claims)
    dropped = parent.extend(Capability.parse(compact, index=1))
    with pytest.raises(AttenuationError, match="fresh"):
        Verifier().verify_chain(dropped, now=now)


def test_a_child_may_add_fresh(keys: dict[str, KeyHandle]) -> None:
    child = grant(
        keys["operator"], audience=keys["holder"].did, abilities=[PAY], ttl_seconds=60,
        uses=5, proof=_parent(keys, fresh=False), fresh=True,
    )  # fmt: skip
    assert child.leaf.limits.fresh
    Verifier().verify_chain(child, now=time.time())


@pytest.mark.parametrize("value", [False, None, 1, "true", []])
def test_fresh_other_than_true_is_refused(value: object) -> None:
    with pytest.raises(FormatError, match="fresh"):
        Limits.from_json({"uses": None, "rate": None, "depth": 0, "fresh": value})
