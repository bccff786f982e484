"""``invoke_local``: an invocation signed in this process and verified without re-parsing.

The shortcut must change nothing but the cost: the same checks of the claims, the same
text as ``invoke`` would give, and no way for outside input (text) to carry the flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.abilities import Ability
from policies.capability import Bundle
from policies.errors import (
    CaveatFailedError,
    FormatError,
    SignatureInvalidError,
    VerificationError,
)
from policies.invocation import Invocation, invoke_local, request_digest
from policies.issue import grant
from policies.jws import sha256_b64
from policies.verify import Verifier
from tests.policies.keys import software_keys

NOW = 1_800_000_000
PAY = Ability("janus:payments/eur", "sign/payment", ({"field": "amount", "le": 10000},))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyHandle]:
    return software_keys(
        Path(tmp_path_factory.mktemp("keys")), {"owner": Algorithm.ES256, "cloud": Algorithm.EdDSA}
    )


def pay_locally(holder: KeyHandle, bundle: Bundle, request: Mapping[str, Any]) -> Invocation:
    return invoke_local(
        holder,
        capability_id=bundle.leaf.id,
        action="sign/payment",
        resource="janus:payments/eur",
        request=request,
        now=NOW,
    )


def test_local_invocation_verifies_like_its_text(keys: dict[str, KeyHandle]) -> None:
    owner, cloud = keys["owner"], keys["cloud"]
    bundle = grant(owner, audience=cloud.did, abilities=[PAY], ttl_seconds=600, uses=5, now=NOW)
    request = {"amount": 5}
    local = pay_locally(cloud, bundle, request)
    parsed = Invocation.parse(local.compact)
    assert local.signed_locally and not parsed.signed_locally
    assert local == parsed  # the same claims as the text carries
    verifier = Verifier()
    for inv in (local, parsed, local.compact):
        assert verifier.verify(bundle, inv, request, now=NOW).invocation == parsed
    too_much = pay_locally(cloud, bundle, {"amount": 50_000})
    with pytest.raises(CaveatFailedError):  # the caveats are still checked
        verifier.verify(bundle, too_much, {"amount": 50_000}, now=NOW)
    with pytest.raises(VerificationError, match="digest"):  # and the request
        verifier.verify(bundle, local, {"amount": 6}, now=NOW)


def test_text_never_skips_the_signature(keys: dict[str, KeyHandle]) -> None:
    owner, cloud = keys["owner"], keys["cloud"]
    bundle = grant(owner, audience=cloud.did, abilities=[PAY], ttl_seconds=600, uses=5, now=NOW)
    local = invoke_local(
        cloud,
        capability_id=bundle.leaf.id,
        action="sign/payment",
        resource="janus:payments/eur",
        request={"amount": 5},
        now=NOW,
    )
    head, body, _ = local.compact.split(".")
    forged = f"{head}.{body}.{b64url_encode(bytes(64))}"
    with pytest.raises(SignatureInvalidError):
        Verifier().verify(bundle, forged, {"amount": 5}, now=NOW)
    # Even a parsed invocation copied with the flag is only as good as in-process code.
    assert not dataclasses.replace(Invocation.parse(forged)).signed_locally


def test_local_invocation_checks_claims_as_parse_does(keys: dict[str, KeyHandle]) -> None:
    with pytest.raises(FormatError, match="'with'"):
        invoke_local(
            keys["cloud"],
            capability_id="x" * 43,
            action="sign/payment",
            resource="r" * 513,
            request={},
            now=NOW,
        )


def test_signed_locally_cannot_be_passed_to_the_constructor() -> None:
    # Only invoke_local may mark an invocation: no caller can build one that skips the
    # signature check by passing the flag.
    with pytest.raises(TypeError):
        Invocation(  # type: ignore[call-arg]
            jws=None,  # type: ignore[arg-type]
            holder="h",
            capability_id="c",
            action="a",
            resource="r",
            digest="d",
            nonce="n" * 16,
            issued_at=1,
            expires=2,
            signed_locally=True,
        )


def test_the_request_is_checked_once_and_only_its_own_copy_skips_the_check(
    keys: dict[str, KeyHandle],
) -> None:
    owner, cloud = keys["owner"], keys["cloud"]
    bundle = grant(owner, audience=cloud.did, abilities=[PAY], ttl_seconds=600, uses=5, now=NOW)

    def local(request: dict[str, object]) -> Invocation:
        return pay_locally(cloud, bundle, request)

    # A request the verifier would refuse is refused when signing, the same way.
    with pytest.raises(VerificationError, match="request refused"):
        local({"amount": 5.5})
    request = {"amount": 5, "memo": "é"}
    inv = local(request)
    signed = inv.signed_request
    assert signed is not None and signed.value == request and signed.value is not request
    assert inv.digest == request_digest(request) == sha256_b64(signed.canonical)
    verifier = Verifier()
    # Its own copy, an equal dict, and the caller's original all verify ...
    for given in (signed.value, dict(request), request):
        assert verifier.verify(bundle, inv, given, now=NOW).request == request
    # ... but anything else is checked in full, never waved through by the flag.
    with pytest.raises(VerificationError, match="digest"):
        verifier.verify(bundle, inv, {"amount": 6, "memo": "é"}, now=NOW)
    with pytest.raises(VerificationError, match="request refused"):
        verifier.verify(bundle, inv, {"amount": 5.0, "memo": "é"}, now=NOW)
    parsed = Invocation.parse(inv.compact)
    assert parsed.signed_request is None
    assert dataclasses.replace(inv).signed_request is None
