"""``janus group …`` (group conversations over relationships) and ``janus sync status``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.cli.output import CommandError, common_options, emit, print_json, read_input
from agent.cli.relationships import _state_parent


def _open(args: argparse.Namespace) -> Any:
    from agent.cli.edge import _state
    from agent.cli.output import touch_prompt
    from agent.sync.groups import Groups

    return Groups.open(_state(args), on_touch=touch_prompt)


def _warn(errors: list[dict[str, Any]]) -> None:
    for error in errors:
        print(f"janus: warning: {error['message']}", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    with _open(args) as groups:
        made = groups.create(args.name, args.member)
    if not args.json:
        _warn(made["errors"])
    names = ", ".join(m["name"] for m in made["members"])
    return emit(made, f"group {made['name']} created: {names}", as_json=args.json)


def cmd_add(args: argparse.Namespace) -> int:
    with _open(args) as groups:
        done = groups.add(args.name, args.label)
    if not args.json:
        _warn(done["errors"])
    return emit(done, f"{args.label} added to {args.name}", as_json=args.json)


def cmd_remove(args: argparse.Namespace) -> int:
    with _open(args) as groups:
        done = groups.remove(args.name, args.label)
    if not args.json:
        _warn(done["errors"])
    return emit(done, f"{args.label} removed from {args.name}", as_json=args.json)


def cmd_send(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.input is None):
        raise CommandError("give --text or --in")
    text: str | None = args.text
    data: bytes | None = None
    if args.input is not None:
        raw = read_input(args.input)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            data = raw  # sent as application/octet-stream
    with _open(args) as groups:
        sent = groups.send(args.name, text=text, data=data)
    if not args.json:
        _warn(sent["errors"])
    to = ", ".join(sent["to"]) or "no one reachable now"
    return emit(sent, f"sent {sent['id']} to {args.name} ({to})", as_json=args.json)


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as groups:
        shown = groups.show(args.name)
    if args.json:
        print_json(shown)
        return 0
    print(f"{shown['name']} ({shown['id']}), history {shown['history_hash']}")
    for item in shown["history"]:
        if "change" in item:
            print(f"  * {item['author']} {item['change']}: {', '.join(item['members'])}")
        else:
            body = item.get("text", f"<{item['content_type']}>")
            print(f"  {item['author']}: {body}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.sync.device_link import DeviceLink

    with _open(args) as groups:
        status = {"groups": groups.status(), "queued": len(groups.rels.vault.outbox())}
        devices = DeviceLink(groups.rels).status()
    if devices is not None:
        status["devices"] = devices
    if args.json:
        print_json(status)
        return 0
    if devices is not None:
        _print_devices(devices)
    for group in status["groups"]:
        state = "" if group["member"] else " (not a member)"
        print(
            f"{group['name']}{state}: {group['delivered']} delivered, {group['waiting']} "
            f"waiting, {len(group['heads'])} head(s), history {group['history_hash']}"
        )
        for peer in group["peers"]:
            print(f"  {peer['name']}: {peer['not_acknowledged']} not acknowledged")
    print(f"{status['queued']} relationship message(s) queued", file=sys.stderr)
    return 0


def _print_devices(status: dict[str, Any]) -> None:
    removed = " (removed from its owner's list)" if status.get("removed") else ""
    print(f"device {status['device']}{removed}: {status.get('queued', 0)} message(s) queued")
    for owner in status["owners"]:
        print(
            f"  {owner['name']}: list version {owner['version']}, sessions with "
            f"{len(owner['sessions'])} of {len(owner['devices'])} device(s), "
            f"{len(owner['missing'])} missing, {len(owner['ended'])} ended"
        )
    for talk in status["conversations"]:
        print(f"  conversation {talk['name']}: {talk['messages']} message(s), "
              f"history {talk['history_hash']}")  # fmt: skip


def take_sync(args: argparse.Namespace, rels: Any, report: Any) -> dict[str, Any]:
    """After ``rel receive``: apply the sync batches it found, send what is now due
    (with the same relationships object: its vault is unlocked once per process)."""
    from agent.cli.edge import _state
    from agent.sync.groups import SYNC_DIR, Groups

    if not report.sync and not (_state(args) / SYNC_DIR).is_dir():
        return {"group_messages": [], "events": [], "errors": []}
    from agent.sync.errors import SyncError

    try:
        with Groups(rels) as groups:
            taken = groups.take(report.sync)
            errors = taken.errors + groups.flush()
    except SyncError as exc:  # e.g. a device removed from its owner's list
        error = {"code": exc.code, "message": str(exc)}
        return {"group_messages": [], "events": [], "errors": [error]}
    return {"group_messages": taken.messages, "events": taken.events, "errors": errors}


def register(commands: Any) -> None:
    common, state = common_options(), _state_parent()
    group = commands.add_parser("group", help="group conversations over relationships")
    sub = group.add_subparsers(dest="group_command", metavar="ACTION", required=True)

    p = sub.add_parser("create", parents=[common, state], help="create a group")
    p.add_argument("name", metavar="NAME", help="your name for the group")
    p.add_argument(
        "--member", action="append", default=[], metavar="LABEL", help="a relationship (repeat)"
    )
    p.set_defaults(handler=cmd_create)

    p = sub.add_parser("add", parents=[common, state], help="add a member (creator only)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("label", metavar="LABEL", help="the relationship to add")
    p.set_defaults(handler=cmd_add)

    p = sub.add_parser("remove", parents=[common, state], help="remove a member (creator only)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("label", metavar="LABEL", help="the relationship to remove")
    p.set_defaults(handler=cmd_remove)

    p = sub.add_parser("send", parents=[common, state], help="send a message to a group")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--text", metavar="TEXT")
    p.add_argument("--in", dest="input", metavar="FILE", help="the message's content ('-': stdin)")
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser("show", parents=[common, state], help="a group's members and history")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_show)

    sync = commands.add_parser("sync", help="the data-sync layer's state")
    ssub = sync.add_subparsers(dest="sync_command", metavar="ACTION", required=True)
    p = ssub.add_parser(
        "status", parents=[common, state], help="per group: heads, delivered, waiting, peers"
    )
    p.set_defaults(handler=cmd_status)
