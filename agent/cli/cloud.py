"""``janus cloud serve``: run the cloud agent's HTTP service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli.output import CommandError
from janus_hsm.pin import PIN_ENV, read_pin_file, resolve_pin_source

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    from agent.cloud.http import build_app
    from agent.cloud.service import CloudAgent, CloudConfig
    from agent.cloud.startup import check_keystore, check_owner, listen, serve
    from policies.policy import IssuancePolicy

    # Every check that can fail runs before the agent announces itself.
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.public:
        raise CommandError(
            f"refusing to listen on {args.host} without --public: put the agent behind a "
            "TLS-terminating proxy and say so explicitly"
        )
    if args.owner is not None:
        check_owner(args.owner)
    passphrase = _passphrase_source(args.passphrase_file)
    passphrase()  # read now: a missing file or an empty variable is said at once
    delegation_policy = (
        IssuancePolicy.load(args.delegation_policy)
        if args.delegation_policy
        else IssuancePolicy.permissive()
    )
    api_token = read_pin_file(Path(args.api_token_file)) if args.api_token_file else None
    sock = listen(args.host, args.port)
    try:
        agent = CloudAgent(
            CloudConfig(
                state_dir=Path(args.state_dir),
                passphrase_source=passphrase,
                ledger_url=args.ledger,
                owner=args.owner,
                delegation_policy=delegation_policy,
                api_token=api_token,
            )
        )
    except BaseException:
        sock.close()
        raise
    try:
        check_keystore(agent)

        def announce(url: str, pid: int) -> None:
            if args.json:  # one line, so a supervisor can read it as soon as it comes
                print(json.dumps({"url": url, "did": agent.did, "pid": pid}, sort_keys=True))
            else:
                print(f"janus cloud agent {agent.did} on {url} (pid {pid})")
            sys.stdout.flush()

        serve(build_app(agent), sock, log_level=args.log_level, on_listening=announce)
    finally:
        sock.close()
        agent.close()
    return 0


def _passphrase_source(path: str | None) -> Callable[[], str]:
    """The keystore passphrase: --passphrase-file, else JANUS_PIN, else a prompt.

    Not janus_hsm's PIN resolution as such: its "no PIN" error tells how to give a
    token's PIN (pin-source=…), which is not how this command takes its passphrase.
    """
    if path:
        file = Path(path)
        if not file.is_file():
            raise CommandError(f"--passphrase-file {path}: no such file")
        return lambda: read_pin_file(file)
    source = resolve_pin_source(None, prompt="Keystore passphrase: ")
    if os.environ.get(PIN_ENV) or sys.stdin.isatty():
        return source
    raise CommandError(
        "the keystore needs a passphrase and none was given: use --passphrase-file FILE, "
        f"set {PIN_ENV}, or run on a terminal to be prompted"
    )


def register(commands: Any) -> None:
    cloud = commands.add_parser("cloud", help="the cloud agent service")
    sub = cloud.add_subparsers(dest="cloud_command", metavar="ACTION", required=True)
    p = sub.add_parser("serve", help="serve the cloud agent's HTTP API")
    p.add_argument(
        "--json",
        action="store_true",
        help='once listening, print one JSON line {"url", "did", "pid"}; errors as JSON',
    )
    p.add_argument(
        "--state-dir",
        required=True,
        metavar="DIR",
        help="keys (encrypted) and, by default, the SQLite store",
    )
    p.add_argument(
        "--ledger",
        metavar="URL",
        help="shared store: postgresql://… (default: SQLite in the state dir)",
    )
    p.add_argument(
        "--owner",
        metavar="DID",
        help="accept only capabilities rooted at this did:key (recommended)",
    )
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="keystore passphrase file (else JANUS_PIN, else a prompt)",
    )
    p.add_argument(
        "--delegation-policy",
        metavar="FILE",
        help="issuance policy for cap/delegate (default: permissive)",
    )
    p.add_argument(
        "--api-token-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <token>' on grant actions",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument(
        "--public", action="store_true", help="allow listening on a non-loopback address"
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(handler=cmd_serve)
