"""``janus bus …``: link and unlink two deployments' event buses (federation).

See docs/event-bus.md.  A NATS link is a change to the target stream's sources (the
servers copy); a PostgreSQL link is a mirror that runs until interrupted (or, with
``--once``, until it has copied what is there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from agent.cli.output import common_options, emit


def _link_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="the bus whose revocations are carried (deployment A)",
    )
    parent.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="URL",
        help="the bus that carries them (deployment B, yours)",
    )
    parent.add_argument(
        "--name",
        default="default",
        metavar="NAME",
        help="the link's name (PostgreSQL: its cursor in B's database; default 'default')",
    )
    return parent


def cmd_link(args: argparse.Namespace) -> int:
    from agent.bus.link import link

    async def run() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        return await link(args.source, args.target, name=args.name, once=args.once, stop=stop)

    result = asyncio.run(run())
    if result.backend == "nats":
        text = f"linked: the target stream now sources {result.detail.removeprefix('sourcing ')}"
        if not result.changed:
            text = "already linked: nothing changed"
    else:
        text = f"link {result.name}: copied {result.copied} events"
    return emit(result.as_json(), text, as_json=args.json)


def cmd_unlink(args: argparse.Namespace) -> int:
    from agent.bus.link import unlink

    result = asyncio.run(unlink(args.source, args.target, name=args.name))
    text = f"unlinked ({result.detail or result.name})" if result.changed else "was not linked"
    return emit(result.as_json(), text, as_json=args.json)


def register(commands: Any) -> None:
    bus = commands.add_parser("bus", help="event bus federation (docs/event-bus.md)")
    sub = bus.add_subparsers(dest="bus_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "link",
        parents=[common_options(), _link_parent()],
        help="make bus B carry bus A's revocations",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="PostgreSQL: copy what is there now and exit (else run until interrupted)",
    )
    p.set_defaults(handler=cmd_link)
    p = sub.add_parser(
        "unlink",
        parents=[common_options(), _link_parent()],
        help="stop carrying A's revocations (what was copied stays)",
    )
    p.set_defaults(handler=cmd_unlink)
