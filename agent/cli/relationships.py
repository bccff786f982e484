"""``janus rel …`` (relationships) and ``janus edge service …`` (the owner's services)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    print_json,
    read_input,
    write_output,
)
from policies.durations import parse_duration


def _state_parent() -> argparse.ArgumentParser:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        metavar="DIR",
        help="edge agent state (default: the platform's data dir)/janus/edge",
    )
    return state


def _open(args: argparse.Namespace) -> Any:
    from agent.cli.edge import _state
    from agent.cli.output import touch_prompt
    from agent.relationships.manager import Relationships

    return Relationships.open(_state(args), on_touch=touch_prompt)


# --- janus edge service ------------------------------------------------------------------


def cmd_service_add(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)
    if args.uses <= 0:
        raise CommandError("--uses must be a positive integer")
    api_token = None
    if args.api_token_file:
        api_token = read_input(args.api_token_file).decode("utf-8", "replace").strip()
    with _open(args) as rels:
        added = rels.add_service(
            args.url, args.role, uses=args.uses, ttl_seconds=ttl, api_token=api_token
        )
    what = "intro address created" if args.role == "receiving" else f"grant {added['grant_id']}"
    return emit(added, f"added {args.role} service {added['url']} ({what})", as_json=args.json)


def cmd_service_list(args: argparse.Namespace) -> int:
    with _open(args) as rels:
        listed = rels.services()
    if args.json:
        print_json(listed)
        return 0
    for service in listed:
        print(f"{service['role']:9}  {service['url']}")
    print(f"{len(listed)} service(s)", file=sys.stderr)
    return 0


# --- janus rel ---------------------------------------------------------------------------


def cmd_invite(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)
    with _open(args) as rels:
        invitation = rels.invite(args.name, ttl_seconds=ttl)
    uri = invitation.to_uri()
    result: dict[str, Any] = {
        "name": args.name,
        "id": invitation.id,
        "expires": invitation.expires,
        "uri": uri,
    }
    if args.out:
        write_output(args.out, invitation.to_file(), mode=0o600)
        result["out"] = args.out
    if args.qr_png:
        result["qr_png"] = [str(p) for p in invitation.qr_png(Path(args.qr_png))]
    if args.json:
        print_json(result)
        return 0
    if args.qr:
        sys.stdout.write(invitation.qr_terminal())
    if not args.out:
        print(uri)
    else:
        print(f"wrote {args.out}: give it to {args.name}; it expires at {invitation.expires}")
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    from agent.relationships.invitation import Invitation

    text = args.invitation
    data = text.encode() if text.startswith("janus:") else read_input(text)
    invitation = Invitation.parse(data)
    with _open(args) as rels:
        result = rels.accept(invitation, args.name)
    return emit(
        result, f"relationship {args.name!r} with {result['peer']} started", as_json=args.json
    )


def cmd_request(args: argparse.Namespace) -> int:
    """Claim NAME@DOMAIN's package (verified as ``janus dir lookup`` does) and start the
    relationship with a first message straight to its intro address."""
    from agent.cli.directory import lookup
    from agent.directory.contact import deliver_first_contact
    from agent.relationships.manager import Relationships

    claim, edge = lookup(args)
    label = args.label or claim.name

    def deliver(wire: bytes) -> None:
        deliver_first_contact(edge.root, claim.contact, claim.package.intro, wire)

    with Relationships(edge) as rels:
        result = rels.request(
            label, claim.bundle(), name=claim.name, directory=claim.package.directory,
            deliver=deliver,
        )  # fmt: skip
    result["last_resort"] = claim.last_resort
    return emit(
        result,
        f"relationship {label!r} with {claim.name} ({result['peer']}) requested: "
        "`janus rel receive` shows their answer",
        as_json=args.json,
    )


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as rels:
        listed = rels.list()
    if args.json:
        print_json(listed)
        return 0
    for rel in listed:
        print(f"{rel['name']:20}  {rel['state']:18}  {rel.get('peer', '')}")
    print(f"{len(listed)} relationship(s)", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as rels:
        shown = rels.show(args.name)
    text = (
        f"{shown['name']}: {shown['state']}, peer {shown['peer']}\n"
        f"safety number (compare in person):\n  {shown['safety_number']}\n"
        f"sent {shown['sent']}, received {shown['received']}"
    )
    return emit(shown, text, as_json=args.json)


def cmd_send(args: argparse.Namespace) -> int:
    from agent.didcomm.errors import DIDCommError
    from agent.didcomm.message import Message
    from agent.relationships.manager import BadMessageInputError
    from policies.jws import strict_json

    message = None
    if args.input is not None:
        obj = strict_json(read_input(args.input), "the message")
        if not isinstance(obj.get("type"), str):
            raise BadMessageInputError(f"{args.input}: a DIDComm message needs a 'type' URI")
        if "id" not in obj:
            fresh = Message.new(obj["type"])
            obj = {"id": fresh.id, "created_time": fresh.created_time, **obj}
        try:
            message = Message.from_dict(obj)
        except DIDCommError as exc:
            raise BadMessageInputError(f"{args.input}: not a DIDComm message: {exc}") from None
    if args.thid and message is None:
        from dataclasses import replace

        from agent.relationships.manager import TEXT_TYPE

        message = replace(Message.new(TEXT_TYPE, {"text": args.text}), thid=args.thid)
    from agent.relationships.manager import TEXT_TYPE
    from agent.sync.device_link import DeviceLink

    with _open(args) as rels:
        if message is None:
            message = Message.new(TEXT_TYPE, {"text": args.text})
        # With devices on both sides, once per device-pair session; else as before.
        result = DeviceLink(rels).send(args.name, message)
        if result is None:
            result = rels.send(args.name, message)
    return emit(result, f"sent {result['id']} to {args.name}", as_json=args.json)


def cmd_history(args: argparse.Namespace) -> int:
    from agent.sync.device_link import DeviceLink

    with _open(args) as rels:
        link = DeviceLink(rels)
        if not link.enabled():
            raise CommandError("this owner has no device list: see `janus rel show LABEL`")
        with rels._locked():
            history = link.history_of(args.name)
    lines = [
        f"{h['name']}: {h['message'].get('body', {}).get('text', h['message']['type'])}"
        for h in history
    ]
    return emit({"history": history}, "\n".join(lines), as_json=args.json)


def cmd_receive(args: argparse.Namespace) -> int:
    from agent.cli.groups import take_sync
    from agent.sync.device_link import DeviceLink

    with _open(args) as rels:
        report = rels.receive()
        # Device-pair messages (this owner's devices and its peers'), if it has devices.
        DeviceLink(rels).receive(report)
        # Group and sync batches go to the sync layer: a crash before they are applied
        # loses them (the vault has taken their ciphertexts), and the sync layer's
        # offers and requests bring what they carried again.
        groups = take_sync(args, rels, report)
    report.events += groups["events"]
    report.errors += groups["errors"]
    if args.json:
        print_json({**report.to_dict(), "group_messages": groups["group_messages"]})
    else:
        for item in groups["group_messages"]:
            shown = item.get("text", f"<{item['content_type']}, {len(item['data'])} base64>")
            print(f"[{item['group']}] {item['author']}: {shown}")
        for item in report.messages:
            message = item["message"]
            body = message.get("body", {})
            text = body.get("text") if isinstance(body, dict) else None
            shown = text if isinstance(text, str) else json.dumps(message, sort_keys=True)
            print(f"{item['name']}: {shown}")
        for event in report.events:
            details = ", ".join(f"{k}={v}" for k, v in event.items() if k != "event")
            print(f"janus: {event['event']}: {details}", file=sys.stderr)
        for error in report.errors:
            print(f"janus: warning: {error['message']}", file=sys.stderr)
        count = len(report.messages) + len(groups["group_messages"])
        print(f"{count} message(s)", file=sys.stderr)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    every_seconds = _duration_or_zero(args.every)
    grace = _duration_or_zero(args.grace)
    with _open(args) as rels:
        result = rels.rotate(
            args.name,
            every_messages=args.every_messages,
            every_seconds=every_seconds,
            grace_seconds=grace,
            reestablish=args.reestablish,
        )
    if "rotation" in result:
        text = f"{args.name}: rotation policy {result['rotation']}"
    elif result.get("reestablished"):
        text = f"{args.name}: a new session was started (epoch {result['epoch']})"
    else:
        text = f"{args.name}: new address announced; the old one retires once confirmed"
    return emit(result, text, as_json=args.json)


def _duration_or_zero(text: str | None) -> int | None:
    """A duration option where ``0`` means "never" (``--every``) or "at once" (``--grace``)."""
    if text is None:
        return None
    return 0 if text == "0" else parse_duration(text)


def cmd_block(args: argparse.Namespace) -> int:
    with _open(args) as rels:
        result = rels.block(args.name)
    for problem in result.get("not_retired", []):
        print(f"janus: warning: {problem}", file=sys.stderr)
    return emit(
        result, f"{args.name}: blocked; {result['retired']} address(es) retired", as_json=args.json
    )


def register_service(sub: Any) -> None:
    """``janus edge service add | list`` (called by the ``edge`` command's registration)."""
    common, state = common_options(), _state_parent()
    service = sub.add_parser("service", help="the owner's receiving and sending services")
    actions = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "add",
        parents=[common, state],
        help="add a receiving service (creates the intro address) or a sending service "
        "(grants it msg/submit)",
    )
    p.add_argument("url", metavar="URL")
    p.add_argument("--role", required=True, choices=["receiving", "sending"])
    p.add_argument(
        "--uses", type=int, default=10000, metavar="N", help="sending: submissions allowed"
    )
    p.add_argument("--ttl", default="30d", metavar="DURATION", help="sending: grant lifetime")
    p.add_argument(
        "--api-token-file", metavar="FILE", help="sending: the service's API token, if it has one"
    )
    p.set_defaults(handler=cmd_service_add)
    p = actions.add_parser("list", parents=[common, state], help="list the owner's services")
    p.set_defaults(handler=cmd_service_list)


def register(commands: Any) -> None:
    common, state = common_options(), _state_parent()
    rel = commands.add_parser("rel", help="relationships: invitations, messages, addresses")
    sub = rel.add_subparsers(dest="rel_command", metavar="ACTION", required=True)

    p = sub.add_parser("invite", parents=[common, state], help="make an invitation for one person")
    p.add_argument("--name", required=True, metavar="LABEL", help="your name for the invitee")
    p.add_argument("--out", metavar="FILE", help="write the invitation file here")
    p.add_argument("--qr", action="store_true", help="draw it as a QR code in the terminal")
    p.add_argument("--qr-png", metavar="FILE", help="write it as a QR code PNG")
    p.add_argument("--ttl", default="7d", metavar="DURATION", help="valid for (default 7d)")
    p.set_defaults(handler=cmd_invite)

    p = sub.add_parser("accept", parents=[common, state], help="accept an invitation")
    p.add_argument("invitation", metavar="INVITATION", help="a file, '-' or a janus: URI")
    p.add_argument("--name", required=True, metavar="LABEL", help="your name for the inviter")
    p.set_defaults(handler=cmd_accept)

    p = sub.add_parser(
        "request",
        parents=[common, state],
        help="start a relationship with NAME@DOMAIN from its directory (no invitation)",
    )
    p.add_argument("target", metavar="NAME@DOMAIN")
    p.add_argument("--directory", required=True, metavar="URL", help="the name's directory")
    p.add_argument(
        "--directory-did", metavar="DID", help="pin the directory's did:key (else as it answers)"
    )
    p.add_argument(
        "--name", dest="label", metavar="LABEL", help="your name for them (default: NAME@DOMAIN)"
    )
    p.set_defaults(handler=cmd_request)

    p = sub.add_parser("list", parents=[common, state], help="list relationships and invitations")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("show", parents=[common, state], help="a relationship and its safety number")
    p.add_argument("name", metavar="LABEL")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("send", parents=[common, state], help="send a message")
    p.add_argument("name", metavar="LABEL")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", metavar="TEXT")
    what.add_argument(
        "--in", dest="input", metavar="FILE", help="a DIDComm plaintext message (JSON; any type)"
    )
    p.add_argument("--thid", metavar="ID", help="with --text: the thread it answers")
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser(
        "history",
        parents=[common, state],
        help="with devices: a conversation as every device of this owner keeps it",
    )
    p.add_argument("name", nargs="?", metavar="LABEL|DID", help="one peer (default: all)")
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser(
        "receive", parents=[common, state], help="pick up, decrypt, store and print messages"
    )
    p.set_defaults(handler=cmd_receive)

    p = sub.add_parser(
        "rotate", parents=[common, state], help="rotate the address the peer sends to"
    )
    p.add_argument("name", metavar="LABEL")
    p.add_argument(
        "--every-messages", type=int, metavar="N", help="set: rotate after N messages (0: never)"
    )
    p.add_argument("--every", metavar="DURATION", help="set: rotate after this long (0: never)")
    p.add_argument(
        "--grace",
        metavar="DURATION",
        help="set: keep picking up from a replaced address this long after the peer "
        "confirmed the new one (0: retire it at the next receive)",
    )
    p.add_argument(
        "--reestablish",
        action="store_true",
        help="start a new session with the peer's stored keys (a wedged session)",
    )
    p.set_defaults(handler=cmd_rotate)

    p = sub.add_parser("block", parents=[common, state], help="retire every address the peer knows")
    p.add_argument("name", metavar="LABEL")
    p.set_defaults(handler=cmd_block)
