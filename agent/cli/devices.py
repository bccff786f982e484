"""``janus device …``: an owner's several devices, each with its own keys.

The guide and the formats: docs/devices-and-groups.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    print_json,
    read_input,
    write_output,
)


def _state_parent() -> argparse.ArgumentParser:
    from agent.cli.relationships import _state_parent as state

    return state()


def _open(args: argparse.Namespace) -> Any:
    from agent.cli.edge import _state
    from agent.cli.output import touch_prompt
    from agent.sync.devices import Devices

    return Devices.open(_state(args), on_touch=touch_prompt)


def _text(argument: str) -> str:
    """A signed object given as its text (``ey…``, ``{…``), a file, or ``-`` for stdin."""
    if argument.startswith(("ey", "{")):
        return argument
    return read_input(argument).decode("ascii", "replace").strip()


def _written(args: argparse.Namespace, compact: str, result: dict[str, Any]) -> None:
    if args.out:
        write_output(args.out, compact.encode("ascii") + b"\n")
        result["out"] = args.out


def cmd_init(args: argparse.Namespace) -> int:
    devices = _open(args)
    dl = devices.init(args.name)
    result = {"owner": dl.owner, "version": dl.version, "this_device": devices.did}
    _written(args, dl.compact, result)
    text = f"device list of {dl.owner} started (version 1): this device is {args.name!r}"
    return emit(result, text, as_json=args.json)


def cmd_request(args: argparse.Namespace) -> int:
    devices = _open(args)
    request = devices.request(args.name)
    result = {
        "device": request.device,
        "agreement": request.agreement,
        "name": request.name,
        "code": request.code,
        "request": request.compact,
    }
    _written(args, request.compact, result)
    where = args.out if args.out else "the request below"
    text = (
        f"join request for {request.name!r} ({request.device})\n"
        f"code: {request.code}\n"
        f"on an existing device: janus device add {where} --code '{request.code}'"
    )
    if not args.out:
        text += f"\n{request.compact}"
    return emit(result, text, as_json=args.json)


def cmd_add(args: argparse.Namespace) -> int:
    from agent.sync.device_list import approval_document

    devices = _open(args)
    given = _text(args.request)
    if args.inbox_out and not args.approve_only:
        _check_receiving(devices)  # before the list changes: the inbox needs a service
    if given.startswith("{"):  # an approval made on another device: the root signs it
        dl = devices.add_approved(given, root_uri=args.root_key)
    elif args.code is None:
        raise CommandError("--code is required: the code the new device shows")
    elif args.approve_only:
        entry = devices.approve(given, args.code)
        document = approval_document(devices.owner(), entry)
        result: dict[str, Any] = {
            "approved": {"name": entry.name, "did": entry.did, "version": entry.version},
            "approval": json.loads(document),
        }
        if args.out:
            write_output(args.out, document.encode() + b"\n")
            result["out"] = args.out
        where = args.out or "the approval below"
        text = f"approved {entry.name!r}: on the root's device, janus device add {where}"
        if not args.out:
            text += f"\n{document}"
        return emit(result, text, as_json=args.json)
    else:
        dl = devices.add(given, args.code, root_uri=args.root_key)
    entry = dl.devices[-1]
    approver = dl.device(entry.approver)
    result = {
        "owner": dl.owner,
        "version": dl.version,
        "added": {"name": entry.name, "did": entry.did, "approver": entry.approver},
        "list": dl.compact,
    }
    _written(args, dl.compact, result)
    if args.inbox_out:
        _inbox_out(devices, entry.did, args.inbox_out)
        result["inbox_out"] = args.inbox_out
    text = (
        f"added {entry.name!r} ({entry.did}), approved by "
        f"{approver.name if approver else entry.approver!r}: device list version "
        f"{dl.version}; give the new list to every device (`janus device accept`)"
    )
    return emit(result, text, as_json=args.json)


def _check_receiving(devices: Any) -> None:
    from agent.relationships.manager import Relationships

    with Relationships(devices.edge) as rels, rels._locked():
        rels._receiving()  # NoServiceError: says how to add one


def _inbox_out(devices: Any, did: str, path: str) -> None:
    """The new device's inbox, made here (the root's device), as a file for it."""
    from agent.relationships.manager import Relationships
    from agent.sync.device_link import DeviceLink

    with Relationships(devices.edge) as rels:
        document = DeviceLink(rels).make_inbox(did)
    write_output(path, json.dumps(document).encode() + b"\n", mode=0o600)


def cmd_accept(args: argparse.Namespace) -> int:
    devices = _open(args)
    result = devices.accept(_text(args.list), owner=args.owner)
    if args.inbox is not None and result["state"] == "current":
        from agent.relationships.manager import Relationships
        from agent.sync.device_link import DeviceLink

        with Relationships(devices.edge) as rels:
            taken = DeviceLink(rels).take_inbox(read_input(args.inbox).decode("utf-8", "replace"))
        result["inbox"] = True
        for problem in taken["errors"]:
            print(f"janus: warning: {problem['message']}", file=sys.stderr)
    if result["state"] == "removed":
        print("janus: warning: this device was removed from the owner's list", file=sys.stderr)
    verb = "took" if result["changed"] else "already had"
    text = (
        f"{verb} device list version {result['version']} of {result['owner']}: "
        f"this device is {result['state']}"
    )
    return emit(result, text, as_json=args.json)


def cmd_list(args: argparse.Namespace) -> int:
    devices = _open(args)
    status = devices.status()
    if args.out and "list" in status:
        write_output(args.out, status["list"].encode("ascii") + b"\n")
        status["out"] = args.out
    if args.json:
        print_json(status)
        return 0
    if "version" not in status:
        print(f"this device ({status['this_device']}): {status['state']}")
        if "code" in status:
            print(f"code of its join request: {status['code']}")
        return 0
    print(f"owner {status['owner']}, device list version {status['version']}")
    for entry in status["devices"]:
        mark = "*" if entry["did"] == status["this_device"] else " "
        root = "  (root)" if entry["did"] == status["owner"] else ""
        print(f"{mark} {entry['name']:20}  {entry['did']}{root}")
    for entry in status["removed"]:
        print(f"  {entry['name']:20}  {entry['did']}  (removed in version {entry['removed']})")
    if status["state"] != "current":
        print(f"this device ({status['this_device']}) is {status['state']}")
    print(f"{len(status['devices'])} device(s)", file=sys.stderr)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    devices = _open(args)
    dl, entry = devices.remove(args.device, root_uri=args.root_key)
    result = {
        "owner": dl.owner,
        "version": dl.version,
        "removed": {"name": entry.name, "did": entry.did},
        "list": dl.compact,
    }
    _written(args, dl.compact, result)
    text = (
        f"removed {entry.name!r} ({entry.did}): device list version {dl.version}; "
        "give the new list to every device (`janus device accept`)"
    )
    return emit(result, text, as_json=args.json)


def cmd_reopen(args: argparse.Namespace) -> int:
    from agent.relationships.manager import Relationships
    from agent.sync.device_link import DeviceLink

    devices = _open(args)
    with Relationships(devices.edge) as rels:
        result = DeviceLink(rels).reopen(args.device or None)
    for problem in result["errors"]:
        print(f"janus: warning: {problem['message']}", file=sys.stderr)
    text = f"opened new sessions with {len(result['reopened'])} device(s)" + (
        " (some messages are queued: they go with the next command)" if result["queued"] else ""
    )
    return emit(result, text, as_json=args.json)


def register(commands: Any) -> None:
    common, state = common_options(), _state_parent()
    device = commands.add_parser("device", help="the owner's devices, each with its own keys")
    sub = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)

    root_key = argparse.ArgumentParser(add_help=False)
    root_key.add_argument(
        "--root-key",
        metavar="URI",
        help="the owner's root key, when it is not this device's key (its token plugged in)",
    )
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", metavar="FILE", help="also write the signed list to FILE")

    p = sub.add_parser(
        "init",
        parents=[common, state, out],
        help="make this device the owner's first: its key becomes the root of the list",
    )
    p.add_argument("--name", required=True, metavar="NAME", help="this device's name")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser(
        "request", parents=[common, state], help="on a new device: ask to join (prints a code)"
    )
    p.add_argument("--name", required=True, metavar="NAME", help="this device's name")
    p.add_argument("--out", metavar="FILE", help="write the join request to FILE")
    p.set_defaults(handler=cmd_request)

    p = sub.add_parser(
        "add",
        parents=[common, state, root_key, out],
        help="approve a join request; the root signs the next list",
    )
    p.add_argument(
        "request",
        metavar="REQUEST|APPROVAL",
        help="a join request (with --code), or an approval made with --approve-only on "
        "another device: a file, '-' or its text",
    )
    p.add_argument("--code", metavar="CODE", help="the code the new device shows")
    p.add_argument(
        "--approve-only",
        action="store_true",
        help="only approve here (this device lacks the root): write the approval",
    )
    p.add_argument(
        "--inbox-out",
        metavar="FILE",
        help="also make the new device's inbox at the owner's receiving service and write "
        "it to FILE, for `janus device accept --inbox` there",
    )
    p.set_defaults(handler=cmd_add)

    p = sub.add_parser(
        "accept", parents=[common, state], help="take a newer device list (or the first, to join)"
    )
    p.add_argument("list", metavar="LIST", help="the signed list: a file, '-' or its text")
    p.add_argument("--owner", metavar="DID", help="the owner's root did:key the list must have")
    p.add_argument(
        "--inbox", metavar="FILE", help="the inbox document `janus device add --inbox-out` wrote"
    )
    p.set_defaults(handler=cmd_accept)

    p = sub.add_parser(
        "list", parents=[common, state, out], help="the devices, which one is this, the version"
    )
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser(
        "reopen",
        parents=[common, state],
        help="after restoring this device from a backup: new sessions with the other devices",
    )
    p.add_argument(
        "device",
        nargs="*",
        metavar="NAME|DID",
        help="only these devices (a name of this owner's list, or any device's did:key); "
        "every other current device by default",
    )
    p.set_defaults(handler=cmd_reopen)

    p = sub.add_parser(
        "remove",
        parents=[common, state, root_key, out],
        help="a new list without the device, signed by the root",
    )
    p.add_argument("device", metavar="NAME|DID")
    p.set_defaults(handler=cmd_remove)
