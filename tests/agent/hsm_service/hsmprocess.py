"""Helpers for the HSM service's HTTP tests: a real ``janus hsm serve`` process, clients
with administrator-granted capabilities, approvals through the service's claims."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.cloud.process import ServerProcess
from agent.hsm_service.client import HsmClient, new_nonce
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.capability import Bundle
from policies.issue import grant
from policies.ledger.base import Rate


class HsmServiceProcess(ServerProcess):
    """``janus hsm serve --config FILE --json`` on 127.0.0.1 (``port`` or a free one)."""

    def __init__(
        self, config: Path, log_dir: Path, *, port: int | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.config = config
        argv = [
            sys.executable, "-m", "agent", "hsm", "serve", "--config", str(config),
            "--port", str(port or 0), "--json", *extra,
        ]  # fmt: skip
        log_path = log_dir / f"hsm-{secrets.token_hex(4)}.log"
        super().__init__(argv, port=None, log_path=log_path, env=dict(os.environ))


ALL = Ability("*", "hsm/*")


def key_ability(label: str, action: str = "*") -> Ability:
    return Ability(f"hsm:keys/{label}", f"hsm/{action}")


def capability(
    admin: KeyHandle,
    holder: KeyHandle,
    abilities: Sequence[Ability] = (ALL,),
    *,
    uses: int = 1000,
    ttl: int = 600,
    rate: Rate | None = None,
    now: int | None = None,
) -> Bundle:
    """What an administrator grants a client (``janus grant`` does the same)."""
    return grant(
        admin,
        audience=holder.did,
        abilities=list(abilities),
        ttl_seconds=ttl,
        uses=uses,
        rate=rate,
        now=now,
    )


def client(url: str, admin: KeyHandle, holder: KeyHandle, **grant_options: Any) -> HsmClient:
    return HsmClient(url, holder, capability(admin, holder, **grant_options))


def approved(
    client_: HsmClient,
    operators: Sequence[Any],
    label: str,
    operation: str,
    body: dict[str, Any],
    *,
    lifetime: int = 300,
) -> dict[str, Any]:
    """Ask the service for the claims, have ``operators`` approve them: the quorum
    arguments of the operation (approvals, nonce, expires)."""
    request = client_.approval_request(label, operation, body, nonce=new_nonce(), lifetime=lifetime)
    approvals = [op.approve(request.claims) for op in operators]
    return {"approvals": approvals, "nonce": request.nonce, "expires": request.expires}
