"""The `janus` CLI as a subprocess on a virtual YubiKey in a real PC/SC reader.

Why this tier: ``tests/janus_hsm/test_piv_cli.py`` runs the CLI in process with PC/SC
discovery replaced.  Here nothing is replaced: the card sits in a vpcd reader of the
session's private pcscd (``tests/pcsc.py``), and each ``janus`` child process finds it
the way it finds a YubiKey, through pyscard and ``ykman.pcsc`` (the child inherits
``PCSCLITE_CSOCK_NAME`` from this process, so it talks to the private daemon, never to
the machine's own).  The card's applet lives in this process, so the test can look at
what the card saw (touch requests) and at its attestation root.

PINs never go on a command line: the URIs name a 0600 file (``pin-source=file:``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hardware.card import VirtualCard
from hardware.virtual_piv import Presence, TouchRequest, VirtualPivApplet, VirtualYubiKey
from janus_hsm.backends.piv.uri import PivUri, parse_slot
from janus_hsm.public_keys import from_did_key

SERIAL = 24681357
PIN = "123456"  # the virtual card's factory PIN: a throwaway card
WRONG_PIN = "87654321"
PlugCard = Callable[..., str]


def _secret_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def janus(*args: str, expect: int = 0) -> tuple[Any, str]:
    """Run ``python -m agent ARGS --json``; return (parsed stdout, stderr)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JANUS_PIN", "JANUS_PIV_MANAGEMENT_KEY", "JANUS_PIV_ATTESTATION_ROOTS")
    }
    result = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    return (json.loads(result.stdout) if result.stdout.strip() else None), result.stderr


def test_keys_edge_and_didcomm_through_pcscd(pcsc_reader: PlugCard, tmp_path: Path) -> None:
    started = time.monotonic()
    touches: list[TouchRequest] = []

    def touch(request: TouchRequest) -> Presence:
        touches.append(request)
        return Presence.APPROVE

    key = VirtualYubiKey(piv=VirtualPivApplet(serial=SERIAL, touch=touch))
    reader = pcsc_reader(key.card, 0)
    # A blank card next door: discovery must skip a card without PIV (and an empty
    # reader would cost ykman seconds of retries in every child process).
    pcsc_reader(VirtualCard([]), 1)
    assert reader.endswith("00 00")

    pin_file = _secret_file(tmp_path / "pin", PIN)
    wrong_pin_file = _secret_file(tmp_path / "wrong-pin", WRONG_PIN)

    def uri(slot: str | None = None, pin: Path = pin_file) -> str:
        return str(
            PivUri(
                serial=SERIAL,
                slot=parse_slot(slot) if slot else None,
                pin_source=f"file:{pin}",
            )
        )

    root_uri = f"piv:serial={SERIAL};slot=9c"

    # --- keys generate / list / show --------------------------------------------------
    made, err = janus("keys", "generate", uri("9c"), "--alg", "ES256")
    assert made["uri"] == root_uri and made["custody_grade"] is True
    assert made["policies"] == {"pin": "always", "touch": "never"}  # 9c's defaults
    assert "FACTORY DEFAULT" in err and "FACTORY DEFAULT" in made["warnings"][0]
    listed, _ = janus("keys", "list", f"piv:serial={SERIAL}")
    assert [k["uri"] for k in listed] == [root_uri]
    shown, _ = janus("keys", "show", uri("9c"))
    assert shown["did"] == made["did"] and shown["jwk"] == made["jwk"]
    public_key = from_did_key(made["did"])
    assert isinstance(public_key, ec.EllipticCurvePublicKey)

    # --- sign, verified independently -------------------------------------------------
    data = tmp_path / "data"
    data.write_bytes(b"pay 10 EUR to bob")
    signed, _ = janus("keys", "sign", uri("9c"), "--in", str(data))
    assert signed["alg"] == "ES256"
    raw = _b64url(signed["signature"])
    der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    public_key.verify(der, data.read_bytes(), ec.ECDSA(hashes.SHA256()))

    # --- attestation: untrusted without the virtual root, verified with it ------------
    untrusted, _ = janus("keys", "attest", uri("9c"), expect=1)
    assert untrusted["verification"]["verified"] is False
    assert untrusted["verification"]["error"] == "attestation_untrusted"
    root_pem = tmp_path / "virtual-root.pem"
    root_pem.write_bytes(
        key.piv.attestation_root_certificate.public_bytes(serialization.Encoding.PEM)
    )
    attested, _ = janus("keys", "attest", uri("9c"), "--trust-root", str(root_pem))
    assert attested["verification"]["verified"] is True
    assert attested["verification"]["serial"] == SERIAL
    assert attested["details"]["pin_policy"] == "always"

    # --- a wrong PIN is a typed error, not a signature --------------------------------
    refused, err = janus("keys", "sign", uri("9c", wrong_pin_file), "--in", str(data), expect=1)
    assert refused["error"]["code"] == "pin_incorrect"
    assert "signature" not in refused and "janus: error:" in err

    # --- edge init on the card: 9c is taken, so only --reuse-existing adopts it -------
    state = str(tmp_path / "edge")
    conflict, err = janus("edge", "init", "--state-dir", state, "--token", uri(), expect=1)
    assert conflict["error"]["code"] == "conflict" and "--reuse-existing" in err
    assert not (tmp_path / "edge" / "edge.toml").exists()
    edge, err = janus("edge", "init", "--state-dir", state, "--token", uri(), "--reuse-existing")
    assert edge["created"] is True  # the agreement key in 9d is new
    assert "FACTORY DEFAULT" in edge["warnings"][0] and "FACTORY DEFAULT" in err
    assert edge["did"] == made["did"]
    assert edge["root"] == root_uri and edge["agreement"] == f"piv:serial={SERIAL};slot=9d"
    document, _ = janus("edge", "did", "--state-dir", state)
    assert document["id"] == made["did"]
    [agreement_kid] = document["keyAgreement"]
    assert agreement_kid.startswith("did:key:z6LS")  # X25519 on firmware 5.7
    slots, _ = janus("keys", "list", f"piv:serial={SERIAL}")
    assert {k["uri"]: k["alg"] for k in slots} == {
        root_uri: "ES256",
        f"piv:serial={SERIAL};slot=9d": "X25519",
    }

    # --- DIDComm: pack to the edge's agreement key, unpack by ECDH on the card --------
    plaintext = tmp_path / "message.json"
    plaintext.write_text(
        json.dumps({"id": "m1", "type": "https://janus.dev/messages/1.0/note", "body": {"n": 7}})
    )
    envelope_file = tmp_path / "envelope.json"
    packed, _ = janus(
        "msg", "pack", "--to", agreement_kid, "--in", str(plaintext), "--out", str(envelope_file)
    )
    assert packed["recipients"] == [agreement_kid]
    opened, _ = janus("msg", "unpack", "--key", uri("9d"), "--in", str(envelope_file))
    assert opened["message"]["body"] == {"n": 7}
    assert opened["metadata"]["encrypted"] is True

    # --- touch-policy always: the prompt comes first, and the card asked for a touch --
    janus("keys", "generate", uri("9a"), "--alg", "ES256", "--touch-policy", "always")
    before = len(touches)
    signed, err = janus("keys", "sign", uri("9a"), "--in", str(data))
    assert "touch your yubikey" in err.lower()
    assert len(touches) == before + 1
    verifier = from_did_key(janus("keys", "show", uri("9a"))[0]["did"])
    assert isinstance(verifier, ec.EllipticCurvePublicKey)
    raw = _b64url(signed["signature"])
    verifier.verify(
        encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:])),
        data.read_bytes(),
        ec.ECDSA(hashes.SHA256()),
    )
    print(f"subprocess tier: {time.monotonic() - started:.1f} s")


def _b64url(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children get PINs from the URIs' files only, never from this process's env."""
    monkeypatch.delenv("JANUS_PIN", raising=False)
