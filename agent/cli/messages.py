"""``janus msg pack | unpack``: DIDComm v2 envelopes from the shell, ECDH where the key lives.

For scripts and for interoperation with other DIDComm agents: ``pack`` reads a
plaintext message and prints the JWE (anoncrypt, or authcrypt with ``--from``);
``unpack`` reads any envelope and prints the plaintext, with ``--json`` also what
protected it.  See docs/messages.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.cli.output import CommandError, common_options, emit, emit_written, touch_prompt
from agent.didcomm import (
    CONTENT_ALGORITHMS,
    MAX_ENVELOPE,
    ConsistencyError,
    DIDCommError,
    Message,
    jwk_resolver,
    pack_anoncrypt,
    pack_authcrypt,
    resolve_recipient,
    unpack,
)
from agent.didcomm.keys import (
    Recipient,
    SenderResolver,
    agreement_kid,
    authentication_kid,
    did_key_of,
    did_of,
    is_did,
    is_did_url,
)
from janus_hsm import open_provider
from janus_hsm.provider import KeyHandle

MAX_JWK_FILE = 64 * 1024


class MessagingError(CommandError):
    """A DIDComm error, keeping its stable code for ``--json`` output."""

    def __init__(self, exc: DIDCommError) -> None:
        super().__init__(str(exc))
        self.code = exc.code


@contextlib.contextmanager
def _didcomm_errors() -> Iterator[None]:
    try:
        yield
    except DIDCommError as exc:
        raise MessagingError(exc) from None


def _read(path: str, limit: int, what: str) -> bytes:
    """Read FILE (or stdin for '-') but never more than ``limit`` + 1 bytes."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(path).open("rb") as f:
                data = f.read(limit + 1)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise CommandError(f"{what} {path} is larger than {limit} bytes")
    return data


def _jwks_file(path: str) -> list[dict[str, Any]]:
    """A JWK, or a JWK set ({"keys": [...]}), read from a file."""
    try:
        obj = json.loads(_read(path, MAX_JWK_FILE, "JWK file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path} is not a JSON JWK: {exc}") from None
    keys = obj.get("keys") if isinstance(obj, dict) and "kty" not in obj else [obj]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
        raise CommandError(f"{path} must hold a JWK or a JWK set")
    return keys


def _recipients(values: list[str]) -> list[Recipient]:
    out: list[Recipient] = []
    for value in values:
        if value.startswith("did:"):
            out.append(resolve_recipient(value))
        else:
            out.extend(resolve_recipient(jwk) for jwk in _jwks_file(value))
    return out


def _open(stack: contextlib.ExitStack, uri: str, allow_extractable: bool) -> KeyHandle:
    provider = stack.enter_context(
        open_provider(uri, allow_extractable=allow_extractable, on_touch=touch_prompt)
    )
    return provider.find(uri)


def cmd_pack(args: argparse.Namespace) -> int:
    with _didcomm_errors():
        try:
            message = Message.from_json(_read(args.input, MAX_ENVELOPE, "message"))
        except DIDCommError as exc:
            raise CommandError(f"{args.input}: {exc}") from None
        recipients = _recipients(args.to)
        if args.sender and args.enc != "A256CBC-HS512":
            raise CommandError("authcrypt (--from) uses A256CBC-HS512 only; drop --enc")
        with contextlib.ExitStack() as stack:
            sender = _open(stack, args.sender, args.allow_extractable) if args.sender else None
            signer = _open(stack, args.sign, args.allow_extractable) if args.sign else None
            updates: dict[str, Any] = {}
            # Fill in what the envelope implies, so a bare message can be packed as is.
            if message.to is None:
                updates["to"] = tuple(dict.fromkeys(r.did for r in recipients))
            if message.from_ is None and (sender or signer):
                key = sender or signer
                assert key is not None
                updates["from_"] = key.did
            if updates:
                message = _replace(message, **updates)
            if sender is not None:
                envelope = pack_authcrypt(
                    message,
                    recipients,
                    sender,
                    signer=signer,
                    protect_sender=args.protect_sender,
                )
                mode = "anoncrypt+authcrypt" if args.protect_sender else "authcrypt"
            else:
                if args.protect_sender:
                    raise CommandError("--protect-sender needs --from (authcrypt)")
                envelope = pack_anoncrypt(message, recipients, enc=args.enc, signer=signer)
                mode = "anoncrypt"
            if signer is not None:
                mode += "+signed"
    result: dict[str, Any] = {
        "mode": mode,
        "recipients": [r.kid for r in recipients],
        "envelope": json.loads(envelope),
    }
    if sender is not None:
        result["sender"] = agreement_kid(did_key_of(sender.public_key()))
    if signer is not None:
        result["signed_by"] = authentication_kid(signer.did)
    if args.out:
        result["out"] = args.out
    return emit_written(args.out, envelope.encode() + b"\n", result, as_json=args.json)


def _replace(message: Message, **changes: Any) -> Message:
    return dataclasses.replace(message, **changes)


def _sender(value: str | None) -> tuple[SenderResolver | None, set[str]]:
    """(resolver, acceptable sender DIDs) for ``--sender``."""
    if value is None:
        return None, set()
    if value.startswith("did:"):
        if not (is_did(value) or is_did_url(value)):
            raise CommandError(f"--sender {value[:60]!r} is not a DID")
        return None, {did_of(value)}
    jwks = _jwks_file(value)
    resolver = jwk_resolver(jwks)
    return resolver, {did_of(str(jwk["kid"])) for jwk in jwks}


def cmd_unpack(args: argparse.Namespace) -> int:
    if args.max_size <= 0:
        raise CommandError("--max-size must be positive")
    with _didcomm_errors():
        envelope = _read(args.input, args.max_size, "envelope")
        resolver, expected = _sender(args.sender)
        with contextlib.ExitStack() as stack:
            keys = [_open(stack, uri, args.allow_extractable) for uri in args.key or []]
            unpacked = unpack(envelope, keys, sender_resolver=resolver, max_size=args.max_size)
        metadata = unpacked.metadata
        if expected and metadata.sender not in expected:
            who = metadata.sender or "nobody (anonymous)"
            raise ConsistencyError(
                f"the message is authenticated by {who}, not by {', '.join(sorted(expected))}"
            )
    message = unpacked.message.to_dict()
    return emit(
        {"message": message, "metadata": metadata.as_dict()},
        json.dumps(message, indent=2, ensure_ascii=False),
        as_json=args.json,
    )


def register(commands: Any) -> None:
    common = common_options(
        allow_extractable="accept a private key that is or was extractable (software keys need it)"
    )
    msg = commands.add_parser("msg", help="pack and unpack DIDComm v2 messages")
    sub = msg.add_subparsers(dest="msg_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "pack",
        parents=[common],
        help="encrypt a plaintext message (anoncrypt; authcrypt with --from)",
    )
    p.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="DID_OR_JWK_FILE",
        help="recipient: a did:key DID or DID URL, or a file with a public JWK (or JWK set) "
        "whose kid is a DID URL; repeat for several recipients on one curve",
    )
    p.add_argument(
        "--from",
        dest="sender",
        metavar="KEY_URI",
        help="authcrypt as this key (X25519, P-256 or P-384; ECDH runs in its device)",
    )
    p.add_argument("--sign", metavar="KEY_URI", help="sign the message first (EdDSA or ES256)")
    p.add_argument(
        "--enc",
        choices=CONTENT_ALGORITHMS,
        default="A256CBC-HS512",
        help="content encryption for anoncrypt (default A256CBC-HS512)",
    )
    p.add_argument(
        "--protect-sender",
        action="store_true",
        help="with --from: wrap the authcrypt envelope in anoncrypt to hide the sender's kid",
    )
    p.add_argument("--in", dest="input", required=True, metavar="FILE", help="plaintext, or -")
    p.add_argument("--out", metavar="FILE", help="write the envelope here")
    p.set_defaults(handler=cmd_pack)

    p = sub.add_parser(
        "unpack", parents=[common], help="decrypt and verify an envelope, print the plaintext"
    )
    p.add_argument(
        "--key",
        action="append",
        metavar="KEY_URI",
        help="a recipient private key (repeatable); ECDH runs in its device",
    )
    p.add_argument("--in", dest="input", required=True, metavar="FILE", help="envelope, or -")
    p.add_argument(
        "--sender",
        metavar="DID_OR_JWK_FILE",
        help="require the message to be authenticated (authcrypt or signature) by this DID; "
        "a JWK file also supplies the key of a sender that is not a did:key",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=MAX_ENVELOPE,
        metavar="BYTES",
        help=f"refuse larger envelopes (default {MAX_ENVELOPE})",
    )
    p.set_defaults(handler=cmd_unpack)
