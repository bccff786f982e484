"""Three cloud-agent processes on one event bus (PostgreSQL and NATS JetStream).

Each instance has its own state directory and its own SQLite ledger: what they agree
on travels over the bus only.  A revocation posted at one instance is enforced at the
others; an instance that was away catches up before it serves a use; a capability
with a home ledger is counted exactly once across instances, under concurrency.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from agent.cloud.process import CloudProcess
from hardware.nats_server import NatsServer, NatsUnavailable
from tests.agent.bus.conftest import drop_schema, new_schema, with_schema
from tests.agent.cloud.bus_helpers import (
    Cluster,
    Owner,
    code,
    pay,
    start_instance,
    until,
    wait_caught_up,
)


@pytest.fixture(scope="module", params=["postgresql", "nats"])
def bus_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema = new_schema(dsn)
        try:
            yield with_schema(dsn, schema)
        finally:
            drop_schema(dsn, schema)
        return
    server = NatsServer(store=tmp_path_factory.mktemp("nats"))
    try:
        server.start()
    except NatsUnavailable as exc:
        pytest.fail(f"cannot start nats-server: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(bus_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    owner = Owner(tmp_path_factory.mktemp("owner"))
    instances = []
    try:
        for name in ("a", "b", "c"):
            # b and c forward uses to a's home ledger: ample time for its answer on a
            # busy machine (the default is 2 s).
            extra = [] if name == "a" else ["--home-timeout", "10"]
            instances.append(
                start_instance(tmp_path_factory.mktemp(f"cloud-{name}"), owner, bus_url, extra)
            )
        for instance in instances:
            wait_caught_up(instance)
        yield Cluster(owner, bus_url, instances)
    finally:
        for instance in instances:
            instance.stop()
        owner.close()


def did_of(instance: CloudProcess) -> str:
    return str(httpx.get(f"{instance.url}/v1/did").json()["did"])


def test_a_revocation_posted_at_one_instance_is_enforced_at_every_other(
    cluster: Cluster,
) -> None:
    a, b, c = cluster.instances
    shared = cluster.owner.shared()
    grants = [cluster.owner.install(instance, shared) for instance in (a, b, c)]
    for instance, grant_id in zip((a, b, c), grants, strict=True):
        assert pay(instance, grant_id).status_code == 200

    answer = httpx.post(
        f"{a.url}/v1/revocations", json={"record": cluster.owner.revocation(shared)}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["published"] is True
    assert answer.json()["destroyed"] == [grants[0]]

    for instance, grant_id in ((b, grants[1]), (c, grants[2])):
        until(
            lambda i=instance, g=grant_id: pay(i, g).status_code != 200,  # type: ignore[misc]
            what="the revocation to reach the other instance",
        )
        refused = pay(instance, grant_id)
        assert code(refused) in ("grant_inactive", "revoked"), refused.text
        status = httpx.get(f"{instance.url}/v1/grants/{grant_id}").json()
        assert (status["status"], status["reason"]) == ("destroyed", "revoked")
    metrics = httpx.get(f"{b.url}/metrics").text
    assert 'janus_cloud_bus_events_total{kind="revocation",outcome="applied"}' in metrics
    # Uses and destroyed keys are published too (for monitoring), and reach the others.
    published = httpx.get(f"{a.url}/metrics").text
    assert 'janus_cloud_bus_events_total{kind="use",outcome="published"}' in published
    assert 'janus_cloud_bus_events_total{kind="key-destroyed",outcome="published"}' in published
    until(
        lambda: 'kind="key-destroyed",outcome="received"' in httpx.get(f"{c.url}/metrics").text,
        what="the key-destroyed event to reach another instance",
    )


def test_an_instance_away_during_a_revocation_catches_up_before_serving(
    cluster: Cluster, tmp_path: Path
) -> None:
    _, b, c = cluster.instances
    shared = cluster.owner.shared()
    grant_b, grant_c = (cluster.owner.install(i, shared) for i in (b, c))
    assert pay(c, grant_c).status_code == 200
    c.stop()
    answer = httpx.post(
        f"{b.url}/v1/revocations", json={"record": cluster.owner.revocation(shared)}
    )
    assert answer.status_code == 200, answer.text

    restarted = start_instance(c.state_dir, cluster.owner, cluster.url)
    cluster.instances[2] = restarted
    # From its very first answer on, the restarted instance never serves the revoked
    # grant: it refuses uses while catching up, then knows of the revocation.
    first = pay(restarted, grant_c)
    assert code(first) in ("catching_up", "grant_inactive", "revoked"), first.text
    bus = wait_caught_up(restarted)
    assert bus["catch_up_seconds"] <= 5.0
    assert code(pay(restarted, grant_c)) in ("grant_inactive", "revoked")
    assert code(pay(b, grant_b)) in ("grant_inactive", "revoked")

    # An instance that joins later still knows: a grant under the revoked link is
    # refused at installation.
    late = start_instance(tmp_path / "late", cluster.owner, cluster.url)
    try:
        wait_caught_up(late)
        with pytest.raises(httpx.HTTPStatusError) as refused:
            cluster.owner.install(late, shared)
        assert refused.value.response.json()["error"]["code"] == "revoked"
    finally:
        late.stop()


def test_a_home_ledger_counts_uses_from_every_instance_exactly(cluster: Cluster) -> None:
    a, b, c = cluster.instances
    shared = cluster.owner.shared(uses=7, home=did_of(a))
    grants = [(i, cluster.owner.install(i, shared)) for i in (a, b, c)]

    def use(n: int) -> httpx.Response:
        instance, grant_id = grants[n % 3]
        return pay(instance, grant_id, amount=n)

    with ThreadPoolExecutor(max_workers=9) as pool:
        answers = list(pool.map(use, range(30)))
    served = [r for r in answers if r.status_code == 200]
    assert len(served) == 7, [(r.status_code, r.text[:200]) for r in answers]
    refusals = {code(r) for r in answers if r.status_code != 200}
    assert refusals <= {"uses_exhausted", "grant_inactive"}, [r.text for r in answers]
    # Uses at b and c were counted at a, the home: their receipts carry a's count.
    assert max(r.json()["uses"][shared.leaf.id] for r in served) == 7


def test_a_home_that_does_not_answer_refuses_the_use(cluster: Cluster, tmp_path: Path) -> None:
    # The did:key of an instance that is not running (any Ed25519 did:key will do).
    absent = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
    shared = cluster.owner.shared(uses=5, home=absent)
    # An instance told to wait half a second for a home's answer gives up after that.
    quick = start_instance(
        tmp_path / "quick", cluster.owner, cluster.url, ["--home-timeout", "0.5"]
    )
    try:
        wait_caught_up(quick)
        grant_id = cluster.owner.install(quick, shared)
        refused = pay(quick, grant_id)
    finally:
        quick.stop()
    assert (refused.status_code, code(refused)) == (503, "home_ledger_unreachable")
    assert "within 0.5 s" in refused.json()["error"]["message"]  # not the default 2 s
