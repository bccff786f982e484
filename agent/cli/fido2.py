"""``janus fido2 list | register | remove | approve``, and collecting approvals for grants.

Security keys are found over USB HID and PC/SC (janus_hsm.fido2.devices).  Approvers go
into the approver registry that grants are verified against (policies.approvals);
keystore credentials into the keystore credential registry (janus_hsm.fido2.registry).
Both live in ``--registry-dir`` (default: the platform data dir ``janus/fido2``).
PINs come from ``--pin-source`` or ``JANUS_FIDO2_PIN`` (one security key only) or a
prompt per key naming it, never from argv and never from ``JANUS_PIN`` (the keystore
passphrase or PIV PIN of ``janus grant``): see janus_hsm.fido2.pins.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    print_json,
    read_input,
    write_output,
)
from janus_hsm.backends.software.keyfile import HmacSecretRecipient
from janus_hsm.fido2.devices import list_devices, require_real_device, select_device
from janus_hsm.fido2.errors import Fido2Error, UnknownCredentialError
from janus_hsm.fido2.pins import DevicePins
from janus_hsm.fido2.registry import (
    KEYSTORE_RP_ID,
    CredentialRegistry,
    KeystoreCredential,
    default_directory,
)
from janus_hsm.public_keys import b64url_encode
from policies.approval_collection import (
    APPROVAL_RP_ID,
    APPROVERS_FILE,
    CREDENTIALS_FILE,
    ApprovalSources,
    approval_request,
    load_approvers,
    open_authenticator,
    registry_lock,
    save_approvers,
)
from policies.approval_requests import ApprovalRequest, approval_file
from policies.approvals import ApprovalRequestError, Approver, request_approval
from policies.issue import GrantDraft
from policies.policy import APPROVAL


class MalformedRequestError(CommandError):
    """An approval request whose claims cannot be shown faithfully: nothing is approved."""

    code = "malformed_request"


class DeclaredApprovalError(CommandError):
    """``--satisfied approval``: a caller cannot declare approvals it does not have."""

    code = "approval_not_declarable"


if TYPE_CHECKING:
    from janus_hsm.fido2.authenticator import Authenticator


def registry_dir(args: argparse.Namespace) -> Path:
    return Path(args.registry_dir) if getattr(args, "registry_dir", None) else default_directory()


def approvers_path(args: argparse.Namespace) -> Path:
    if getattr(args, "approvers", None):
        return Path(args.approvers)
    return registry_dir(args) / APPROVERS_FILE


def _pin(args: argparse.Namespace) -> DevicePins:
    """Each security key's own PIN: --pin-source or JANUS_FIDO2_PIN for one key, else a
    prompt per key.  Never JANUS_PIN (the issuer's PIN or passphrase in `janus grant`)."""
    return DevicePins(getattr(args, "pin_source", None))


def _say(message: str) -> None:
    print(f"janus: {message}", file=sys.stderr, flush=True)


def _authenticator(args: argparse.Namespace, doing: str) -> Authenticator:
    chosen = select_device(list_devices(), getattr(args, "device", None))
    require_real_device(chosen, doing)
    return open_authenticator(chosen, pin=_pin(args), on_touch=_say)


# ------------------------------------------------------------------ janus fido2 list


def cmd_list(args: argparse.Namespace) -> int:
    approvers = load_approvers(approvers_path(args))
    keystore = CredentialRegistry.load(registry_dir(args) / CREDENTIALS_FILE)
    registered: list[dict[str, Any]] = [
        {
            "purpose": "approval",
            "name": a.id,
            "rp_id": a.rp_id,
            "credential_id": b64url_encode(a.credential_id),
        }
        for a in approvers
    ] + [
        {
            "purpose": "keystore",
            "name": c.label,
            "rp_id": c.recipient.rp_id,
            "credential_id": b64url_encode(c.recipient.credential_id),
            "uv": c.recipient.uv,
            "aaguid": c.aaguid,
            "created": c.created,
        }
        for c in keystore.credentials
    ]
    devices = []
    for device in list_devices():
        try:
            auth = open_authenticator(device)
            info = auth.describe()
            # Which registered credentials this key holds: an up=false pre-flight, no touch.
            info["holds"] = [
                r["name"]
                for r in registered
                if auth.holds(r["rp_id"], [_unb64(r["credential_id"])]) is not None
            ]
        except Fido2Error as exc:
            info = {
                "name": device.name,
                "transport": device.transport,
                "error": exc.code,
                "message": str(exc),
            }
        finally:
            device.close()
        devices.append(info)
    result = {"devices": devices, "credentials": registered}
    lines = [f"{len(devices)} device(s):"]
    for d in devices:
        if "error" in d:
            lines.append(f"  {d['name']} ({d['transport']}): {d['message']}")
            continue
        pin = f"PIN set, {d['pin_retries']} retries" if d["pin_set"] else "no PIN"
        lines.append(
            f"  {d['name']} ({d['transport']}) AAGUID {d['aaguid']} "
            f"{'/'.join(d['versions'])}; {pin}; holds: {', '.join(d['holds']) or '-'}"
        )
    lines.append(f"{len(registered)} registered credential(s):")
    lines += [f"  {r['purpose']:8} {r['name']} (RP {r['rp_id']})" for r in registered]
    return emit(result, "\n".join(lines), as_json=args.json)


def _unb64(text: str) -> bytes:
    from janus_hsm.public_keys import b64url_decode

    return b64url_decode(text)


# ------------------------------------------------------------------ register / remove


def cmd_register(args: argparse.Namespace) -> int:
    auth = _authenticator(args, f"registering {args.name!r}")
    if args.purpose == "approval":
        path = approvers_path(args)
        with registry_lock(path):
            approvers = load_approvers(path)
            rp_id = args.rp_id or APPROVAL_RP_ID
            if approvers.get(args.name) is not None:
                raise CommandError(f"approver {args.name!r} is already registered in {path}")
            exclude = [a.credential_id for a in approvers if a.rp_id == rp_id]
            _say(f"registering approver {args.name!r} on {auth.name}")
            created = auth.make_credential(rp_id, args.name, exclude=exclude)
            approver = Approver(args.name, created.credential_id, created.public_key, rp_id)
            save_approvers(approvers.with_approver(approver), path)
        result: dict[str, Any] = {
            "purpose": "approval",
            "registry": str(path),
            **approver.to_json(),
        }
    else:
        path = registry_dir(args) / CREDENTIALS_FILE
        with registry_lock(path):
            registry = CredentialRegistry.load(path)
            rp_id = args.rp_id or KEYSTORE_RP_ID
            if registry.get(args.name) is not None:
                raise CommandError(f"keystore credential {args.name!r} is already registered")
            exclude = [c.recipient.credential_id for c in registry.credentials]
            _say(f"registering keystore credential {args.name!r} on {auth.name}")
            created = auth.make_credential(rp_id, args.name, hmac_secret=True, exclude=exclude)
            credential = KeystoreCredential(
                HmacSecretRecipient(created.credential_id, rp_id, created.uv, args.name),
                created.aaguid,
                datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            registry.with_credential(credential).save(path)
        result = {"purpose": "keystore", "registry": str(path), **credential.to_json()}
    return emit(result, f"registered {args.purpose} credential {args.name!r}", as_json=args.json)


def cmd_remove(args: argparse.Namespace) -> int:
    removed = []
    warnings: list[str] = []
    if args.purpose in (None, "approval"):
        path = approvers_path(args)
        with registry_lock(path):
            approvers = load_approvers(path)
            if approvers.get(args.name) is not None:
                save_approvers(approvers.without(args.name), path)
                removed.append({"purpose": "approval", "registry": str(path)})
    if args.purpose in (None, "keystore"):
        path = registry_dir(args) / CREDENTIALS_FILE
        with registry_lock(path):
            registry = CredentialRegistry.load(path)
            if registry.get(args.name) is not None:
                registry.without(args.name).save(path)
                removed.append({"purpose": "keystore", "registry": str(path)})
                warnings.append(
                    f"keys already sealed for keystore credential {args.name!r} still open "
                    "with it: run `janus keys rewrap URI --remove "
                    f"{args.name}` for each of them; old copies of a key file (backups) keep "
                    "opening with it, so rotate the key if that matters"
                )
    if not removed:
        raise UnknownCredentialError(
            f"no registered credential named {args.name!r}; `janus fido2 list` shows them"
        )
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    result: dict[str, Any] = {"name": args.name, "removed": removed}
    if warnings:
        result["warnings"] = warnings
    return emit(result, f"removed {args.name!r} from the registry", as_json=args.json)


# ------------------------------------------------------------------ approvals


def approval_sources(args: argparse.Namespace) -> ApprovalSources:
    """The approval options of a grant command, for :func:`collect_approvals`."""
    return ApprovalSources(
        registry_dir=registry_dir(args),
        approvers_file=approvers_path(args),
        files=[(name, read_input(name)) for name in getattr(args, "approvals", None) or []],
        from_devices=bool(getattr(args, "approver_device", False)),
        rp_id=args.approval_rp_id,
        require_uv=bool(args.approval_require_uv),
        pin=_pin(args),
        say=_say,
    )


def write_request(args: argparse.Namespace, draft: GrantDraft) -> int:
    """Write the approval request for ``draft`` (nothing is signed)."""
    request = approval_request(draft, approval_sources(args))
    write_output(args.approval_request_out, request.to_bytes(), mode=0o644)
    result = {
        "request": args.approval_request_out,
        "challenge": b64url_encode(request.challenge),
        "required": request.required,
        "rule": request.rule,
        "signed": False,
    }
    text = (
        f"wrote approval request {args.approval_request_out}: {request.required} approval(s) "
        f"needed (rule {request.rule!r}); nothing was signed"
    )
    return emit(result, text, as_json=args.json)


def load_request(path: str | None) -> ApprovalRequest | None:
    return None if path is None else ApprovalRequest.loads(read_input(path), path)


def refuse_declared_approval(satisfied: Sequence[str] | None) -> None:
    if satisfied and APPROVAL in satisfied:
        raise DeclaredApprovalError(
            "--satisfied approval is refused: approvals are collected and verified, not "
            "declared. Use --approver-device, or --approval-request-out / --approval-request "
            "with --approvals FILE (see docs/fido2.md)"
        )


def add_approval_options(p: argparse.ArgumentParser, *, offline: bool = True) -> None:
    """The options of grant commands that collect approvals when the policy requires them."""
    group = p.add_argument_group("approvals (when the policy requires them)")
    group.add_argument(
        "--approver-device",
        action="store_true",
        help="collect approvals from the connected security keys of registered approvers",
    )
    if offline:
        group.add_argument(
            "--approval-request-out",
            metavar="FILE",
            help="write an approval request for approvers (`janus fido2 approve`), sign nothing",
        )
        group.add_argument(
            "--approval-request", metavar="FILE", help="the request prepared earlier"
        )
        group.add_argument(
            "--approvals",
            action="append",
            metavar="FILE",
            help="an approval file from `janus fido2 approve` (repeatable)",
        )
    group.add_argument(
        "--approval-require-uv", action="store_true", help="approvals must carry the PIN (UV)"
    )
    group.add_argument("--approval-rp-id", default=APPROVAL_RP_ID, metavar="RP_ID")
    _registry_options(group)
    group.add_argument("--pin-source", metavar="URI", help="file:/path holding the PIN")


def _registry_options(p: Any) -> None:
    p.add_argument("--registry-dir", metavar="DIR", help="default: <data dir>/janus/fido2")
    p.add_argument("--approvers", metavar="FILE", help="approver registry (default in DIR)")


def cmd_approve(args: argparse.Namespace) -> int:
    request = ApprovalRequest.loads(read_input(args.request), args.request)
    claims = request.claims
    _say(
        f"approval request for rule {json.dumps(request.rule)}; approving signs exactly "
        f"these claims (challenge {request.challenge.hex()}):\n" + describe_claims(claims)
    )
    return approve_shown(args, request)


class ShownRequest(Protocol):
    """What an approval request offers once its claims have been shown to the approver."""

    @property
    def claims(self) -> dict[str, Any]: ...
    @property
    def rp_id(self) -> str: ...
    @property
    def origin(self) -> str: ...
    @property
    def approvers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def challenge(self) -> bytes: ...


def approve_shown(args: argparse.Namespace, request: ShownRequest) -> int:
    """Ask the security key for one approval of claims already shown, and write it out.

    Shared by ``janus fido2 approve`` (grant approvals) and ``janus hsm approve`` (the
    HSM service's operations): each shows its own claims first, the touch is the same.
    """
    candidates = [(i, c) for i, c in request.approvers if args.approver in (None, i)]
    if not candidates:
        raise UnknownCredentialError(f"the request names no approver {args.approver!r}")
    auth = _authenticator(args, "approving")
    held = auth.holds(request.rp_id, [c for _, c in candidates])
    if held is None:
        raise UnknownCredentialError(
            f"{auth.name} holds none of the approver credentials the request names"
        )
    approver_id, credential_id = next((i, c) for i, c in candidates if c == held)
    # The public key is not needed to *make* an assertion; a placeholder keeps the
    # Approver type (the issuer verifies with the key it registered).
    approver = _placeholder_approver(approver_id, credential_id, request.rp_id)
    try:
        approval = request_approval(
            auth.client(request.origin),
            approver,
            request.claims,
            rp_id=request.rp_id,
            origin=request.origin,
            user_verification="required" if args.uv else "discouraged",
            prompt=lambda a: _say(f"approver {a.id!r}: touch your security key to approve"),
        )
    except ApprovalRequestError as exc:
        raise auth.map_error(exc.__cause__ or exc, f"approval by {approver_id!r}") from None
    data = approval_file(approval, request.challenge)
    result = {
        "approver_id": approver_id,
        "challenge": b64url_encode(request.challenge),
        **({"out": args.out} if args.out else {}),
    }
    if args.out:
        write_output(args.out, data)
        return emit(result, f"approved as {approver_id!r}: wrote {args.out}", as_json=args.json)
    if args.json:
        print_json({**result, "approval": data.decode()})
    else:
        sys.stdout.write(data.decode())
    return 0


#: Claims that are times (seconds since the epoch); shown in UTC beside their value.
_TIME_CLAIMS = ("nbf", "iat", "exp")


def describe_claims(claims: Any) -> str:
    """Every claim the approval signs, one per line, each value JSON-encoded (strings
    quoted and escaped, so no control character or look-alike reaches the terminal
    unescaped), times also in UTC.  What cannot be shown faithfully is refused
    (:class:`MalformedRequestError`), never half-shown."""
    if not isinstance(claims, dict):
        raise MalformedRequestError("the approval request's claims are not a JSON object")
    lines = []
    for name in sorted(claims, key=str):
        value = claims[name]
        try:
            shown = json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MalformedRequestError(
                f"claim {json.dumps(str(name))} cannot be shown ({exc}); refusing to approve"
            ) from None
        if name in _TIME_CLAIMS:
            shown += f" ({_utc(name, value)})"
        lines.append(f"  {json.dumps(str(name))}: {shown}")
    return "\n".join(lines)


def _utc(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedRequestError(
            f"claim {name!r} is {json.dumps(value)[:64]}, not a time in seconds; refusing "
            "to approve a request whose validity cannot be read"
        )
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    except (OverflowError, OSError, ValueError):
        raise MalformedRequestError(
            f"claim {name!r} ({value}) is out of range; refusing to approve"
        ) from None


def _placeholder_approver(approver_id: str, credential_id: bytes, rp_id: str) -> Approver:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return Approver(approver_id, credential_id, key, rp_id)


def register(commands: Any) -> None:
    common = common_options()
    where = argparse.ArgumentParser(add_help=False)
    _registry_options(where)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", metavar="NAME", help="the key whose name contains NAME")
    device.add_argument("--pin-source", metavar="URI", help="file:/path holding the PIN")

    fido2 = commands.add_parser("fido2", help="FIDO2 security keys: approvers, keystore unlock")
    sub = fido2.add_subparsers(dest="fido2_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", parents=[common, where], help="connected keys and registrations")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser(
        "register", parents=[common, where, device], help="create and register a credential"
    )
    p.add_argument("name", metavar="NAME", help="approver id or keystore credential label")
    p.add_argument("--purpose", choices=["approval", "keystore"], default="approval")
    p.add_argument(
        "--rp-id",
        metavar="RP_ID",
        help=f"default {APPROVAL_RP_ID} (approval) or {KEYSTORE_RP_ID} (keystore)",
    )
    p.set_defaults(handler=cmd_register)

    p = sub.add_parser("remove", parents=[common, where], help="remove a registration")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--purpose", choices=["approval", "keystore"])
    p.set_defaults(handler=cmd_remove)

    p = sub.add_parser(
        "approve", parents=[common, device], help="approve a prepared grant with your key"
    )
    p.add_argument("--request", required=True, metavar="FILE")
    p.add_argument("--approver", metavar="ID", help="approve as this approver")
    p.add_argument("--uv", action="store_true", help="also verify the PIN (UV)")
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(handler=cmd_approve)
