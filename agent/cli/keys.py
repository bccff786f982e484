"""``janus keys …``: generate, show, list, sign with, delete and certify hardware keys."""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    emit_written,
    print_json,
    read_input,
    touch_prompt,
    write_output,
)
from janus_hsm import open_provider
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import SubjectError
from janus_hsm.provider import KeyHandle, SignatureFormat
from janus_hsm.public_keys import b64url_encode
from janus_hsm.x509_names import parse_subject


def describe(handle: KeyHandle) -> dict[str, Any]:
    """The ``keys show`` object: a stable contract for scripts (see docs/cli.md)."""
    props = handle.properties
    info: dict[str, Any] = {
        "uri": handle.uri,
        "alg": props.algorithm.value,
        "did": handle.did,
        "jwk": handle.jwk(),
        "backend": props.backend,
        "custody_grade": props.custody_grade,
        "properties": {
            "sensitive": props.sensitive,
            "extractable": props.extractable,
            "always_sensitive": props.always_sensitive,
            "never_extractable": props.never_extractable,
            "local": props.local,
        },
    }
    if props.pin_policy is not None or props.touch_policy is not None:
        info["policies"] = {"pin": props.pin_policy, "touch": props.touch_policy}
    return info


def _print_human(info: dict[str, Any]) -> None:
    props = info["properties"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in props.items())
    print(info["uri"])
    print(f"  alg:        {info['alg']}")
    print(f"  did:        {info['did']}")
    print(f"  kid:        {info['jwk']['kid']}")
    print(f"  properties: {flags}")
    if "policies" in info:
        print(f"  policies:   PIN {info['policies']['pin']}, touch {info['policies']['touch']}")
    if not info["custody_grade"]:
        print("  WARNING:    this private key is or was extractable; it is refused for use")


def _provider(args: argparse.Namespace) -> Any:
    return open_provider(args.uri, allow_extractable=args.allow_extractable, on_touch=touch_prompt)


def _warn_default_management_key(provider: Any) -> list[str]:
    """A PIV card still on its factory management key: say so on stderr (and in JSON)."""
    if getattr(provider, "default_management_key", None) is not True:
        return []
    warning = (
        "this card uses the FACTORY DEFAULT PIV management key: anyone holding it can "
        "replace its keys. Change it: ykman piv access change-management-key --generate --protect"
    )
    print(f"WARNING: {warning}", file=sys.stderr)
    return [warning]


def _generate_options(args: argparse.Namespace) -> dict[str, Any]:
    """--pin-policy / --touch-policy, which only PIV slots have."""
    if args.pin_policy is None and args.touch_policy is None:
        return {}
    if not args.uri.lower().startswith("piv:"):
        raise CommandError("--pin-policy and --touch-policy apply to piv: keys only")
    from janus_hsm.backends.piv.slots import parse_pin_policy, parse_touch_policy

    options: dict[str, Any] = {}
    try:
        if args.pin_policy is not None:
            options["pin_policy"] = parse_pin_policy(args.pin_policy)
        if args.touch_policy is not None:
            options["touch_policy"] = parse_touch_policy(args.touch_policy)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return options


def _keystore_credentials(args: argparse.Namespace, labels: list[str]) -> list[Any]:
    """The registered keystore credentials named by label (see ``janus fido2 register``)."""
    if not args.uri.lower().startswith("soft:"):
        raise CommandError("FIDO2 protection applies to soft: keystore keys only")
    from pathlib import Path

    from janus_hsm.fido2.registry import CredentialRegistry, default_directory

    directory = Path(args.registry_dir) if args.registry_dir else default_directory()
    registry = CredentialRegistry.load(directory / "credentials.json")
    chosen = []
    for label in labels:
        credential = registry.get(label)
        if credential is None:
            known = ", ".join(c.label for c in registry.credentials) or "none"
            raise CommandError(
                f"no keystore credential {label!r} is registered (registered: {known}); "
                "register one with: janus fido2 register NAME --purpose keystore"
            )
        chosen.append(credential.recipient)
    return chosen


def _fido2_sealing_provider(args: argparse.Namespace) -> Any:
    """A keystore whose new keys are sealed for the --fido2-credential security keys."""
    from janus_hsm.backends.software import SoftwareProvider
    from janus_hsm.fido2.keystore import Fido2HmacSecret, keystore_pin_source

    recipients = _keystore_credentials(args, args.fido2_credential)
    # One PIN source for the whole operation: each security key is asked for its own PIN
    # (a prompt naming it), and JANUS_FIDO2_PIN is refused for more than one key.
    source = Fido2HmacSecret(recipients, pin=keystore_pin_source(), on_touch=touch_prompt)
    source.check_pin_targets([[r] for r in recipients], doing="sealing the key")
    return SoftwareProvider.open(
        args.uri, allow_extractable=args.allow_extractable, hmac_secret=source
    )


def cmd_generate(args: argparse.Namespace) -> int:
    algorithm = _algorithm(args.alg)
    options = _generate_options(args)
    opener = _fido2_sealing_provider if args.fido2_credential else _provider
    with opener(args) as provider:
        handle = provider.generate(args.uri, algorithm, **options)
        info = describe(handle)
        warnings = _warn_default_management_key(provider)
    if warnings:
        info["warnings"] = warnings
    if args.json:
        print_json(info)
    else:
        where = "inside the device" if info["backend"] != "software" else "in the keystore"
        print(f"generated {algorithm.value} key {where}")
        _print_human(info)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _provider(args) as provider:
        info = describe(provider.lookup(args.uri))
    if args.json:
        print_json(info)
    else:
        _print_human(info)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _provider(args) as provider:
        infos = [describe(h) for h in provider.list_keys()]
    if args.json:
        print_json(infos)
    else:
        if not infos:
            print("no keys")
        for info in infos:
            _print_human(info)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    data = read_input(args.input)
    fmt = SignatureFormat(args.format)
    with _provider(args) as provider:
        handle = provider.find(args.uri)
        signature = handle.sign(data, format=fmt)
        uri, alg = handle.uri, handle.algorithm.value
    if args.out:
        write_output(args.out, signature)
    if args.json:
        result = {
            "uri": uri,
            "alg": alg,
            "format": fmt.value,
            "signature": b64url_encode(signature),
        }
        if args.out:
            result["out"] = args.out
        print_json(result)
    elif not args.out:
        print(b64url_encode(signature))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _provider(args) as provider:
        handle = provider.lookup(args.uri)
        uri = handle.uri
        if sys.stdin.isatty() and not args.yes and not args.json:
            answer = input(f"Destroy {uri} for good? Type 'yes': ")
            if answer.strip() != "yes":
                raise CommandError("not confirmed; nothing was deleted")
        provider.delete(args.uri)
        _warn_default_management_key(provider)
    if args.json:
        print_json({"deleted": uri})
    else:
        print(f"deleted {uri}")
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Enrol or drop security keys of a FIDO2-protected key: the lost-key recovery."""
    if not args.add and not args.remove:
        raise CommandError("give --add LABEL and/or --remove LABEL")
    add = _keystore_credentials(args, args.add or [])
    with _provider(args) as provider:
        # Labels to drop are looked up in the key file: a lost key may be unregistered.
        sealed_for = {r.label: r.credential_id for r in provider.fido2_credentials(args.uri)}
        unknown = [label for label in args.remove or [] if label not in sealed_for]
        if unknown:
            raise CommandError(
                f"{args.uri} is not sealed for {', '.join(map(repr, unknown))} (it is for: "
                f"{', '.join(map(repr, sealed_for)) or 'no FIDO2 credential'})"
            )
        remove = [sealed_for[label] for label in args.remove or []]
        _check_rewrap_pins(provider.fido2_credentials(args.uri), add)
        handle = provider.rewrap(args.uri, add=add, remove=remove)
        info = describe(handle)
    if args.json:
        print_json(info)
    else:
        print(f"rewrapped {info['uri']}")
        _print_human(info)
    return 0


def _check_rewrap_pins(current: list[Any], add: list[Any]) -> None:
    """Rewrapping opens the key with one enrolled security key and asks each added one:
    refuse JANUS_FIDO2_PIN when that is more than one key needing the PIN (a wrong PIN
    burns the other key's retries)."""
    from janus_hsm.fido2.keystore import Fido2HmacSecret, keystore_pin_source

    checker = Fido2HmacSecret((), pin=keystore_pin_source())
    checker.check_pin_targets([current, *([r] for r in add)], doing="rewrapping the key")


def _name(subject: str) -> x509.Name:
    """The --subject name, checked before the device is opened (no PIN for a typo)."""
    try:
        return parse_subject(subject)
    except SubjectError as exc:
        raise SubjectError(f"--subject: {exc}") from None


def _signing_hash(handle: KeyHandle) -> hashes.HashAlgorithm | None:
    return handle.algorithm.hash_algorithm  # None for Ed25519, as the builders require


def cmd_csr(args: argparse.Namespace) -> int:
    subject = _name(args.subject)
    with _provider(args) as provider:
        handle = provider.find(args.uri)
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        csr = builder.sign(handle.as_cryptography_key(), _signing_hash(handle))  # type: ignore[arg-type]
    pem = csr.public_bytes(serialization.Encoding.PEM)
    return _emit_pem(args, pem, "csr")


def cmd_cert(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= 36500:
        raise CommandError("--days must be between 1 and 36500")
    name = _name(args.subject)
    with _provider(args) as provider:
        handle = provider.find(args.uri)
        key = handle.as_cryptography_key()
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=args.days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, _signing_hash(handle))  # type: ignore[arg-type]
        )
    return _emit_pem(args, cert.public_bytes(serialization.Encoding.PEM), "certificate")


def _emit_pem(args: argparse.Namespace, pem: bytes, field: str) -> int:
    result = {field: pem.decode("ascii"), **({"out": args.out} if args.out else {})}
    return emit_written(args.out, pem, result, as_json=args.json)


def cmd_attest(args: argparse.Namespace) -> int:
    with _provider(args) as provider:
        handle = provider.lookup(args.uri)
        attestation = handle.attest()
        public_key = handle.public_key()
    verification = _verify_attestation(args, attestation, public_key)
    result = {
        "uri": handle.uri,
        "format": attestation.format,
        "generated_on_device": attestation.generated_on_device,
        "certificates": [
            c.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for c in attestation.certificates
        ],
        "details": attestation.details,
    }
    text = (
        f"{handle.uri}: {attestation.format}, generated on device: "
        f"{'yes' if attestation.generated_on_device else 'no'}"
    )
    if verification is not None:
        result["verification"] = verification
        if verification["verified"]:
            text += f"\n  verified: chains to {verification['root']}"
        else:
            text += f"\n  NOT VERIFIED: {verification['message']}"
    emit(result, text, as_json=args.json)
    return 0 if verification is None or verification["verified"] else 1


def _verify_attestation(
    args: argparse.Namespace, attestation: Any, public_key: Any
) -> dict[str, Any] | None:
    """Check a YubiKey PIV chain against Yubico's roots, JANUS_PIV_ATTESTATION_ROOTS and
    every --trust-root; None for formats Janus cannot verify here."""
    from janus_hsm import attestation as piv_attestation
    from janus_hsm.errors import AttestationError

    if attestation.format != piv_attestation.FORMAT:
        return None
    roots = piv_attestation.default_roots()
    for path in args.trust_root or []:
        roots.extend(piv_attestation.load_certificate_file(path))
    try:
        verified = piv_attestation.verify_piv_attestation(
            attestation.certificates, roots=roots, expected_public_key=public_key
        )
    except AttestationError as exc:
        return {"verified": False, "error": exc.code, "message": str(exc)}
    return verified.as_dict()


def _algorithm(name: str) -> Algorithm:
    try:
        return Algorithm.parse(name)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def register(commands: Any) -> None:
    common = common_options(
        allow_extractable="accept a private key that is or was extractable (not fit for custody)"
    )

    keys = commands.add_parser("keys", help="manage keys in hardware and keystores")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def add(name: str, handler: Any, help_text: str, uri_help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help_text)
        p.add_argument("uri", metavar="URI", help=uri_help)
        p.set_defaults(handler=handler)
        return p

    key_uri = "key URI, e.g. pkcs11:token=janus;object=edge-root or piv:serial=12345678;slot=9c"
    p = add("generate", cmd_generate, "generate a key pair inside the device", key_uri)
    p.add_argument("--alg", required=True, metavar="ALG", help="ES256 | ES384 | EdDSA | X25519")
    p.add_argument(
        "--pin-policy",
        metavar="POLICY",
        help="piv: only: default | never | once | always (when the card asks for the PIN)",
    )
    p.add_argument(
        "--touch-policy",
        metavar="POLICY",
        help="piv: only: default | never | always | cached (when the card wants a touch)",
    )
    p.add_argument(
        "--fido2-credential",
        action="append",
        metavar="LABEL",
        help="soft: only: seal the key for this registered FIDO2 keystore credential "
        "(repeatable; any one opens it; every one must be connected now)",
    )
    p.add_argument("--registry-dir", metavar="DIR", help="default: <data dir>/janus/fido2")
    add("show", cmd_show, "show a key's public key, did:key and properties", key_uri)
    p = add(
        "rewrap",
        cmd_rewrap,
        "enrol (--add) or drop (--remove) security keys of a FIDO2-protected soft: key",
        "soft: key URI",
    )
    p.add_argument("--add", action="append", metavar="LABEL", help="registered credential")
    p.add_argument("--remove", action="append", metavar="LABEL", help="registered credential")
    p.add_argument("--registry-dir", metavar="DIR", help="default: <data dir>/janus/fido2")
    add(
        "list",
        cmd_list,
        "list the keys of a token or keystore",
        "token URI, e.g. pkcs11:token=janus",
    )
    p = add("sign", cmd_sign, "sign a file (ECDSA over its SHA-256/384; Ed25519 over it)", key_uri)
    p.add_argument("--in", dest="input", required=True, metavar="FILE", help="file, or -")
    p.add_argument(
        "--format",
        choices=["raw", "der"],
        default="raw",
        help="raw (JOSE r||s, default) or der (X.509 style ECDSA)",
    )
    p.add_argument("--out", metavar="FILE", help="write the signature bytes here")
    p = add("delete", cmd_delete, "destroy a key pair", key_uri)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = add("csr", cmd_csr, "make a PKCS#10 certificate request signed inside the device", key_uri)
    p.add_argument("--subject", required=True, help="RFC 4514 name, e.g. 'CN=edge-root'")
    p.add_argument("--out", metavar="FILE", help="write the PEM here")
    p = add("cert", cmd_cert, "make a self-signed certificate signed inside the device", key_uri)
    p.add_argument("--subject", required=True, help="RFC 4514 name, e.g. 'CN=edge-root'")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--out", metavar="FILE", help="write the PEM here")
    p = add("attest", cmd_attest, "show evidence that the key was generated in hardware", key_uri)
    p.add_argument(
        "--trust-root",
        action="append",
        metavar="FILE",
        help="PEM file of an extra attestation root to trust (repeatable); Yubico's PIV "
        "roots are always trusted. Exit status 1 when the chain does not verify",
    )
