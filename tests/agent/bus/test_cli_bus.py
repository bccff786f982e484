"""`janus bus link/unlink` run as real subprocesses against real servers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bus import open_bus
from hardware.nats_server import NatsServer, leaf_linked_pair
from hardware.postgres import free_port
from janus_hsm.provider import KeyHandle
from tests.agent.bus.conftest import drop_schema, new_schema, with_schema
from tests.agent.bus.helpers import revocation_event, stored_count

SECRET = "s3cret-Pa55"


def janus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def nats_pair(tmp_path: Path) -> Iterator[tuple[NatsServer, NatsServer]]:
    with leaf_linked_pair(tmp_path) as pair:
        yield pair


def test_nats_link_and_unlink(nats_pair: tuple[NatsServer, NatsServer]) -> None:
    a, b = nats_pair
    linked = janus("bus", "link", "--from", a.url, "--to", b.url, "--json")
    assert linked.returncode == 0, linked.stderr
    assert json.loads(linked.stdout)["changed"] is True
    again = janus("bus", "link", "--from", a.url, "--to", b.url)
    assert again.returncode == 0 and "already linked" in again.stdout
    unlinked = janus("bus", "unlink", "--from", a.url, "--to", b.url, "--json")
    assert unlinked.returncode == 0, unlinked.stderr
    assert json.loads(unlinked.stdout)["detail"] == "no longer sourcing domain A"


def test_postgres_link_once_copies_and_unlink_forgets(
    postgres_dsn: str, instance_key: KeyHandle
) -> None:
    schema_a, schema_b = new_schema(postgres_dsn), new_schema(postgres_dsn)
    url_a, url_b = with_schema(postgres_dsn, schema_a), with_schema(postgres_dsn, schema_b)
    try:

        async def publish() -> None:
            async with open_bus(url_a) as bus:
                await bus.publish(revocation_event(instance_key))

        asyncio.run(publish())
        linked = janus("bus", "link", "--from", url_a, "--to", url_b, "--once", "--json")
        assert linked.returncode == 0, linked.stderr
        assert json.loads(linked.stdout)["copied"] == 1
        assert asyncio.run(stored_count(url_b)) == 1
        again = janus("bus", "link", "--from", url_a, "--to", url_b, "--once")
        assert again.returncode == 0 and "copied 0 events" in again.stdout  # the cursor held
        unlinked = janus("bus", "unlink", "--from", url_a, "--to", url_b, "--json")
        assert unlinked.returncode == 0 and json.loads(unlinked.stdout)["changed"] is True
    finally:
        drop_schema(postgres_dsn, schema_a)
        drop_schema(postgres_dsn, schema_b)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (f"redis://u:{SECRET}@h", "nats://127.0.0.1:1"),
        (f"nats://u:{SECRET}@127.0.0.1:1", f"postgresql://u:{SECRET}@127.0.0.1:1/db"),
        (f"nats://u:{SECRET}@127.0.0.1:{free_port()}", f"nats://u:{SECRET}@127.0.0.1:1"),
    ],
    # Fixed ids: the values hold a port chosen at collection (ids must not vary by run).
    ids=["unknown-scheme", "unreachable-postgresql", "unreachable-nats"],
)
def test_link_failures_are_one_line_without_the_password(source: str, target: str) -> None:
    result = janus("bus", "link", "--from", source, "--to", target)
    assert result.returncode == 1
    assert result.stderr.startswith("janus: error: ")
    assert result.stderr.count("\n") == 1
    assert SECRET not in result.stderr + result.stdout
