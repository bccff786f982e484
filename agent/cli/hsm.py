"""``janus hsm serve | keys | key | request | approve | audit-head``: the HSM service.

``serve`` runs the service in front of the tokens (docs/hsm-service.md); the other
commands are its clients: each request is signed by the client's own key under the
capability an administrator granted it (``--client-key`` / ``--capability``, or
``JANUS_HSM_CLIENT_KEY`` / ``JANUS_HSM_CAPABILITY``).  ``request`` and ``approve`` are
the quorum flow: the requester asks the service for the exact claims approvers must
sign, each approver reads them and touches their security key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    read_input,
    write_output,
)

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


# ------------------------------------------------------------------ janus hsm serve


def cmd_serve(args: argparse.Namespace) -> int:
    from agent.hsm_service.config import load_config
    from agent.hsm_service.engine import HsmEngine
    from agent.hsm_service.http import ClientGate, build_app
    from agent.serving import listen, serve

    # Every check that can fail runs before the service announces itself.
    if args.host not in _LOOPBACK and not args.public:
        raise CommandError(
            f"refusing to listen on {args.host} without --public: put the service behind a "
            "TLS-terminating proxy and say so explicitly"
        )
    config = load_config(args.config)
    p11kit = _p11kit_server(args.p11kit_socket)
    state_dir = Path(config.service.state_dir)
    engine = HsmEngine.open(config)
    try:
        gate = ClientGate(
            config.service.administrators, config.service.name, state_dir / "clients.sqlite"
        )
    except BaseException:
        engine.close()
        raise
    stop_p11kit = None
    try:
        sock = listen(args.host, args.port)
        try:
            if p11kit is not None:
                stop_p11kit = p11kit(engine, args.p11kit_socket, config)

            def announce(url: str, pid: int) -> None:
                if args.json:  # one line, so a supervisor can read it as soon as it comes
                    document = {"url": url, "pid": pid, "service": config.service.name}
                    if args.p11kit_socket:
                        document["p11kit_socket"] = args.p11kit_socket
                    print(json.dumps(document, sort_keys=True))
                else:
                    print(f"janus HSM service {config.service.name!r} on {url} (pid {pid})")
                sys.stdout.flush()

            serve(
                build_app(engine, gate, config),
                sock,
                log_level=args.log_level,
                on_listening=announce,
            )
        finally:
            sock.close()
            if stop_p11kit is not None:
                stop_p11kit()
    finally:
        gate.close()
        engine.close()
    return 0


def _p11kit_server(path: str | None) -> Any:
    """The p11-kit RPC front's starter, or a clear refusal when it is not available."""
    if path is None:
        return None
    try:
        from agent.hsm_service import p11kit

        start = p11kit.serve_unix
    except (ImportError, AttributeError):
        raise CommandError(
            "--p11kit-socket: the p11-kit RPC front is not available in this installation"
        ) from None
    return _started(start)


def _started(start: Any) -> Any:
    """``serve_unix(engine, path, config)`` returns a server to close, or a stop function."""

    def run(engine: Any, path: str, config: Any) -> Any:
        server = start(engine, path, config)
        close = getattr(server, "close", None)
        return close if callable(close) else server

    return run


# ------------------------------------------------------------------ client commands


def _client(args: argparse.Namespace) -> Any:
    from agent.hsm_service.client import HsmClient
    from agent.hsm_service.provider import CAPABILITY_ENV, CLIENT_KEY_ENV, HsmUri
    from janus_hsm import open_key
    from policies.capability import Bundle

    key_uri = args.client_key or os.environ.get(CLIENT_KEY_ENV, "")
    capability = args.capability or os.environ.get(CAPABILITY_ENV, "")
    if not key_uri or not capability:
        raise CommandError(
            f"name this client: --client-key URI (or {CLIENT_KEY_ENV}) and --capability "
            f"FILE (or {CAPABILITY_ENV}), the capability the service's administrator granted"
        )
    service = args.service
    if service.lower().startswith("hsm+"):
        service = HsmUri.parse(service).base
    elif not service.lower().startswith(("http://", "https://")):
        raise CommandError("--service is the service's URL: http(s)://HOST:PORT or hsm+…")
    bundle = Bundle.parse(read_input(capability))
    return HsmClient(service, open_key(key_uri, allow_extractable=True), bundle)


def cmd_keys(args: argparse.Namespace) -> int:
    with _client(args) as client:
        keys = client.list_keys()
    lines = [
        f"{k.get('label')}  {k.get('alg')}  {k.get('state')}  "
        f"{','.join(k.get('operations', []))}"
        + (f"  quorum {k.get('quorum')}" if k.get("quorum") else "")
        for k in keys
    ]
    return emit({"keys": keys}, "\n".join(lines) or "(no keys for this client)", as_json=args.json)


def cmd_key(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = client.key(args.label)
    text = "\n".join(f"{name}: {json.dumps(view[name])}" for name in sorted(view))
    return emit(view, text, as_json=args.json)


def cmd_audit_head(args: argparse.Namespace) -> int:
    with _client(args) as client:
        head = client.audit_head()
    return emit(head, json.dumps(head, indent=2, sort_keys=True), as_json=args.json)


def cmd_request(args: argparse.Namespace) -> int:
    """Ask the service for the claims approvers sign, and write the approval request."""
    from agent.hsm_service.client import new_nonce
    from janus_hsm import b64url
    from policies.durations import parse_duration
    from policies.errors import FormatError

    try:
        lifetime = parse_duration(args.lifetime)
    except FormatError as exc:
        raise CommandError(f"--lifetime: {exc}") from None
    body: dict[str, Any] = {}
    if args.operation in ("sign", "ecdh"):
        if args.input is None:
            raise CommandError(f"--in FILE: the data the {args.operation} will be asked for")
        data = read_input(args.input)
        if args.operation == "ecdh":
            data = _peer_der(data)
        body["payload" if args.operation == "sign" else "peer"] = b64url.encode(data)
    elif args.input is not None:
        raise CommandError(f"{args.operation} takes no --in")
    if args.operation == "generate" and args.algorithm:
        body["algorithm"] = args.algorithm
    nonce = new_nonce()
    with _client(args) as client:
        request = client.approval_request(
            args.label, args.operation, body, nonce=nonce, lifetime=lifetime
        )
    write_output(args.out, request.to_bytes())
    result = {"out": args.out, "nonce": nonce, "expires": request.expires}
    return emit(
        result,
        f"wrote {args.out}: each approver runs `janus hsm approve --request {args.out}`",
        as_json=args.json,
    )


def _peer_der(data: bytes) -> bytes:
    """A peer public key given as PEM, DER or a did:key: as SubjectPublicKeyInfo DER."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_der_public_key,
        load_pem_public_key,
    )

    from janus_hsm.public_keys import from_did_key

    text = data.strip()
    try:
        if text.startswith(b"did:key:"):
            key: Any = from_did_key(text.decode())
        elif text.startswith(b"-----BEGIN"):
            key = load_pem_public_key(text)
        else:
            key = load_der_public_key(data)
    except Exception:
        raise CommandError("--in: the peer key is not PEM, DER or a did:key") from None
    der: bytes = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der


def cmd_approve(args: argparse.Namespace) -> int:
    """Show an approver exactly what they approve, then ask their security key.

    The same display and touch as ``janus fido2 approve`` (its helpers), for the HSM
    service's claims: operation, key, SHA-256 of the data, requester, nonce, expiry.
    """
    from agent.cli.fido2 import _say, approve_shown, describe_claims
    from agent.hsm_service.client import HsmApprovalRequest

    request = HsmApprovalRequest.loads(read_input(args.request), args.request)
    claims = request.claims
    expires = claims.get("expires")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(expires))
        if isinstance(expires, int) and 0 <= expires < 2**33
        else "?"
    )
    _say(
        f"HSM service request: {json.dumps(claims.get('operation'))} with key "
        f"{json.dumps(claims.get('key'))} for {json.dumps(claims.get('requester'))}, "
        f"data SHA-256 {json.dumps(claims.get('payload_sha256'))}, good until {when}; "
        f"{request.required} approval(s) needed. Approving signs exactly these claims "
        f"(challenge {request.challenge.hex()}):\n" + describe_claims(claims)
    )
    return approve_shown(args, request)


# ------------------------------------------------------------------ registration


def _hsm_keys(uri: str, **options: Any) -> Any:
    from agent.hsm_service.provider import open_provider

    return open_provider(uri, **options)


def register_key_scheme() -> None:
    """Serve ``hsm+http(s)://`` key URIs (imported only when one is opened)."""
    from janus_hsm import register_scheme

    for scheme in ("hsm+http", "hsm+https"):
        register_scheme(scheme, _hsm_keys)


def register(commands: Any) -> None:
    common = common_options()
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--service", required=True, metavar="URL", help="http(s)://HOST:PORT of the service"
    )
    client.add_argument(
        "--client-key", metavar="URI", help="this client's own key (default $JANUS_HSM_CLIENT_KEY)"
    )
    client.add_argument(
        "--capability",
        metavar="FILE",
        help="the bundle an administrator granted that key (default $JANUS_HSM_CAPABILITY)",
    )

    hsm = commands.add_parser("hsm", help="the HSM service: shared tokens under policy")
    sub = hsm.add_subparsers(dest="hsm_command", metavar="ACTION", required=True)

    p = sub.add_parser("serve", parents=[common], help="serve the HSM service")
    p.add_argument("--config", required=True, metavar="FILE", help="the service's TOML config")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8450, help="0 picks a free port (default 8450)")
    p.add_argument("--public", action="store_true", help="allow a non-loopback --host")
    p.add_argument(
        "--p11kit-socket", metavar="PATH", help="also serve the p11-kit RPC protocol on PATH"
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("keys", parents=[common, client], help="the keys this client may use")
    p.set_defaults(handler=cmd_keys)

    p = sub.add_parser("key", parents=[common, client], help="one key: public key, policy")
    p.add_argument("label", metavar="LABEL")
    p.set_defaults(handler=cmd_key)

    p = sub.add_parser(
        "request", parents=[common, client], help="prepare an approval request for a quorum key"
    )
    p.add_argument("label", metavar="LABEL")
    p.add_argument("--operation", required=True, choices=["sign", "ecdh", "generate", "destroy"])
    p.add_argument("--in", dest="input", metavar="FILE", help="data to sign / peer key ('-')")
    p.add_argument("--algorithm", metavar="ALG", help="for generate: ES256, ES384, EdDSA…")
    p.add_argument("--lifetime", default="10m", metavar="DURATION", help="default 10m")
    p.add_argument("--out", required=True, metavar="FILE", help="the approval request file")
    p.set_defaults(handler=cmd_request)

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", metavar="NAME", help="the key whose name contains NAME")
    device.add_argument("--pin-source", metavar="URI", help="file:/path holding the PIN")
    p = sub.add_parser(
        "approve",
        parents=[common, device],
        help="show an HSM approval request and approve it with your security key",
    )
    p.add_argument("--request", required=True, metavar="FILE")
    p.add_argument("--approver", metavar="ID", help="approve as this approver")
    p.add_argument("--uv", action="store_true", help="also verify the PIN (UV)")
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(handler=cmd_approve)

    p = sub.add_parser(
        "audit-head", parents=[common, client], help="a freshly signed head of the audit log"
    )
    p.set_defaults(handler=cmd_audit_head)


__all__ = ["register", "register_key_scheme"]
