"""``janus dir …``: run a namespace's directory, publish to it, claim from it, check it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli.output import CommandError, common_options, emit, read_input, write_output


def _state_parent() -> argparse.ArgumentParser:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        metavar="DIR",
        help="edge agent state (default: the platform's data dir)/janus/edge",
    )
    return state


def _state(args: argparse.Namespace) -> Path:
    from agent.cli.edge import _state as edge_state

    return edge_state(args)


def _directory_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--directory", required=True, metavar="URL", help="the directory's URL")
    return parent


# --- janus dir serve ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from agent.directory.http import build_app
    from agent.directory.keypackage import check_namespace
    from agent.directory.rules import Rules
    from agent.directory.service import DirectoryService
    from agent.directory.store import DirectoryStore
    from agent.errors import ConfigurationError
    from agent.serving import listen, serve
    from janus_hsm import open_key
    from janus_hsm.database_url import sqlite_url

    # Everything that can fail is checked before the directory announces itself.
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.public:
        raise CommandError(
            f"refusing to listen on {args.host} without --public: put the directory behind a "
            "TLS-terminating proxy and say so explicitly"
        )
    namespace = check_namespace(args.namespace)
    rules = Rules.load(Path(args.rules)) if args.rules else Rules.open_mode()
    if not 0 < args.body_timeout <= 3600:
        raise CommandError(f"--body-timeout {args.body_timeout:g}: give 0 < seconds <= 3600")
    key = open_key(args.key, allow_extractable=args.allow_extractable)
    if not key.algorithm.can_sign:
        raise ConfigurationError("--key must name a signing key (ES256, ES384 or EdDSA)")
    key.sign(b"janus directory start-up check")  # a wrong PIN shows now, not at a request
    if args.store:
        store_url = args.store
    else:
        state = Path(args.state_dir) if args.state_dir else Path.cwd()
        store_url = sqlite_url((state / "directory.db").resolve())
    store = DirectoryStore(store_url)
    try:
        service = DirectoryService(key, namespace, store, rules)
        service.tree_head()  # the log is readable and the key signs heads
        sock = listen(args.host, args.port)

        def announce(url: str, pid: int) -> None:
            if args.json:
                print(
                    json.dumps(
                        {"url": url, "did": service.did, "namespace": namespace, "pid": pid},
                        sort_keys=True,
                    )
                )
            else:
                print(f"janus directory for @{namespace} ({service.did}) on {url} (pid {pid})")
            sys.stdout.flush()

        try:
            app = build_app(service, body_timeout=args.body_timeout)
            serve(app, sock, log_level=args.log_level, on_listening=announce)
        finally:
            sock.close()
    finally:
        store.close()
    return 0


# --- owner commands -----------------------------------------------------------------------


def _edge(args: argparse.Namespace) -> Any:
    from agent.cli.output import touch_prompt
    from agent.edge.agent import EdgeAgent

    return EdgeAgent.open(_state(args), on_touch=touch_prompt)


def cmd_publish(args: argparse.Namespace) -> int:
    from agent.directory.client import DirectoryClient
    from agent.directory.contact import create_contact_address
    from agent.directory.keypackage import full_name, split_name
    from agent.directory.monitor import record_published
    from agent.relationships.intros import intro_path, read_intro, save_intro
    from agent.relationships.manager import Relationships
    from policies.capability import Bundle

    if not 0 <= args.prekeys <= 200:
        raise CommandError("--prekeys: give 0 to 200 one-time prekeys")
    grant = Bundle.parse(read_input(args.grant)) if args.grant else None
    state_dir = _state(args)
    with DirectoryClient(args.directory) as client:
        info = client.info()
        namespace = str(info.get("namespace", ""))
        name = full_name(args.name, namespace) if "@" not in args.name else split_name(args.name)[0]
        rels = Relationships(_edge(args))
        edge = rels.edge
        intro_file = intro_path(state_dir, client.did, name)
        if intro_file.exists():
            held = read_intro(intro_file).held
        else:
            receiving = args.receiving or next(
                (s["url"] for s in rels.services() if s.get("role") == "receiving"), None
            )
            if receiving is None:
                raise CommandError(
                    "this owner has no receiving service for the intro address: add one with "
                    "`janus edge service add URL --role receiving`, or give --receiving URL"
                )
            held = create_contact_address(receiving, edge.root, client.did)
            save_intro(state_dir, client.did, name, held)
        answer = client.publish(
            edge.root, edge.agreement, rels.prekeys, name=name, intro=held.address,
            prekeys=args.prekeys, grant=grant,
        )  # fmt: skip
        from agent.directory.merkle import unb64

        record_published(
            state_dir, client.did, name, unb64(answer["leaf"], "leaf"), answer["leaf_index"]
        )
    answer["intro_pickup_file"] = str(intro_file)
    return emit(
        answer,
        f"published {name}: {answer['remaining']} one-time prekeys at the directory"
        + (" (binding logged)" if answer.get("logged") else ""),
        as_json=args.json,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from agent.directory.client import DirectoryClient
    from agent.directory.keypackage import full_name

    with DirectoryClient(args.directory) as client:
        name = full_name(args.name, str(client.info().get("namespace", "")))
        status = client.status(_edge(args).root, name)
    return emit(status, f"{name}: {status['remaining']} one-time prekeys left", as_json=args.json)


def cmd_withdraw(args: argparse.Namespace) -> int:
    from agent.directory.client import DirectoryClient
    from agent.directory.keypackage import full_name
    from agent.directory.merkle import unb64
    from agent.directory.monitor import record_published

    with DirectoryClient(args.directory) as client:
        name = full_name(args.name, str(client.info().get("namespace", "")))
        answer = client.withdraw(_edge(args).root, name)
        record_published(
            _state(args), client.did, name, unb64(answer["leaf"], "leaf"), answer["leaf_index"]
        )
    return emit(answer, f"withdrew {name}", as_json=args.json)


# --- claimer commands ------------------------------------------------------------------------


def lookup(args: argparse.Namespace) -> tuple[Any, Any]:
    """Claim NAME@DOMAIN and verify it: (VerifiedClaim, EdgeAgent)."""
    from agent.directory.client import DirectoryClient
    from agent.directory.keypackage import split_name
    from agent.directory.monitor import seen_heads

    name, _ = split_name(args.target)
    edge = _edge(args)
    with DirectoryClient(args.directory, did=args.directory_did) as client:
        claim = client.claim(edge.root, name, seen=seen_heads(_state(args)))
    return claim, edge


def cmd_lookup(args: argparse.Namespace) -> int:
    claim, _ = lookup(args)
    result = claim.to_dict()
    if args.out:
        write_output(args.out, json.dumps(result, indent=2, sort_keys=True).encode(), mode=0o600)
    kind = "last-resort prekey" if claim.last_resort else "one-time prekey"
    text = (
        f"{claim.name}: root {claim.package.root_did}, {kind}, "
        f"log entry {result['leaf_index']} of {result['tree_size']} (verified)"
    )
    return emit(result, text, as_json=args.json)


def cmd_attest(args: argparse.Namespace) -> int:
    from agent.directory.client import DirectoryClient, verify_attestation
    from agent.directory.keypackage import full_name

    with DirectoryClient(args.directory, did=args.directory_did) as client:
        name = full_name(args.name, str(client.info().get("namespace", "")))
        attestation = client.attest(name)
        checked = verify_attestation(attestation, directory=client.did)
    if args.out:
        write_output(args.out, attestation.encode() + b"\n")
    result = {"attestation": attestation, **checked}
    text = attestation if not args.out else f"attestation for {name} written to {args.out}"
    return emit(result, text, as_json=args.json)


def cmd_verify_attestation(args: argparse.Namespace) -> int:
    from agent.cli.output import report_invalid
    from agent.directory.client import verify_attestation
    from agent.directory.errors import DirectoryError

    text = read_input(args.file).decode("utf-8", "replace").strip()
    try:
        checked = verify_attestation(text, directory=args.directory_did)
    except DirectoryError as exc:
        return report_invalid(exc, as_json=args.json)
    return emit(
        checked,
        f"valid: {checked['name']} -> {checked['root']} (by {checked['directory']}, "
        f"until {checked['expires']})",
        as_json=args.json,
    )


def monitor_name(given: str, namespace: str) -> str:
    """NAME or NAME@DOMAIN as the full name the directory logs; another domain refused.

    A directory logs only names of its own namespace: a name of another domain is
    never in its log, so monitoring it here would report a clean log that proves nothing.
    """
    from agent.directory.errors import BadNameError
    from agent.directory.keypackage import full_name

    _, at, domain = given.partition("@")
    if at and domain != namespace:
        raise BadNameError(
            f"{given:.200} is not a name of this directory's namespace (@{namespace:.120}): "
            "monitor it at the directory of its own domain"
        )
    return full_name(given, namespace)


def cmd_monitor(args: argparse.Namespace) -> int:
    from agent.cli.output import report_invalid
    from agent.directory.client import DirectoryClient
    from agent.directory.errors import BindingNotPublishedError
    from agent.directory.monitor import HttpLogSource, monitor

    with DirectoryClient(args.directory, did=args.directory_did) as client:
        name = monitor_name(args.name, str(client.info().get("namespace", "")))
    # The edge's root signs every package this owner publishes, so an entry under that
    # root is the owner's even when its publication was never recorded in this state dir.
    owner_roots = frozenset({_edge(args).root.did})
    source = HttpLogSource(args.directory)
    try:
        report = monitor(
            source, name, _state(args), expected_key=args.directory_did, owner_roots=owner_roots
        )
    except BindingNotPublishedError as exc:
        return report_invalid(exc, as_json=args.json, entries=exc.entries)
    finally:
        source.close()
    result = report.to_dict()
    return emit(
        result,
        f"{name}: {len(report.bindings)} log entries, all published by this owner "
        f"({report.entries} entries checked)",
        as_json=args.json,
    )


def cmd_consistency(args: argparse.Namespace) -> int:
    from agent.directory.monitor import HttpLogSource, consistency_report, seen_heads

    source = HttpLogSource(args.directory)
    try:
        seen = seen_heads(Path(args.state_dir)) if args.state_dir else None
        result = consistency_report(source, args.first, args.second, seen=seen)
    finally:
        source.close()
    return emit(
        result,
        f"sizes {args.first} -> {args.second}: consistent ({len(result['proof'])} hashes)",
        as_json=args.json,
    )


def register(commands: Any) -> None:
    common, state, directory = common_options(), _state_parent(), _directory_parent()
    pin = argparse.ArgumentParser(add_help=False)
    pin.add_argument(
        "--directory-did", metavar="DID", help="pin the directory's did:key (else as it answers)"
    )
    dir_ = commands.add_parser("dir", help="directories: names, key packages, transparency")
    sub = dir_.add_subparsers(dest="dir_command", metavar="ACTION", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the directory of a namespace")
    p.add_argument("--namespace", required=True, metavar="DOMAIN", help="e.g. example.org")
    p.add_argument(
        "--key", required=True, metavar="KEY_URI", help="the directory's signing key (any key URI)"
    )
    p.add_argument("--store", metavar="URL", help="postgresql://… (default: SQLite)")
    p.add_argument(
        "--state-dir", metavar="DIR", help="where the default SQLite store lives (default: .)"
    )
    p.add_argument("--rules", metavar="FILE", help="the namespace's rules (TOML); default: open")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8710)
    p.add_argument("--public", action="store_true", help="allow a non-loopback address")
    p.add_argument(
        "--allow-extractable",
        action="store_true",
        help="accept a software (soft:) key: for tests and demos",
    )
    p.add_argument("--body-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "publish", parents=[common, state, directory], help="publish or refill a KeyPackage"
    )
    p.add_argument("--name", required=True, metavar="NAME", help="alice or alice@example.org")
    p.add_argument("--prekeys", type=int, default=50, metavar="N", help="one-time prekeys (50)")
    p.add_argument("--receiving", metavar="URL", help="receiving service for the intro address")
    p.add_argument("--grant", metavar="FILE", help="the authority's enrolment grant (bundle)")
    p.set_defaults(handler=cmd_publish)

    p = sub.add_parser(
        "status", parents=[common, state, directory], help="one-time prekeys left for a name"
    )
    p.add_argument("--name", required=True, metavar="NAME")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("withdraw", parents=[common, state, directory], help="withdraw a name")
    p.add_argument("--name", required=True, metavar="NAME")
    p.set_defaults(handler=cmd_withdraw)

    p = sub.add_parser(
        "lookup",
        parents=[common, state, directory, pin],
        help="claim a package for NAME@DOMAIN and verify it",
    )
    p.add_argument("target", metavar="NAME@DOMAIN")
    p.add_argument("--out", metavar="FILE", help="also write the verified claim here (0600)")
    p.set_defaults(handler=cmd_lookup)

    p = sub.add_parser(
        "attest", parents=[common, directory, pin], help="a signed attestation of a name"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", metavar="FILE", help="write the attestation (compact JWS) here")
    p.set_defaults(handler=cmd_attest)

    p = sub.add_parser(
        "verify-attestation", parents=[common, pin], help="verify an attestation offline"
    )
    p.add_argument("file", metavar="FILE", help="the attestation, or '-'")
    p.set_defaults(handler=cmd_verify_attestation)

    p = sub.add_parser(
        "monitor",
        parents=[common, state, directory, pin],
        help="check the log binds NAME only to what this owner published",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_monitor)

    p = sub.add_parser(
        "consistency",
        parents=[common, directory],
        help="an RFC 9162 consistency proof between two log sizes, verified",
    )
    p.add_argument("--from", dest="first", type=int, required=True, metavar="N")
    p.add_argument("--to", dest="second", type=int, required=True, metavar="M")
    p.add_argument("--state-dir", metavar="DIR", help="also check against the heads seen here")
    p.set_defaults(handler=cmd_consistency)
