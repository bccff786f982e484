"""Cloud-agent instances on one event bus, and the owner that grants to them (tests only).

Every instance is a real ``janus cloud serve --event-bus URL`` process with its own
state directory and its own SQLite ledger.  The owner is a software key here (its
hardware custody is not what these tests are about); it grants one *shared* capability
``P`` to an operator key, which the operator redelegates to one grant key per instance,
so a revocation of ``P`` concerns every instance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from agent.cloud.process import CloudProcess
from agent.protocol import KEYREQ_TYP, sign_request
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.capability import Bundle
from policies.issue import grant
from policies.policy import IssuancePolicy
from policies.revocation import sign_revocation

_permissive = IssuancePolicy.permissive()
# As the built-in policy, but allowing a capability without a use limit.
_UNLIMITED = IssuancePolicy((replace(_permissive.rules[0], max_uses=None),), source="<test>")
PAYMENTS = Ability("janus:payments/eur", "sign/payment", ({"field": "amount", "le": 10000},))


class Owner:
    """The owner's root key and an operator key it delegates through."""

    def __init__(self, directory: Path) -> None:
        self.keys = SoftwareProvider.open(
            f"soft:dir={directory}", passphrase_source=lambda: "owner", allow_extractable=True
        )
        self.root = self.keys.generate(self.keys.key_uri("root"), Algorithm.EdDSA)
        self.operator = self.keys.generate(self.keys.key_uri("operator"), Algorithm.EdDSA)

    @property
    def did(self) -> str:
        return self.root.did

    def shared(
        self,
        *,
        uses: int | None = 100,
        home: str | None = None,
        ttl: int = 600,
        fresh: bool = False,
    ) -> Bundle:
        """A capability ``P`` for the operator, which it may redelegate once."""
        return grant(
            self.root,
            audience=self.operator.did,
            abilities=[PAYMENTS],
            ttl_seconds=ttl,
            uses=uses,
            depth=1,
            home=home,
            fresh=fresh,
            policy=_UNLIMITED if uses is None else None,
        )

    def revocation(self, bundle: Bundle, *, signer: KeyHandle | None = None) -> str:
        """A revocation of ``bundle``'s leaf, by the root (or ``signer``)."""
        return sign_revocation(
            signer or self.root, revoked_id=bundle.leaf.id, now=int(time.time()), reason="test"
        )

    def install(self, instance: CloudProcess, shared: Bundle, *, uses: int | None = None) -> str:
        """A grant at ``instance`` whose chain runs through ``shared``; its grant id."""
        agent_did = httpx.get(f"{instance.url}/v1/did").json()["did"]
        request = sign_request(self.root, typ=KEYREQ_TYP, audience=agent_did, now=int(time.time()))
        created = httpx.post(f"{instance.url}/v1/grants", json={"request": request})
        created.raise_for_status()
        leaf_uses = shared.leaf.limits.uses if uses is None else uses
        child = grant(
            self.operator,
            audience=created.json()["did"],
            abilities=[PAYMENTS],
            ttl_seconds=300,
            uses=leaf_uses,
            proof=shared,
            policy=_UNLIMITED if leaf_uses is None else None,
        )
        answer = httpx.put(
            f"{instance.url}/v1/grants/{created.json()['grant_id']}/bundle",
            content=child.to_json(),
        )
        answer.raise_for_status()
        return str(created.json()["grant_id"])

    def close(self) -> None:
        self.keys.close()


def start_instance(
    state_dir: Path, owner: Owner, bus_url: str, extra: list[str] | None = None
) -> CloudProcess:
    return CloudProcess(
        state_dir, owner=owner.did, extra_args=["--event-bus", bus_url, *(extra or [])]
    )


def wait_caught_up(instance: CloudProcess, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        bus: dict[str, Any] = httpx.get(f"{instance.url}/healthz").json()["bus"]
        if bus["caught_up"]:
            return bus
        if time.monotonic() > deadline:
            raise AssertionError(f"{instance.url} did not catch up: {bus}")
        time.sleep(0.05)


def pay(instance: CloudProcess, grant_id: str, amount: int = 5) -> httpx.Response:
    return httpx.post(
        f"{instance.url}/v1/grants/{grant_id}/actions/sign/payment",
        json={"resource": "janus:payments/eur", "request": {"amount": amount}},
        timeout=30,
    )


def code(response: httpx.Response) -> str | None:
    if response.status_code == 200:
        return None
    return str(response.json()["error"]["code"])


def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Cluster:
    owner: Owner
    url: str
    instances: list[CloudProcess]

    def stop(self) -> None:
        for instance in self.instances:
            instance.stop()
