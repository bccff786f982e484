"""The main job, ``make demo``: a narrated key-custody walk-through on a SoftHSM token.

Every step checks that what it claims actually happened; the demo exits non-zero as
soon as one does not.  It is idempotent: the token and the edge root key are created
on the first run and reused afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from hardware.softhsm import ensure_token
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle, SignatureFormat, raw_to_der
from janus_hsm.public_keys import from_did_key

ROOT_LABEL = "edge-root"
AGREEMENT_LABEL = "edge-agreement"


class DemoFailure(Exception):
    pass


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailure(what)
    print(f"    ok: {what}")


def get_or_generate(provider: object, label: str, alg: Algorithm) -> tuple[KeyHandle, bool]:
    from janus_hsm.backends.pkcs11 import Pkcs11Provider

    assert isinstance(provider, Pkcs11Provider)
    try:
        return provider.find(f"pkcs11:object={label}"), False
    except KeyNotFoundError:
        return provider.generate(f"pkcs11:object={label}", alg), True


def run(state_dir: Path) -> None:
    step(1, f"SoftHSM token in the project's own state directory ({state_dir})")
    token = ensure_token(state_dir, "janus")
    token.activate()  # before the PKCS#11 module is loaded: SoftHSM reads it once
    print(f"    token 'janus', config {token.conf_path}")
    print(f"    user PIN in {token.pin_file} (mode 0600); the URI points at it with pin-source")
    check(oct(token.pin_file.stat().st_mode & 0o777) == "0o600", "PIN file is 0600")

    from janus_hsm.backends.pkcs11 import Pkcs11Provider
    from janus_hsm.backends.pkcs11.export_probe import probe_export

    provider = Pkcs11Provider.open(token.uri())

    step(2, "Edge root key (ES256), generated inside the token")
    root, created = get_or_generate(provider, ROOT_LABEL, Algorithm.ES256)
    print(f"    {'generated' if created else 'found existing'} {root.uri}")
    props = root.properties
    for name, value in props.as_dict().items():
        if isinstance(value, bool):
            print(f"    {name:18} {value}")
    check(
        props.sensitive
        and not props.extractable
        and props.never_extractable
        and props.always_sensitive
        and props.local,
        "sensitive, never extractable, generated on the token",
    )

    step(3, "Identity: the root key's did:key")
    print(f"    {root.did}")
    check(from_did_key(root.did) == root.public_key(), "did:key decodes to the token's public key")

    step(4, "Sign inside the token, verify outside it with only the did:key")
    message = b"Janus demo: this statement was signed inside a SoftHSM token"
    signature = root.sign(message)
    print(f"    JOSE signature (r||s, {len(signature)} bytes): {signature.hex()[:48]}...")
    verifier = from_did_key(root.did)
    assert isinstance(verifier, ec.EllipticCurvePublicKey)
    verifier.verify(raw_to_der(signature, 32), message, ec.ECDSA(hashes.SHA256()))
    check(True, "signature verifies with cryptography, independently of the token")
    try:
        verifier.verify(raw_to_der(signature, 32), message + b"!", ec.ECDSA(hashes.SHA256()))
        tampered_ok = True
    except Exception:
        tampered_ok = False
    check(not tampered_ok, "a tampered message does not verify")
    der = root.sign(message, format=SignatureFormat.DER)
    verifier.verify(der, message, ec.ECDSA(hashes.SHA256()))
    check(True, "DER-format signature verifies too")

    step(5, "Key agreement inside the token (X25519), equal to software ECDH")
    agreement, created = get_or_generate(provider, AGREEMENT_LABEL, Algorithm.X25519)
    print(f"    {'generated' if created else 'found existing'} {agreement.uri}")
    peer = x25519.X25519PrivateKey.generate()
    inside = agreement.exchange(peer.public_key())
    outside = peer.exchange(agreement.public_key())  # type: ignore[arg-type]
    check(inside == outside, "ECDH in the token == ECDH in software")

    step(6, "Every export attempt is refused (made for real, with the PIN)")
    attempts = probe_export(root)  # type: ignore[arg-type]
    for attempt in attempts:
        verdict = "refused" if attempt.refused else "ALLOWED"
        print(f"    {attempt.route:42} {verdict} ({attempt.detail})")
    check(all(a.refused for a in attempts), f"all {len(attempts)} export routes refused")

    print("\nDone: the edge root key signs and agrees keys, and cannot leave the token.")
    print(f"Try: SOFTHSM2_CONF={token.conf_path} .venv/bin/janus keys list '{token.uri()}'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", default=".state/demo", type=Path)
    args = parser.parse_args(argv)
    try:
        run(args.state_dir)
    except DemoFailure as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
