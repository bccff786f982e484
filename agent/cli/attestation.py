"""Hardware attestation options shared by the grant and verify commands.

Issuers attach their root key's attestation (``--attach-attestation``) to a root
capability; verifiers insist on it (``--require-attestation``), trusting Yubico's
published PIV roots, ``JANUS_PIV_ATTESTATION_ROOTS`` and every ``--trust-root``.
Attaching is opt-in because the attestation certificate names the device's serial
number, which every verifier of the chain then learns.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.output import CommandError
from janus_hsm.provider import KeyHandle


def add_attach_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attach-attestation",
        action="store_true",
        help="carry the root key's hardware attestation (a YubiKey's PIV chain) in the "
        "root capability, so verifiers can require it; reveals the device serial",
    )


def add_require_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--require-attestation",
        action="store_true",
        help="valid only if the root capability carries an attestation, verifying to a "
        "trusted root, that its issuer key was generated in hardware",
    )
    p.add_argument(
        "--trust-root",
        action="append",
        metavar="FILE",
        help="PEM file of an extra attestation root to trust (repeatable); Yubico's PIV "
        "roots are always trusted",
    )


def attestation_evidence(args: argparse.Namespace, issuer: KeyHandle) -> dict[str, Any]:
    """The ``evd`` members for a root capability signed by ``issuer`` ({} without the flag)."""
    if not args.attach_attestation:
        return {}
    from policies.attestation import attestation_evidence as evidence_for

    return evidence_for(issuer.attest())


def verifier_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Verifier`` keyword arguments for --require-attestation / --trust-root."""
    if not args.require_attestation:
        if args.trust_root:
            raise CommandError("--trust-root applies with --require-attestation")
        return {}
    from janus_hsm import attestation

    roots = attestation.default_roots()
    for path in args.trust_root or []:
        roots.extend(attestation.load_certificate_file(path))
    return {"require_attestation": True, "attestation_roots": roots}
