"""Interop with OpenSC's pkcs11-tool on the same SoftHSM token, through RFC 7512 URIs.

pkcs11-tool reads the PIN from an environment variable (``--pin env:VAR``), so no PIN
appears on any command line here either.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hardware.softhsm import SoftHSMToken
from janus_hsm import open_key, open_provider
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import SignatureFormat

pytestmark = pytest.mark.skipif(
    shutil.which("pkcs11-tool") is None, reason="OpenSC's pkcs11-tool is not installed"
)


def pkcs11_tool(token: SoftHSMToken, *args: str) -> str:
    env = {**token.environ(), "JANUS_TEST_PIN": token.pin_file.read_text().strip()}
    result = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            token.module_path,
            "--token-label",
            token.label,
            "--login",
            "--pin",
            "env:JANUS_TEST_PIN",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects_by_label(listing: str) -> dict[str, list[str]]:
    """pkcs11-tool's listing: an unindented header per object, then indented lines."""
    blocks: list[list[str]] = []
    for line in listing.splitlines():
        if not line.startswith(" "):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line.strip())
    labelled = {}
    for block in blocks:
        for line in block:
            if line.startswith("label:"):
                labelled[line.split(":", 1)[1].strip()] = block
    return labelled


def test_key_made_by_pkcs11_tool_is_usable_through_its_uri(interop_token: SoftHSMToken) -> None:
    pkcs11_tool(
        interop_token,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "made-by-opensc",
        "--id",
        "c0ffee",
        "--usage-sign",
        "--usage-derive",
    )
    handle = open_key(interop_token.uri(object="made-by-opensc"))
    assert handle.algorithm is Algorithm.ES256
    assert handle.key_id == bytes.fromhex("c0ffee")
    assert handle.properties.custody_grade
    message = b"interop"
    signature = handle.sign(message, format=SignatureFormat.DER)
    public = handle.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(Algorithm.ES256.hash_algorithm))
    peer = ec.generate_private_key(ec.SECP256R1())
    assert handle.exchange(peer.public_key()) == peer.exchange(ec.ECDH(), public)
    # The same key by id only, as RFC 7512 allows.
    by_id = open_provider(interop_token.uri()).find("pkcs11:id=%C0%FF%EE")
    assert by_id.public_key() == public


@pytest.mark.parametrize("alg", [Algorithm.ES256, Algorithm.EdDSA])
def test_key_made_by_janus_shows_in_pkcs11_tool_as_locked_in(
    interop_token: SoftHSMToken, alg: Algorithm
) -> None:
    label = f"made-by-janus-{alg.value.lower()}"
    provider = open_provider(interop_token.uri())
    provider.generate(f"pkcs11:object={label}", alg)
    listing = pkcs11_tool(interop_token, "--list-objects", "--type", "privkey")
    block = objects_by_label(listing)[label]
    access = next(line for line in block if line.startswith("Access:"))
    assert "never extractable" in access
    assert "always sensitive" in access
    assert "sensitive" in access
    assert "local" in access
    assert "extractable" not in access.replace("never extractable", "")
