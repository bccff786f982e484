"""``lim.home``: the cloud-agent instance whose ledger counts a capability's uses.

Optional, absent unless set (capabilities without it are byte-for-byte as before),
kept by every redelegation (one ledger counts a subtree), and refused when malformed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    names = ("root", "operator", "holder", "home", "other")
    return software_keys(tmp_path_factory.mktemp("keys"), dict.fromkeys(names, Algorithm.EdDSA))


def _parent(keys: dict[str, KeyHandle], home: str | None) -> Bundle:
    return grant(
        keys["root"],
        audience=keys["operator"].did,
        abilities=[PAY],
        ttl_seconds=600,
        uses=10,
        depth=1,
        home=home,
    )


def test_without_a_home_the_limits_are_encoded_as_before(keys: dict[str, KeyHandle]) -> None:
    bundle = _parent(keys, None)
    assert bundle.leaf.jws.payload["lim"] == {"uses": 10, "rate": None, "depth": 1}
    assert bundle.leaf.limits.home is None


def test_a_home_is_carried_and_kept_by_every_redelegation(keys: dict[str, KeyHandle]) -> None:
    home = keys["home"].did
    parent = _parent(keys, home)
    assert parent.leaf.jws.payload["lim"]["home"] == home
    child = grant(
        keys["operator"],
        audience=keys["holder"].did,
        abilities=[PAY],
        ttl_seconds=60,
        uses=5,
        proof=parent,
    )
    assert child.leaf.limits.home == home  # inherited without being asked
    Verifier().verify_chain(child, now=time.time())


def test_a_redelegation_cannot_move_the_count_elsewhere(keys: dict[str, KeyHandle]) -> None:
    parent = _parent(keys, keys["home"].did)
    with pytest.raises(AttenuationError, match="home"):
        grant(
            keys["operator"],
            audience=keys["holder"].did,
            abilities=[PAY],
            ttl_seconds=60,
            uses=5,
            proof=parent,
            home=keys["other"].did,
        )
    # Signed by hand, past grant()'s checks: the verifier refuses it too.
    now = int(time.time())
    claims = capability_claims(
        issuer=keys["operator"].did,
        audience=keys["holder"].did,
        principal=keys["root"].did,
        jti="x" * 22,
        issued_at=now,
        not_before=now,
        expires=now + 60,
        abilities=[PAY],
        limits=Limits(5, None, 0, keys["other"].did),
        proofs=[parent.leaf.id],
    )
    compact = sign_compact(keys["operator"], {"typ": CAPABILITY_TYP}, claims)
    forged = parent.extend(Capability.parse(compact, index=1))
    with pytest.raises(AttenuationError, match="home"):
        Verifier().verify_chain(forged, now=now)


def test_a_child_may_name_a_home_when_its_parent_has_none(keys: dict[str, KeyHandle]) -> None:
    child = grant(
        keys["operator"],
        audience=keys["holder"].did,
        abilities=[PAY],
        ttl_seconds=60,
        uses=5,
        proof=_parent(keys, None),
        home=keys["home"].did,
    )
    assert child.leaf.limits.home == keys["home"].did


@pytest.mark.parametrize(
    "home", ["", "https://home.example", "did:key:zNotAKey", 7, "did:key:" + "z" * 300]
)
def test_a_malformed_home_is_refused(keys: dict[str, KeyHandle], home: object) -> None:
    with pytest.raises(FormatError, match="home"):
        Limits.from_json({"uses": 1, "rate": None, "depth": 0, "home": home})
    if isinstance(home, str):
        with pytest.raises(FormatError, match="home"):
            _parent(keys, home)


def test_unknown_limit_members_are_still_refused() -> None:
    with pytest.raises(FormatError, match="lim"):
        Limits.from_json({"uses": 1, "rate": None, "depth": 0, "colour": "red"})


def test_janus_grant_home_option(tmp_path: Path, keys: dict[str, KeyHandle]) -> None:
    soft = f"soft:dir={tmp_path / 'cli-keys'}"
    env = {**os.environ, "JANUS_PIN": "pw"}

    def janus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    made = janus("keys", "generate", f"{soft};object=root", "--alg", "EdDSA", "--allow-extractable")
    assert made.returncode == 0, made.stderr
    common = [
        "grant",
        "--issuer",
        f"{soft};object=root",
        "--to",
        keys["holder"].did,
        "--can",
        "sign/payment",
        "--with",
        "janus:payments/eur",
        "--ttl",
        "10m",
        "--uses",
        "3",
        "--json",
        "--allow-extractable",
        "--home",
    ]
    granted = janus(*common, keys["home"].did)
    assert granted.returncode == 0, granted.stderr
    bundle = Bundle.from_dict(json.loads(granted.stdout)["bundle"])
    assert bundle.leaf.limits.home == keys["home"].did
    assert not bundle.leaf.limits.fresh
    fresh = janus(*common, keys["home"].did, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    fresh_leaf = Bundle.from_dict(json.loads(fresh.stdout)["bundle"]).leaf
    assert fresh_leaf.limits.fresh and fresh_leaf.jws.payload["lim"]["fresh"] is True
    refused = janus(*common, "not-a-did")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "janus: error: 'lim.home' must be the did:key of a cloud-agent instance"
    ]
