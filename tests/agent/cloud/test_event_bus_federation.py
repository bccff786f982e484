"""Federation at the cloud agents: deployment B enforces A's revocations on its own bus.

Two NATS servers, each its own JetStream domain, joined by a leaf-node link; A's
cloud agent on A's bus, B's on B's, sharing no database.  B's agent holds a capability
A's owner delegated to it, so it checks A's revocation events against A's root.
``janus bus link`` makes B's stream source A's revocations; ``janus bus unlink`` stops it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hardware.nats_server import NatsServer, leaf_linked_pair
from tests.agent.cloud.bus_helpers import (
    Owner,
    code,
    pay,
    start_instance,
    until,
    wait_caught_up,
)


@pytest.fixture
def deployments(tmp_path: Path) -> Iterator[tuple[NatsServer, NatsServer]]:
    with leaf_linked_pair(tmp_path) as pair:
        yield pair


def _janus_bus(action: str, source: str, target: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "bus", action, "--from", source, "--to", target, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_a_revocation_at_deployment_a_is_enforced_by_deployment_b_until_unlinked(
    deployments: tuple[NatsServer, NatsServer], tmp_path: Path
) -> None:
    bus_a, bus_b = deployments
    owner = Owner(tmp_path / "owner-of-a")
    agent_a = start_instance(tmp_path / "agent-a", owner, bus_a.url)
    agent_b = start_instance(tmp_path / "agent-b", owner, bus_b.url)
    try:
        wait_caught_up(agent_a)
        wait_caught_up(agent_b)
        assert _janus_bus("link", bus_a.url, bus_b.url)["changed"] is True

        linked = owner.shared()
        grant_a, grant_b = owner.install(agent_a, linked), owner.install(agent_b, linked)
        assert pay(agent_a, grant_a).status_code == 200
        assert pay(agent_b, grant_b).status_code == 200

        answer = httpx.post(
            f"{agent_a.url}/v1/revocations", json={"record": owner.revocation(linked)}
        )
        assert answer.status_code == 200, answer.text
        until(
            lambda: pay(agent_b, grant_b).status_code != 200,
            timeout=15,
            what="A's revocation to reach deployment B",
        )
        assert code(pay(agent_b, grant_b)) in ("grant_inactive", "revoked")
        metrics = httpx.get(f"{agent_b.url}/metrics").text
        assert 'janus_cloud_bus_events_total{kind="revocation",outcome="applied"}' in metrics

        # Unlinked: what A revokes from now on stays in A.
        assert _janus_bus("unlink", bus_a.url, bus_b.url)["changed"] is True
        later = owner.shared()
        later_a, later_b = owner.install(agent_a, later), owner.install(agent_b, later)
        answer = httpx.post(
            f"{agent_a.url}/v1/revocations", json={"record": owner.revocation(later)}
        )
        assert answer.status_code == 200, answer.text
        assert code(pay(agent_a, later_a)) in ("grant_inactive", "revoked")
        time.sleep(2.0)  # far longer than a linked revocation takes to arrive
        assert pay(agent_b, later_b).status_code == 200
    finally:
        agent_a.stop()
        agent_b.stop()
        owner.close()
