"""The ``janus`` command line.

Scripts depend on it (see docs/cli.md): every command takes ``--json``; exit status is
0 on success, 1 on a failure with a one-line reason on stderr, 2 on a usage error.
PINs are never accepted as arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from agent.cli import (
    bus,
    capabilities,
    cloud,
    devices,
    directory,
    edge,
    fido2,
    groups,
    hsm,
    keys,
    messages,
    relationships,
)
from agent.cli.output import CommandError, emit_error
from agent.didcomm.errors import DIDCommError
from agent.errors import AgentError
from janus_hsm.errors import JanusHSMError
from policies.errors import PolicyError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="janus",
        description="Hardware-rooted identity agent: keys stay in hardware.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys.register(commands)
    capabilities.register(commands)
    bus.register(commands)
    messages.register(commands)
    cloud.register(commands)
    edge.register(commands)
    fido2.register(commands)
    relationships.register(commands)
    groups.register(commands)
    devices.register(commands)
    directory.register(commands)
    hsm.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    hsm.register_key_scheme()  # hsm+https://… keys work wherever a key URI is taken
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="janus: %(levelname)s: %(message)s",
    )
    as_json = bool(getattr(args, "json", False))
    try:
        result: int = args.handler(args)
        return result
    except (JanusHSMError, PolicyError, AgentError, DIDCommError, CommandError) as exc:
        emit_error(exc, as_json=as_json)
        return 1
    except KeyboardInterrupt:
        print("janus: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
