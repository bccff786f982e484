"""``janus grant | invoke | verify | revoke | audit verify``: capabilities from the shell."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from agent.cli import attestation as attestation_cli
from agent.cli import fido2 as fido2_cli
from agent.cli.output import (
    CommandError,
    common_options,
    emit,
    emit_written,
    read_input,
    report_invalid,
    touch_prompt,
)
from janus_hsm import open_key
from janus_hsm.errors import JanusHSMError
from policies.abilities import Ability
from policies.approval_collection import collect_approvals
from policies.capability import Bundle
from policies.durations import parse_duration
from policies.errors import PolicyError, PolicyViolationError
from policies.invocation import invoke
from policies.issue import grant, prepare_grant
from policies.jws import strict_json
from policies.ledger import Ledger, open_ledger
from policies.ledger.base import Rate
from policies.policy import IssuancePolicy, naming_policy_file
from policies.revocation import Revocation, sign_revocation
from policies.verify import Verifier

_RATE = re.compile(r"([0-9]+)/(.+)")


def _bundle(path: str) -> Bundle:
    return Bundle.parse(read_input(path))


def _recording_ledger(url: str) -> Ledger:
    """The ledger a command records in: created if missing, and then said so on stderr
    (a mistyped path must not silently start a second, empty ledger)."""
    ledger = open_ledger(url, create=True)
    if ledger.created:
        print(f"janus: created ledger {ledger.location}", file=sys.stderr)
    return ledger


def _reading_ledger(url: str) -> Ledger:
    """The ledger a command only reads: it must exist (LedgerNotFoundError otherwise),
    since an empty one would say "nothing revoked" and "no audit entries"."""
    return open_ledger(url, create=False)


def parse_caveat_args(values: list[str]) -> tuple[Any, ...]:
    caveats: list[Any] = []
    for text in values:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--caveat {text!r} is not JSON: {exc.msg}") from None
        caveats.extend(value if isinstance(value, list) else [value])
    return tuple(caveats)


def _rate(text: str | None) -> Rate | None:
    if text is None:
        return None
    match = _RATE.fullmatch(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise CommandError(f"--rate {text!r} must look like 10/1m (uses per period)")
    return Rate(int(match.group(1)), parse_duration(match.group(2)))


def _request(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    return strict_json(read_input(path), "request")


def cmd_grant(args: argparse.Namespace) -> int:
    if args.uses <= 0:
        raise CommandError("--uses must be a positive integer")
    ability = Ability(args.resource, args.action, parse_caveat_args(args.caveat or []))
    fido2_cli.refuse_declared_approval(args.satisfied)
    policy = IssuancePolicy.load(args.policy) if args.policy else None
    proof = _bundle(args.proof) if args.proof else None
    if args.attach_attestation and proof is not None:
        raise CommandError("--attach-attestation is for root grants (no --proof)")
    request = fido2_cli.load_request(args.approval_request)
    issuer = open_key(args.issuer, allow_extractable=args.allow_extractable, on_touch=touch_prompt)
    arguments: dict[str, Any] = {
        "audience": args.to,
        "abilities": [ability],
        "ttl_seconds": parse_duration(args.ttl),
        "uses": args.uses,
        "depth": args.depth,
        "rate": _rate(args.rate),
        "proof": proof,
        "policy": policy,
        "home": args.home,
        "fresh": args.fresh,
    }
    # Prepared first (signing nothing): the policy says whether approvals are needed,
    # and approvals are over exactly these claims.  A request fixes the time and jti.
    try:
        draft = prepare_grant(
            issuer,
            **arguments,
            now=int(request.claims["iat"]) if request else None,
            jti=str(request.claims["jti"]) if request else None,
        )
    except PolicyViolationError as exc:
        if args.policy:
            raise naming_policy_file(exc, args.policy) from None
        raise PolicyViolationError(
            f"{exc} (no --policy given, so the built-in permissive policy applies: write "
            "an issuance policy and pass --policy FILE, see docs/policy.md)",
            rule=exc.rule,
        ) from None
    if request is not None and not request.same_claims(draft.claims):
        raise CommandError(
            f"{args.approval_request} was prepared for other grant arguments (or another "
            "issuer, policy or parent); run the grant with the same arguments it was made with"
        )
    approval_arguments: dict[str, Any] = {}
    if draft.decision.approvals:
        if args.approval_request_out:
            return fido2_cli.write_request(args, draft)
        approval_arguments = collect_approvals(draft, fido2_cli.approval_sources(args), request)
    elif args.approval_request_out or args.approvals or args.approval_request:
        raise CommandError(f"rule {draft.decision.rule!r} requires no approvals")
    bundle = grant(
        issuer,
        **arguments,
        satisfied=args.satisfied or (),
        now=draft.now,
        jti=draft.jti,
        evidence=attestation_cli.attestation_evidence(args, issuer) or None,
        **approval_arguments,
    )
    leaf = bundle.leaf
    if args.ledger:
        with _recording_ledger(args.ledger) as ledger:
            ledger.record_grant(
                leaf.id,
                {
                    "issuer": leaf.issuer,
                    "audience": leaf.audience,
                    "expires": leaf.expires,
                    "links": len(bundle.chain),
                },
            )
    text = bundle.to_json() + "\n"
    result = {
        "id": leaf.id,
        "issuer": leaf.issuer,
        "audience": leaf.audience,
        "principal": leaf.principal,
        "expires": leaf.expires,
        "links": len(bundle.chain),
        "bundle": json.loads(text),
        **({"out": args.out} if args.out else {}),
    }
    return emit_written(args.out, text.encode(), result, as_json=args.json)


def cmd_invoke(args: argparse.Namespace) -> int:
    bundle = _bundle(args.bundle)
    holder = open_key(args.key, allow_extractable=args.allow_extractable, on_touch=touch_prompt)
    compact = invoke(
        holder,
        capability_id=bundle.leaf.id,
        action=args.action,
        resource=args.resource,
        request=_request(args.request),
        now=int(time.time()),
        lifetime=args.lifetime,
        audience=args.audience,
    )
    result = {"invocation": compact, **({"out": args.out} if args.out else {})}
    return emit_written(args.out, (compact + "\n").encode(), result, as_json=args.json)


def cmd_verify(args: argparse.Namespace) -> int:
    now = args.at if args.at is not None else time.time()
    ledger: Ledger | None = None
    try:
        # Every failure, a missing ledger or an unreadable bundle too, is a verdict.
        ledger = _reading_ledger(args.ledger) if args.ledger else None
        verifier = Verifier(revocations=ledger, **attestation_cli.verifier_options(args))
        if args.invocation:
            invocation = read_input(args.invocation).decode("ascii", "replace").strip()
            authorization = verifier.verify(
                _bundle(args.bundle),
                invocation,
                _request(args.request),
                now=now,
                skew=args.skew,
                root=args.root,
            )
            chain = authorization.chain
        else:
            chain = verifier.verify_chain(
                _bundle(args.bundle), now=now, skew=args.skew, root=args.root
            )
    except (PolicyError, JanusHSMError, CommandError) as exc:
        return report_invalid(exc, as_json=args.json, link=getattr(exc, "link", None))
    finally:
        if ledger is not None:
            ledger.close()
    leaf = chain.leaf
    result = {
        "valid": True,
        "principal": chain.principal,
        "links": len(chain.bundle.chain),
        "leaf": {
            "id": leaf.id,
            "issuer": leaf.issuer,
            "audience": leaf.audience,
            "expires": leaf.expires,
            "abilities": [a.to_json() for a in leaf.abilities],
            "uses": leaf.limits.uses,
        },
        "invocation": bool(args.invocation),
    }
    text = f"valid: {len(chain.bundle.chain)} links rooted at {chain.principal}"
    return emit(result, text, as_json=args.json)


def cmd_revoke(args: argparse.Namespace) -> int:
    bundle = _bundle(args.bundle)
    index = len(bundle.chain) - 1 if args.link is None else args.link
    if not 0 <= index < len(bundle.chain):
        raise CommandError(f"--link must be between 0 and {len(bundle.chain) - 1}")
    issuer = open_key(args.issuer, allow_extractable=args.allow_extractable, on_touch=touch_prompt)
    target = bundle.chain[index]
    compact = sign_revocation(
        issuer, revoked_id=target.id, now=int(time.time()), reason=args.reason
    )
    record = Revocation.parse(compact)
    record.verify(bundle)  # refuse to emit a record no verifier would accept
    stored = None
    if args.ledger:
        with _recording_ledger(args.ledger) as ledger:
            stored = ledger.revoke(
                target.id,
                record=compact,
                data={"issuer": record.issuer, "link": index, "reason": args.reason},
            )
    result = {
        "revoked": target.id,
        "link": index,
        "record": compact,
        **({"newly_revoked": stored} if stored is not None else {}),
    }
    return emit_written(args.out, (compact + "\n").encode(), result, as_json=args.json)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    # An HSM service's log (docs/hsm-service.md) carries approvals and signed heads:
    # they are checked too, and said so, whenever the log has such entries.
    from agent.hsm_service.verify import verify_service_entries

    try:
        with _reading_ledger(args.ledger) as ledger:
            count = ledger.verify_audit()
            service = verify_service_entries(ledger.audit_entries(), head_key=args.head_key)
    except PolicyError as exc:  # damaged or missing ledger, broken chain: all "not valid"
        return report_invalid(exc, as_json=args.json, entry=getattr(exc, "entry", None))
    result: dict[str, Any] = {"valid": True, "entries": count}
    text = f"audit log valid: {count} entries"
    if service.service_entries or args.head_key:
        result["service"] = service.to_json()
        text += (
            f"; {service.decisions} decisions ({service.refusals} refused),"
            f" {service.approvals_verified} quorum approvals re-verified,"
            f" {service.heads} signed heads"
        )
        if service.heads:
            text += f" by {service.head_key} (the last covers entry {service.last_signed_seq}"
            text += f", {service.unsigned_tail} after it)" if service.unsigned_tail else ")"
    return emit(result, text, as_json=args.json)


def register(commands: Any) -> None:
    common = common_options()
    keyed = common_options(
        json_output=False, allow_extractable="accept a signing key that is or was extractable"
    )

    p = commands.add_parser(
        "grant", parents=[common, keyed], help="issue (or redelegate) a capability; prints a bundle"
    )
    p.add_argument("--issuer", required=True, metavar="KEY_URI", help="the signing key")
    p.add_argument("--to", required=True, metavar="DID", help="audience did:key")
    p.add_argument("--can", dest="action", required=True, metavar="ACTION")
    p.add_argument("--with", dest="resource", required=True, metavar="RESOURCE")
    p.add_argument(
        "--caveat",
        action="append",
        metavar="JSON",
        help="a caveat object or list (repeatable); see docs/caveats.md",
    )
    p.add_argument("--ttl", required=True, metavar="DURATION", help="e.g. 10m, 1h, 7d")
    p.add_argument("--uses", required=True, type=int, metavar="N")
    p.add_argument(
        "--depth",
        type=int,
        default=0,
        metavar="N",
        help="how many further redelegations are allowed (default 0)",
    )
    p.add_argument("--rate", metavar="N/PERIOD", help="at most N uses per period, e.g. 10/1m")
    p.add_argument("--policy", metavar="FILE", help="issuance policy (TOML)")
    p.add_argument("--proof", metavar="BUNDLE", help="redelegate from this bundle")
    p.add_argument(
        "--home",
        metavar="DID",
        help="the cloud-agent instance whose ledger counts the uses (lim.home; a "
        "redelegation keeps its parent's); see docs/cloud-agent.md",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="refuse uses at any cloud-agent instance whose revocation state may be stale "
        "(lim.fresh; kept by every redelegation); see docs/cloud-agent.md",
    )
    p.add_argument(
        "--satisfied",
        action="append",
        metavar="STEP",
        help="a policy requirement already fulfilled (touch); approvals cannot be declared",
    )
    p.add_argument("--ledger", metavar="URL", help="record the grant in this ledger's audit log")
    p.add_argument("--out", metavar="FILE")
    fido2_cli.add_approval_options(p)
    attestation_cli.add_attach_option(p)
    p.set_defaults(handler=cmd_grant)

    p = commands.add_parser(
        "invoke",
        parents=[common, keyed],
        help="sign an invocation of a capability with its holder key",
    )
    p.add_argument("--key", required=True, metavar="KEY_URI", help="the holder (audience) key")
    p.add_argument("--bundle", required=True, metavar="BUNDLE")
    p.add_argument("--can", dest="action", required=True, metavar="ACTION")
    p.add_argument("--with", dest="resource", required=True, metavar="RESOURCE")
    p.add_argument("--request", metavar="FILE", help="the request (JSON object); default {}")
    p.add_argument("--lifetime", type=int, default=60, metavar="SECONDS")
    p.add_argument(
        "--audience",
        metavar="DID",
        help="the verifier the invocation is for (e.g. a cloud agent's DID)",
    )
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(handler=cmd_invoke)

    p = commands.add_parser(
        "verify", parents=[common], help="verify a bundle (and an invocation) offline"
    )
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--invocation", metavar="FILE")
    p.add_argument(
        "--request",
        metavar="FILE",
        help="the invoked request (JSON object) the invocation's digest covers",
    )
    p.add_argument("--root", metavar="DID", help="require the chain to start at this key")
    p.add_argument("--ledger", metavar="URL", help="also check revocations in this ledger")
    attestation_cli.add_require_options(p)
    p.add_argument("--at", type=float, metavar="EPOCH", help="verify as of this time")
    p.add_argument("--skew", type=int, default=60, metavar="SECONDS")
    p.set_defaults(handler=cmd_verify)

    p = commands.add_parser(
        "revoke", parents=[common, keyed], help="sign a revocation of a link (default: the leaf)"
    )
    p.add_argument("--issuer", required=True, metavar="KEY_URI")
    p.add_argument("--bundle", required=True, metavar="BUNDLE")
    p.add_argument("--link", type=int, metavar="N", help="link index, 0 = root")
    p.add_argument("--reason", default="", metavar="TEXT")
    p.add_argument("--ledger", metavar="URL", help="store the revocation in this ledger")
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(handler=cmd_revoke)

    audit = commands.add_parser("audit", help="the hash-chained audit log")
    sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    p = sub.add_parser("verify", parents=[common], help="check the log from its start")
    p.add_argument("--ledger", required=True, metavar="URL")
    p.add_argument(
        "--head-key",
        metavar="DID",
        help="an HSM service's log: its heads must be signed by this did:key",
    )
    p.set_defaults(handler=cmd_audit_verify)
