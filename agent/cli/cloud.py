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
    from agent.cloud.startup import check_keystore, check_owner
    from agent.serving import listen, serve
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
    if not 0 < args.body_timeout <= 3600:
        raise CommandError(f"--body-timeout {args.body_timeout:g}: give 0 < seconds <= 3600")
    receiving_config, sending_config = _service_configs(args)
    bus_settings, max_queue_depth = _bus_settings(args)
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
    if agent.ledger.created:  # a mistyped --ledger must not silently start an empty one
        print(f"janus: created ledger {agent.ledger.location}", file=sys.stderr)
    try:
        check_keystore(agent)

        def announce(url: str, pid: int) -> None:
            if args.json:  # one line, so a supervisor can read it as soon as it comes
                print(json.dumps({"url": url, "did": agent.did, "pid": pid}, sort_keys=True))
            else:
                print(f"janus cloud agent {agent.did} on {url} (pid {pid})")
            sys.stdout.flush()

        receiving, sending = None, None
        if receiving_config is not None:
            from agent.cloud.receiving import ReceivingService

            receiving = ReceivingService(agent, receiving_config)
            receiving.key_document()  # the first key exists before the first request
        if sending_config is not None:
            from agent.cloud.sending import SendingService

            sending = SendingService(agent, sending_config)
            sending.start()  # forwards what a previous run left queued, too
        bus = None
        if bus_settings is not None:
            from agent.cloud.bus_link import BusLink

            bus = BusLink(agent, bus_settings)
        app = build_app(
            agent,
            body_timeout=args.body_timeout,
            receiving=receiving,
            sending=sending,
            bus=bus,
            max_queue_depth=max_queue_depth,
        )
        try:
            serve(app, sock, log_level=args.log_level, on_listening=announce)
        finally:
            if sending is not None:
                sending.stop()
            if receiving is not None:
                receiving.close()
    finally:
        sock.close()
        agent.close()
    return 0


def _bus_settings(args: argparse.Namespace) -> tuple[Any, int | None]:
    """The event bus's settings, and the bus reached once: a bad URL or a bus that does
    not answer is said now, before the agent listens."""
    depth = args.max_queue_depth
    if depth is not None and not 0 < depth <= 1_000_000:
        raise CommandError("--max-queue-depth: give 1 to 1000000 uses")
    if args.event_bus is None:
        for flag, value in (
            ("--bus-staleness", args.bus_staleness),
            ("--home-timeout", args.home_timeout),
            ("--instance-name", args.instance_name),
        ):
            if value is not None:
                raise CommandError(f"{flag} needs --event-bus URL")
        return None, depth
    import asyncio

    from agent.bus.base import check_consumer
    from agent.cloud.bus_link import (
        DEFAULT_QUEUE_DEPTH,
        DEFAULT_STALENESS,
        HOME_TIMEOUT,
        BusSettings,
        probe,
    )

    staleness = DEFAULT_STALENESS if args.bus_staleness is None else args.bus_staleness
    if not 0 < staleness <= 86_400:
        raise CommandError(f"--bus-staleness {staleness:g}: give 0 < seconds <= 86400")
    home_timeout = HOME_TIMEOUT if args.home_timeout is None else args.home_timeout
    if not 0 < home_timeout <= 60:
        raise CommandError(f"--home-timeout {home_timeout:g}: give 0 < seconds <= 60")
    if args.instance_name is not None:
        check_consumer(args.instance_name)
    asyncio.run(probe(args.event_bus))
    settings = BusSettings(
        args.event_bus,
        staleness=staleness,
        instance_name=args.instance_name,
        home_timeout=home_timeout,
    )
    return settings, DEFAULT_QUEUE_DEPTH if depth is None else depth


def _service_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The receiving and sending services' settings, checked before anything starts."""
    from agent.cloud.receiving import ReceivingConfig
    from agent.cloud.sending import SendingConfig
    from policies.durations import parse_duration
    from policies.errors import FormatError

    if (args.receiving or args.sending) and args.owner is None:
        raise CommandError(
            "--receiving and --sending serve one owner: give --owner DID (the owner's root)"
        )

    def duration(flag: str, text: str) -> int:
        try:
            return parse_duration(text)
        except FormatError as exc:
            raise CommandError(f"{flag}: {exc}") from None

    receiving = None
    if args.receiving:
        rotation = duration("--receiving-key-rotation", args.receiving_key_rotation)
        overlap = duration("--receiving-key-overlap", args.receiving_key_overlap)
        retention = duration("--receiving-retention", args.receiving_retention)
        if not 0 < args.receiving_max_message <= 1024 * 1024:
            raise CommandError("--receiving-max-message: give 1 to 1048576 bytes")
        if not 0 < args.receiving_quota <= 10_000:
            raise CommandError("--receiving-quota: give 1 to 10000 messages")
        receiving = ReceivingConfig(
            rotation=rotation,
            overlap=overlap,
            retention=retention,
            max_message=args.receiving_max_message,
            default_quota=args.receiving_quota,
            max_quota=max(args.receiving_quota, ReceivingConfig.max_quota),
        )
    sending = None
    if args.sending:
        if not 0 < args.sending_retry_base <= 3600:
            raise CommandError("--sending-retry-base: give 0 < seconds <= 3600")
        sending = SendingConfig(
            retry_base=args.sending_retry_base,
            max_age=duration("--sending-max-age", args.sending_max_age),
            allow_hosts=frozenset(h.lower() for h in args.sending_allow_host),
        )
    return receiving, sending


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
    p.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="answer 408 and close when a request body takes longer to arrive (default 10)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument(
        "--public", action="store_true", help="allow listening on a non-loopback address"
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    bus = p.add_argument_group("several instances on an event bus (docs/cloud-agent.md)")
    bus.add_argument(
        "--event-bus",
        metavar="URL",
        help="share revocations with other instances: postgresql://… or nats://host:port",
    )
    bus.add_argument(
        "--bus-staleness",
        type=float,
        metavar="SECONDS",
        help="refuse uses with limits after this long without contact with the bus (default 30)",
    )
    bus.add_argument(
        "--home-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a use forwarded to its capability's home instance waits for its"
        " answer before 503 home_ledger_unreachable (default 2)",
    )
    bus.add_argument(
        "--max-queue-depth",
        type=int,
        metavar="N",
        help="answer 429 past N uses in progress (default 1000 on a bus, else no bound)",
    )
    bus.add_argument(
        "--instance-name",
        metavar="NAME",
        help="this instance's durable consumer name on the bus (default: its did:key)",
    )
    services = p.add_argument_group("receiving and sending services (docs/services.md)")
    services.add_argument(
        "--receiving",
        action="store_true",
        help="be a receiving service: addresses for the owner, held ciphertext",
    )
    services.add_argument(
        "--receiving-key-rotation",
        default="7d",
        metavar="DURATION",
        help="make a new HPKE key this often (default 7d)",
    )
    services.add_argument(
        "--receiving-key-overlap",
        default="7d",
        metavar="DURATION",
        help="keep opening addresses sealed to the previous key this long (default 7d)",
    )
    services.add_argument(
        "--receiving-max-message",
        type=int,
        default=72 * 1024,
        metavar="BYTES",
        help="largest ciphertext accepted (default 73728)",
    )
    services.add_argument(
        "--receiving-quota",
        type=int,
        default=1000,
        metavar="N",
        help="messages held per address until picked up (default 1000)",
    )
    services.add_argument(
        "--receiving-retention",
        default="14d",
        metavar="DURATION",
        help="delete held messages nobody picked up after this (default 14d)",
    )
    services.add_argument(
        "--sending",
        action="store_true",
        help="be a sending service: store and forward under the owner's msg/submit grant",
    )
    services.add_argument(
        "--sending-retry-base",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="first retry after this, doubling up to an hour (default 2)",
    )
    services.add_argument(
        "--sending-max-age",
        default="3d",
        metavar="DURATION",
        help="give a submission up after this (default 3d)",
    )
    services.add_argument(
        "--sending-allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="forward to this host even over http or on a private address (repeatable)",
    )
    p.set_defaults(handler=cmd_serve)
