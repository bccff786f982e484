"""``janus edge …``: the edge agent next to the hardware."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from agent.cli import attestation as attestation_cli
from agent.cli import fido2 as fido2_cli
from agent.cli.capabilities import parse_caveat_args
from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    print_json,
    read_input,
    report_invalid,
    touch_prompt,
    write_output,
)
from policies.abilities import Ability
from policies.durations import parse_duration
from policies.jws import strict_json


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else Path(user_data_dir("janus")) / "edge"


def _open(args: argparse.Namespace) -> Any:
    from agent.edge.agent import EdgeAgent

    return EdgeAgent.open(_state(args), on_touch=touch_prompt)


def cmd_init(args: argparse.Namespace) -> int:
    from agent.edge.agent import EdgeAgent
    from janus_hsm.algorithms import Algorithm

    edge, created = EdgeAgent.init(
        _state(args),
        args.token,
        root_algorithm=Algorithm.parse(args.root_alg),
        name=args.name,
        reuse_existing=args.reuse_existing,
        on_touch=touch_prompt,
        root_touch_policy=args.root_touch_policy,
    )
    info: dict[str, Any] = {
        "did": edge.did,
        "created": created,
        "root": edge.root.uri,
        "agreement": edge.agreement.uri,
        "state_dir": str(_state(args)),
    }
    for warning in edge.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if edge.warnings:
        info["warnings"] = edge.warnings
    verb = "created" if created else "found"
    return emit(info, f"{verb} edge identity {edge.did}", as_json=args.json)


def cmd_did(args: argparse.Namespace) -> int:
    edge = _open(args)
    document = edge.did_document()
    return emit(document, json.dumps(document, indent=2), as_json=args.json)


def cmd_grant(args: argparse.Namespace) -> int:
    fido2_cli.refuse_declared_approval(args.satisfied)
    edge = _open(args)
    if args.uses <= 0:
        raise CommandError("--uses must be a positive integer")
    caveats = parse_caveat_args(args.caveat or [])
    abilities = [Ability(args.resource, action, caveats) for action in args.action]
    result = edge.grant(
        args.cloud.rstrip("/"),
        abilities,
        ttl_seconds=parse_duration(args.ttl),
        uses=args.uses,
        depth=args.depth,
        satisfied=args.satisfied or (),
        approvals=fido2_cli.approval_sources(args),
        attest=args.attach_attestation,
    )
    return emit(result, f"granted {result['grant_id']} to {result['key']}", as_json=args.json)


def cmd_act(args: argparse.Namespace) -> int:
    request = strict_json(read_input(args.payload), "payload")
    api_token = None
    if args.api_token_file:
        api_token = read_input(args.api_token_file).decode("utf-8", "replace").strip()
    edge = _open(args)
    answer = edge.act(args.grant, args.action, request, resource=args.resource, api_token=api_token)
    _print_product(args, answer)
    uses = answer.get("uses")
    used = uses.get(edge.granted(args.grant)["capability"]) if isinstance(uses, dict) else None
    if not args.json and isinstance(used, int):
        print(f"janus: {args.action} done: use {used} of grant {args.grant}", file=sys.stderr)
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    from agent.edge.agent import invoke_delegated
    from janus_hsm import open_key
    from policies.capability import Bundle

    request = strict_json(read_input(args.payload), "payload")
    bundle = Bundle.parse(read_input(args.bundle))
    holder = open_key(args.key, allow_extractable=args.allow_extractable, on_touch=touch_prompt)
    answer = invoke_delegated(
        args.cloud.rstrip("/"), bundle, holder, args.action, request, resource=args.resource
    )
    _print_product(args, answer)
    return 0


def _print_product(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    """What an action produced, in the form the next command reads: evidence for `janus
    edge verify`, a bundle for `janus verify` / `janus invoke`, else the answer itself;
    to --out if given, and on stdout without --out or with --json."""
    if "evidence" in answer:
        product = answer["evidence"]
    elif "bundle" in answer:
        product = answer["bundle"]
    else:
        product = {k: v for k, v in answer.items() if k != "uses"}
    text = json.dumps(product, indent=2, sort_keys=True) + "\n"
    if args.out:
        write_output(args.out, text.encode())
    if args.json or not args.out:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.out}")


def cmd_grants(args: argparse.Namespace) -> int:
    edge = _open(args)
    listed = edge.grants(refresh=args.refresh)
    if args.json:
        print_json(listed)
        return 0
    for g in listed:
        if g["state"] == "unreadable":
            print(f"{g['grant_id']}  unreadable record")
            continue
        abilities = ", ".join(f"{a['can']} on {a['with']}" for a in g["abilities"])
        uses = g["uses"]
        used = "?" if uses["used"] is None else uses["used"]
        limit = "unlimited" if uses["limit"] is None else uses["limit"]
        expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(g["expires"]))
        print(
            f"{g['grant_id']}  {g['state']:8}  {abilities}  uses {used}/{limit}  "
            f"expires {expires}  {g['cloud']}"
        )
    print(f"{len(listed)} grant(s)", file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    edge = _open(args)
    result = edge.revoke(args.grant, reason=args.reason)
    return emit(result, f"revoked {result['revoked']}", as_json=args.json)


def cmd_pickup(args: argparse.Namespace) -> int:
    edge = _open(args)
    messages = edge.pickup(args.cloud.rstrip("/"))
    if args.json:
        print_json(messages)
    else:
        for item in messages:
            if "error" in item:
                print(
                    f"janus: could not open message {item['id']}: {item['error']}", file=sys.stderr
                )
            else:
                print(json.dumps(item["message"], indent=2))
        print(f"{len(messages)} message(s) picked up", file=sys.stderr)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    import httpx

    from agent.didcomm import Message, pack_anoncrypt, wrap_forward

    body = strict_json(read_input(args.input), "message body")
    routing_keys, endpoint = args.routing_key or [], args.endpoint
    if args.cloud_did and not args.cloud:
        raise CommandError("--cloud-did goes with --cloud")
    if args.cloud:
        if routing_keys:
            raise CommandError("give --cloud or --routing-key, not both")
        cloud = args.cloud.rstrip("/")
        routing_keys = [_cloud_routing_key(cloud, args.cloud_did)]
        endpoint = endpoint or f"{cloud}/v1/didcomm"
    message = Message(id=str(uuid.uuid4()), type=args.type, body=body, to=(args.to,))
    envelope = pack_anoncrypt(message, [args.to])
    if routing_keys:
        envelope = wrap_forward(envelope, to=args.to, routing_keys=routing_keys)
    if args.out:
        write_output(args.out, envelope.encode())
        return emit({"id": message.id, "out": args.out}, f"wrote {args.out}", as_json=args.json)
    if not endpoint:
        raise CommandError("give --cloud URL, --endpoint URL or --out FILE")
    response = httpx.post(
        endpoint,
        content=envelope.encode(),
        timeout=30.0,
        headers={"content-type": "application/didcomm-encrypted+json"},
    )
    if response.status_code >= 300:
        raise CommandError(f"{endpoint} answered {response.status_code}: {response.text}")
    result = {"id": message.id, "status": response.status_code}
    return emit(result, f"delivered {message.id}", as_json=args.json)


def _cloud_routing_key(cloud: str, agent: str | None) -> str:
    """The routing key a cloud agent names at ``GET /v1/did``, once its signature checks
    out: signed by the agent's did:key (``agent``, if given, must be that did)."""
    import httpx

    from agent.protocol import check_routing_key

    try:
        response = httpx.get(f"{cloud}/v1/did", timeout=30.0)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach the cloud agent at {cloud}: {exc}") from None
    if response.status_code != 200:
        raise CommandError(f"{cloud}/v1/did answered {response.status_code}")
    answer = strict_json(response.content, f"{cloud}/v1/did answer")
    return check_routing_key(answer, agent=agent)[1]


def cmd_receive(args: argparse.Namespace) -> int:
    from agent.didcomm import unpack

    edge = _open(args)
    unpacked = unpack(read_input(args.input), edge.agreement_keys())
    result = {"message": unpacked.message.to_dict(), "metadata": unpacked.metadata.as_dict()}
    return emit(result, json.dumps(result["message"], indent=2), as_json=args.json)


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.evidence import verify_evidence
    from janus_hsm.errors import JanusHSMError
    from policies.errors import PolicyError
    from policies.verify import Verifier

    try:
        # Every failure, an unreadable or malformed file too, is a verdict.
        evidence = strict_json(read_input(args.evidence), "evidence")
        verifier = Verifier(**attestation_cli.verifier_options(args))
        verified = verify_evidence(evidence, root=args.root, verifier=verifier)
    except (PolicyError, JanusHSMError, CommandError) as exc:
        return report_invalid(exc, as_json=args.json)
    result = {
        "valid": True,
        "principal": verified.principal,
        "signer": verified.signer,
        "holder": verified.holder,
        "action": verified.action,
        "resource": verified.resource,
        "used_at": verified.used_at,
        "payload": dict(verified.payload),
    }
    return emit(
        result,
        f"valid: {verified.action} signed by {verified.signer}, authorised by {verified.principal}",
        as_json=args.json,
    )


def register(commands: Any) -> None:
    common = common_options()
    keyed = common_options(
        json_output=False, allow_extractable="accept a holder key that is or was extractable"
    )
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        metavar="DIR",
        help="edge agent state (default: the platform's data dir)/janus/edge",
    )

    edge = commands.add_parser("edge", help="the edge agent (root identity in hardware)")
    sub = edge.add_subparsers(dest="edge_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "init", parents=[common, state], help="create the root identity on a token (idempotent)"
    )
    p.add_argument(
        "--token",
        required=True,
        metavar="TOKEN_URI",
        help="e.g. pkcs11:token=janus?pin-source=file:/path, or piv:serial=12345678 "
        "(root in slot 9c or the URI's slot=, agreement key in 9d)",
    )
    p.add_argument(
        "--root-alg",
        default="ES256",
        choices=["ES256", "ES384", "EdDSA"],
        help="the root (signing) key's algorithm (default ES256; EdDSA on a YubiKey needs "
        "firmware 5.7+)",
    )
    p.add_argument(
        "--name",
        default="edge",
        help="label prefix of the keys on a PKCS#11 token (default: edge); PIV slots have "
        "no labels",
    )
    p.add_argument(
        "--reuse-existing",
        action="store_true",
        help="piv: adopt keys already in the root / agreement slots instead of refusing",
    )
    p.add_argument(
        "--root-touch-policy",
        metavar="POLICY",
        help="piv: the new root slot's touch policy: never | always | cached (default: the "
        "slot's, never). 'always' makes the card enforce a policy's touch requirement",
    )
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("did", parents=[common, state], help="print the DID document")
    p.set_defaults(handler=cmd_did)

    p = sub.add_parser(
        "grant",
        parents=[common, state],
        help="get a fresh key from a cloud agent and grant it a capability",
    )
    p.add_argument("--cloud", required=True, metavar="URL")
    p.add_argument(
        "--can",
        dest="action",
        action="append",
        required=True,
        metavar="ACTION",
        help="repeatable: several actions on the one resource (e.g. sign/payment and "
        "cap/delegate); caveats apply to each",
    )
    p.add_argument("--with", dest="resource", required=True, metavar="RESOURCE")
    p.add_argument("--caveat", action="append", metavar="JSON")
    p.add_argument("--ttl", required=True, metavar="DURATION")
    p.add_argument("--uses", required=True, type=int, metavar="N")
    p.add_argument("--depth", type=int, default=0, metavar="N")
    p.add_argument(
        "--satisfied", action="append", metavar="STEP", help="e.g. touch; never approval"
    )
    fido2_cli.add_approval_options(p, offline=False)
    attestation_cli.add_attach_option(p)
    p.set_defaults(handler=cmd_grant, approvals=None)

    p = sub.add_parser(
        "act",
        parents=[common, state],
        help="have the cloud agent act under a grant (sign, send, redelegate…); prints "
        "the evidence for `janus edge verify`",
    )
    p.add_argument("--grant", required=True, metavar="GRANT_ID")
    p.add_argument(
        "--action",
        required=True,
        metavar="ACTION",
        help="sign/<purpose>, msg/send, msg/receive or cap/delegate (docs/cloud-agent.md)",
    )
    p.add_argument(
        "--payload",
        required=True,
        metavar="FILE",
        help="the request (JSON object; '-' for stdin): what to sign, the message, …",
    )
    p.add_argument(
        "--resource",
        metavar="RESOURCE",
        help="default: the grant's resource, when it has exactly one",
    )
    p.add_argument("--out", metavar="FILE", help="write the evidence (or bundle) here")
    p.add_argument(
        "--api-token-file",
        metavar="FILE",
        help="the cloud agent's API token, if it was started with one",
    )
    p.set_defaults(handler=cmd_act)

    p = sub.add_parser(
        "invoke",
        parents=[common, keyed],
        help="as the holder of a capability a cloud agent delegated, have that agent act",
    )
    p.add_argument("--cloud", required=True, metavar="URL")
    p.add_argument(
        "--bundle", required=True, metavar="BUNDLE", help="from `edge act … cap/delegate`"
    )
    p.add_argument("--key", required=True, metavar="KEY_URI", help="the holder (audience) key")
    p.add_argument("--action", required=True, metavar="ACTION")
    p.add_argument("--payload", required=True, metavar="FILE", help="the request (JSON object)")
    p.add_argument(
        "--resource", metavar="RESOURCE", help="default: the bundle's resource, if only one"
    )
    p.add_argument("--out", metavar="FILE", help="write the evidence here")
    p.set_defaults(handler=cmd_invoke)

    p = sub.add_parser("grants", parents=[common, state], help="list the grants this owner issued")
    p.add_argument(
        "--refresh", action="store_true", help="also ask each cloud agent for the grant's status"
    )
    p.set_defaults(handler=cmd_grants)

    p = sub.add_parser("revoke", parents=[common, state], help="revoke a grant at once")
    p.add_argument("--grant", required=True, metavar="GRANT_ID")
    p.add_argument("--reason", default="", metavar="TEXT")
    p.set_defaults(handler=cmd_revoke)

    p = sub.add_parser(
        "pickup", parents=[common, state], help="fetch and decrypt messages the cloud agent held"
    )
    p.add_argument("--cloud", required=True, metavar="URL")
    p.set_defaults(handler=cmd_pickup)

    p = sub.add_parser(
        "send", parents=[common], help="encrypt a message to a DID and deliver it (HTTP or file)"
    )
    p.add_argument("--to", required=True, metavar="DID")
    p.add_argument(
        "--in", dest="input", required=True, metavar="FILE", help="the message body (JSON object)"
    )
    p.add_argument("--type", default="https://janus.dev/messages/1.0/note")
    p.add_argument(
        "--cloud",
        metavar="URL",
        help="leave it with the recipient's cloud agent: its routing key (signed by the "
        "agent, checked) from URL/v1/did, delivered to URL/v1/didcomm",
    )
    p.add_argument(
        "--cloud-did",
        metavar="DID",
        help="with --cloud: the agent's did:key, which the answer must name",
    )
    p.add_argument("--endpoint", metavar="URL")
    p.add_argument(
        "--routing-key",
        action="append",
        metavar="DID",
        help="wrap in a forward for this mediator key (repeatable, in order)",
    )
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser(
        "receive",
        parents=[common, state],
        help="decrypt a message from a file with the token's keys",
    )
    p.add_argument("--in", dest="input", required=True, metavar="FILE")
    p.set_defaults(handler=cmd_receive)

    p = sub.add_parser(
        "verify", parents=[common], help="verify a cloud agent's evidence offline, back to the root"
    )
    p.add_argument("evidence", metavar="EVIDENCE")
    p.add_argument("--root", metavar="DID", help="require this root principal")
    attestation_cli.add_require_options(p)
    p.set_defaults(handler=cmd_verify)

    from agent.cli.relationships import register_service

    register_service(sub)
