"""Two cloud-agent processes sharing one PostgreSQL store enforce one use limit together."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken
from policies.abilities import Ability

PAYMENTS = Ability("janus:payments/eur", "sign/payment", ({"field": "amount", "le": 10000},))


@pytest.fixture
def database(postgres_dsn: str) -> Iterator[str]:
    name = f"cloud_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.rsplit("/", 1)[0] + f"/{name}"


def test_two_instances_never_overspend(
    softhsm_token: SoftHSMToken, database: str, tmp_path: Path
) -> None:
    edge, _ = EdgeAgent.init(tmp_path / "edge", softhsm_token.uri())
    state = tmp_path / "cloud"  # shared keystore: same host, one directory
    first = CloudProcess(state, owner=edge.did, ledger=database)
    second = CloudProcess(state, owner=edge.did, ledger=database)
    try:
        assert (
            httpx.get(f"{first.url}/v1/did").json()["did"]
            == httpx.get(f"{second.url}/v1/did").json()["did"]
        )
        granted = edge.grant(first.url, [PAYMENTS], ttl_seconds=600, uses=7)

        failures: list[str] = []

        def pay(n: int) -> int:
            url = (first, second)[n % 2].url
            response = httpx.post(
                f"{url}/v1/grants/{granted['grant_id']}/actions/sign/payment",
                json={"resource": "janus:payments/eur", "request": {"amount": n}},
                timeout=60,
            )
            if response.status_code >= 500:
                failures.append(response.text)
            return response.status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = list(pool.map(pay, range(40)))
        assert not failures, failures
        assert statuses.count(200) == 7, statuses
        assert set(statuses) - {200} <= {403, 409, 410, 429}
    finally:
        first.stop()
        second.stop()
