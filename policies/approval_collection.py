"""Collecting the operator approvals a grant needs: from approval files and security keys.

A policy rule with ``require = ["approval"]`` makes the issuer's key sign only after M
registered approvers approved exactly the claims it will sign (policies.approvals).
Those approvals arrive as files written by ``janus fido2 approve`` on the approvers'
machines, or are asked, here and now, of the security keys connected to this machine.
Both ``janus grant`` and the edge agent's grant collect them through
:func:`collect_approvals`, with every input an explicit parameter (:class:`ApprovalSources`):
the command line only parses arguments into it.

The approver registry (``approvers.json``) and the record of used approvals live in one
registry directory (default: the platform data dir ``janus/fido2``); changes to the
registry are made under :func:`registry_lock`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from janus_hsm.fido2.devices import Fido2Device, list_devices, require_real_device
from janus_hsm.fido2.errors import Fido2RegistryError, NoDeviceError
from janus_hsm.fido2.pins import DevicePins, device_identity
from janus_hsm.file_lock import locked_file
from policies.approval_log import FILE_NAME as USED_APPROVALS
from policies.approval_log import UsedApprovals
from policies.approval_requests import ApprovalRequest, load_approval_file
from policies.approvals import (
    Approval,
    ApprovalRequestError,
    Approver,
    ApproverSet,
    request_approval,
)
from policies.errors import PolicyViolationError
from policies.issue import GrantDraft

if TYPE_CHECKING:
    from janus_hsm.fido2.authenticator import Authenticator

#: The default RP ID of approval credentials: a reserved name (RFC 2606 ``.invalid``)
#: no website can own, so no web page can ask for an approval assertion.
APPROVAL_RP_ID: Final = "approvals.janus.invalid"
APPROVERS_FILE: Final = "approvers.json"
CREDENTIALS_FILE: Final = "credentials.json"


def _quiet(message: str) -> None:
    """Where prompts go when the caller gives no ``say``: nowhere."""


@dataclass(frozen=True)
class ApprovalSources:
    """Where a grant's approvals come from and what they must be.

    ``files`` are approval files as ``(name, content)`` (the name only labels errors);
    ``from_devices`` asks the connected security keys of registered approvers for the
    approvals still missing.  ``pin`` gives each key its own PIN (never one PIN for
    several keys); ``say`` shows the "touch your key" prompts.
    """

    registry_dir: Path
    approvers_file: Path | None = None
    files: Sequence[tuple[str, bytes]] = ()
    from_devices: bool = False
    rp_id: str = APPROVAL_RP_ID
    require_uv: bool = False
    pin: DevicePins = field(default_factory=lambda: DevicePins(None))
    say: Callable[[str], None] = _quiet

    @property
    def approvers_path(self) -> Path:
        return self.approvers_file or self.registry_dir / APPROVERS_FILE

    @property
    def used_approvals_path(self) -> Path:
        return self.registry_dir / USED_APPROVALS


def open_authenticator(device: Fido2Device, **options: Any) -> Authenticator:
    # Imported on use: python-fido2's client adds ~0.15 s to every `janus` command.
    from janus_hsm.fido2.authenticator import Authenticator

    return Authenticator(device, **options)


def origin_for(rp_id: str) -> str:
    from janus_hsm.fido2.authenticator import origin_for as origin

    return origin(rp_id)


def load_approvers(path: Path) -> ApproverSet:
    """The approver registry at ``path``; none registered yet if the file is missing."""
    return ApproverSet.load(path) if path.exists() else ApproverSet()


def save_approvers(approvers: ApproverSet, path: Path) -> None:
    """Atomic replace (ApproverSet.save), creating the registry directory 0700 first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        approvers.save(path)
    except OSError as exc:
        raise Fido2RegistryError(f"cannot write {path}: {exc.strerror}") from None


@contextlib.contextmanager
def registry_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (on ``<registry>.lock``) held across a registry's
    read-modify-write, so two registrations (each waiting for a touch) or a removal
    cannot overwrite each other's change."""
    lock = path.with_name(path.name + ".lock")
    with contextlib.ExitStack() as held:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            held.enter_context(locked_file(lock))
        except OSError as exc:
            raise Fido2RegistryError(f"cannot lock {path}: {exc.strerror}") from None
        yield


def approvals_from_devices(
    claims: dict[str, Any],
    approvers: ApproverSet,
    *,
    rp_id: str,
    origin: str,
    needed: int,
    already: Sequence[str],
    pin: DevicePins,
    require_uv: bool,
    say: Callable[[str], None] = _quiet,
) -> list[Approval]:
    """Approvals from the connected keys of registered approvers, up to ``needed``.

    A refusal at any key (presence denied, timeout, PIN blocked…) is raised as its typed
    error: the grant is refused, not silently short of an approval.  Each approver's key
    gets its own PIN (``pin`` prompts per key); one fixed PIN for several keys is refused
    before any key is asked.
    """
    collected: list[Approval] = []
    done = set(already)
    devices = list_devices()
    for device in devices:
        require_real_device(device, "collecting approvals")
    if require_uv and pin.fixed:
        pin.check_one_device(
            _approving_devices(devices, approvers, rp_id=rp_id, needed=needed, done=done),
            "collecting approvals",
        )
    for device in devices:
        if len(collected) >= needed:
            break
        candidates = [a for a in approvers if a.rp_id == rp_id and a.id not in done]
        if not candidates:
            break
        auth = open_authenticator(device, pin=pin, on_touch=say)
        held = auth.holds(rp_id, [a.credential_id for a in candidates])
        if held is None:
            continue
        approver = next(a for a in candidates if a.credential_id == held)
        try:
            approval = request_approval(
                auth.client(origin),
                approver,
                claims,
                rp_id=rp_id,
                origin=origin,
                user_verification="required" if require_uv else "discouraged",
                prompt=_approval_prompt(device.name, say),
            )
        except ApprovalRequestError as exc:
            cause = exc.__cause__ or exc
            raise auth.map_error(cause, f"approval by {approver.id!r}") from None
        collected.append(approval)
        done.add(approver.id)
    if not devices and needed:
        raise NoDeviceError("no FIDO2 authenticator is connected to collect approvals from")
    return collected


def _approving_devices(
    devices: Sequence[Fido2Device],
    approvers: ApproverSet,
    *,
    rp_id: str,
    needed: int,
    done: set[str],
) -> set[str]:
    """The identities of the devices :func:`approvals_from_devices` would ask (touch-free)."""
    asked: set[str] = set()
    done = set(done)
    for device in devices:
        if len(asked) >= needed:
            break
        candidates = [a for a in approvers if a.rp_id == rp_id and a.id not in done]
        if not candidates:
            break
        held = open_authenticator(device).holds(rp_id, [a.credential_id for a in candidates])
        if held is None:
            continue
        done.add(next(a.id for a in candidates if a.credential_id == held))
        asked.add(device_identity(device))
    return asked


def _approval_prompt(device_name: str, say: Callable[[str], None]) -> Callable[[Approver], None]:
    def prompt(approver: Approver) -> None:
        say(f"approver {approver.id!r} ({device_name}): approve this grant")

    return prompt


def collect_approvals(
    draft: GrantDraft, sources: ApprovalSources, request: ApprovalRequest | None = None
) -> dict[str, Any]:
    """The approval arguments of :func:`policies.issue.grant` for a draft that needs them.

    ``request`` is the approval request prepared earlier for this draft (its RP ID and
    origin then apply).  No approval at all is a :class:`PolicyViolationError` saying
    how to collect them; whether the approvals are enough and valid is for
    :func:`policies.issue.grant` to decide, against the registry read here.
    """
    required = draft.decision.approvals
    rp_id = request.rp_id if request else sources.rp_id
    origin = request.origin if request else origin_for(rp_id)
    approvers = load_approvers(sources.approvers_path)
    approvals = [
        load_approval_file(data, name, challenge=draft.challenge) for name, data in sources.files
    ]
    if sources.from_devices:
        approvals += approvals_from_devices(
            draft.claims,
            approvers,
            rp_id=rp_id,
            origin=origin,
            needed=max(required - len({a.approver_id for a in approvals}), 0),
            already=[a.approver_id for a in approvals],
            pin=sources.pin,
            require_uv=sources.require_uv,
            say=sources.say,
        )
    if not approvals:
        raise PolicyViolationError(
            f"rule {draft.decision.rule!r} requires {required} approval(s) before the key "
            "signs, and none were given: approve with connected keys (--approver-device), or "
            "prepare a request (--approval-request-out FILE), have each approver run "
            "`janus fido2 approve --request FILE`, and grant with --approval-request FILE "
            "--approvals FILE… (docs/fido2.md)",
            rule=draft.decision.rule,
        )
    return {
        "approvals": approvals,
        "approvers": approvers,
        "approval_origin": origin,
        "approval_rp_id": rp_id,
        "approval_require_uv": sources.require_uv,
        # In the issuer's registry directory: each approval is good for one capability.
        "used_approvals": UsedApprovals(sources.used_approvals_path),
    }


def approval_request(draft: GrantDraft, sources: ApprovalSources) -> ApprovalRequest:
    """The request approvers answer with ``janus fido2 approve`` (nothing is signed)."""
    return ApprovalRequest.create(
        draft.claims,
        rp_id=sources.rp_id,
        origin=origin_for(sources.rp_id),
        required=draft.decision.approvals,
        rule=draft.decision.rule,
        approvers=load_approvers(sources.approvers_path),
    )
