"""``janus cloud serve``: run the cloud agent's HTTP service."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from agent.cli.output import CommandError
from janus_hsm.pin import read_pin_file, resolve_pin_source

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.cloud.http import build_app
    from agent.cloud.service import CloudAgent, CloudConfig
    from policies.policy import IssuancePolicy

    if args.passphrase_file:
        path = Path(args.passphrase_file)

        def passphrase() -> str:
            return read_pin_file(path)
    else:
        passphrase = resolve_pin_source(None, prompt="Keystore passphrase: ")
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.public:
        raise CommandError(
            f"refusing to listen on {args.host} without --public: put the agent behind a "
            "TLS-terminating proxy and say so explicitly"
        )
    config = CloudConfig(
        state_dir=Path(args.state_dir),
        passphrase_source=passphrase,
        ledger_url=args.ledger,
        owner=args.owner,
        delegation_policy=(
            IssuancePolicy.load(args.delegation_policy)
            if args.delegation_policy
            else IssuancePolicy.permissive()
        ),
    )
    if args.api_token_file:
        config.api_token = read_pin_file(Path(args.api_token_file))
    agent = CloudAgent(config)
    print(f"janus cloud agent {agent.did} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(
        build_app(agent), host=args.host, port=args.port, log_level=args.log_level, access_log=False
    )
    agent.close()
    return 0


def register(commands: Any) -> None:
    cloud = commands.add_parser("cloud", help="the cloud agent service")
    sub = cloud.add_subparsers(dest="cloud_command", metavar="ACTION", required=True)
    p = sub.add_parser("serve", help="serve the cloud agent's HTTP API")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
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
