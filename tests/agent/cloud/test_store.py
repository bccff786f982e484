"""The cloud agent's grant and mailbox store over a real PostgreSQL server."""

from __future__ import annotations

import secrets

import psycopg
import pytest

from agent.cloud.store import CloudStore
from agent.errors import AgentError
from tests.policies.conftest import with_schema


def test_a_dropped_connection_is_reopened_and_errors_show_no_database_text(
    postgres_dsn: str,
) -> None:
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        store = CloudStore(with_schema(postgres_dsn, schema))
        try:
            store.add_grant("g1", "soft:object=grant-g1", "did:key:z6Mkexample")
            with pytest.raises(AgentError) as refused:
                store.grant("a\x00b")  # PostgreSQL refuses NUL in text: its words stay in the log
            assert "NUL" not in str(refused.value) and "state store failed" in str(refused.value)
            # As a server restart or an idle-connection reaper would.
            admin.execute("SELECT pg_terminate_backend(%s)", (store._pg.info.backend_pid,))
            with pytest.raises(AgentError):  # the call that finds the connection dead
                store.grant("g1")
            assert store.grant("g1").did == "did:key:z6Mkexample"  # and the next one works
        finally:
            store._pg.close()
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
