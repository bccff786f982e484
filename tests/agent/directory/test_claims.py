"""Exactly-once one-time prekeys: concurrent claimers on two directory processes, one PostgreSQL."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agent.directory.client import DirectoryClient
from agent.directory.errors import RateLimitedError, UnknownNameError
from agent.directory.treehead import SeenHeads
from agent.relationships.prekeys import PrekeyStore
from agent.relationships.suite import Suite
from hardware.softhsm import SoftHSMToken
from janus_hsm.algorithms import Algorithm
from tests.agent.directory.dirprocess import (
    DirectoryProcess,
    directory_key,
    intro_address,
    software_keys,
)

PREKEYS = 50
CLAIMERS_PER_PROCESS = 8
CLAIMS_PER_CLAIMER = 4  # 2 x 8 x 4 = 64 claims: 50 one-time, then 14 last-resort


@pytest.fixture
def database(postgres_dsn: str) -> Iterator[str]:
    """A fresh database per test on the session's cluster."""
    name = f"dir_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    yield dsn
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.parametrize("run", range(3))  # the race must hold in every run, not once
def test_every_prekey_is_handed_out_once_across_processes(
    softhsm_token: SoftHSMToken, database: str, tmp_path: Path, run: int
) -> None:
    key_uri = directory_key(softhsm_token.uri, "dir-claims")
    first = DirectoryProcess(tmp_path / "a", key_uri, store=database)
    try:
        second = DirectoryProcess(tmp_path / "b", key_uri, store=database)
    except BaseException:
        first.stop()
        raise
    try:
        root, agreement = (
            software_keys(tmp_path / "owner", 1)[0],
            software_keys(tmp_path / "owner-x", 1, Algorithm.X25519)[0],
        )
        store = PrekeyStore(tmp_path / "prekeys", Suite.X25519)
        with DirectoryClient(first.url) as owner:
            published = owner.publish(
                root, agreement, store, name="alice@example.org", intro=intro_address(),
                prekeys=PREKEYS,
            )  # fmt: skip
            assert published["remaining"] == PREKEYS and published["logged"] is True

        claimers = software_keys(tmp_path / "claimers", 2 * CLAIMERS_PER_PROCESS)
        results: list[tuple[bool, str | None]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        start = threading.Barrier(len(claimers))

        def claim(url: str, index: int) -> None:
            seen = SeenHeads(tmp_path / f"heads-{index}.json")
            try:
                with DirectoryClient(url) as client:
                    start.wait()
                    for _ in range(CLAIMS_PER_CLAIMER):
                        got = client.claim(claimers[index], "alice@example.org", seen=seen)
                        prekey = None if got.prekey is None else got.prekey.opk_id
                        with lock:
                            results.append((got.last_resort, prekey))
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [
            threading.Thread(target=claim, args=(server.url, i))
            for i, server in enumerate([first, second] * CLAIMERS_PER_PROCESS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        handed = [p for last, p in results if not last and p is not None]
        assert len(results) == 2 * CLAIMERS_PER_PROCESS * CLAIMS_PER_CLAIMER
        assert len(handed) == PREKEYS  # every one-time prekey handed out ...
        assert len(set(handed)) == PREKEYS  # ... exactly once
        assert all(store.has_one_time(p) for p in handed)  # and they are the owner's
        assert sum(1 for last, _ in results if last) == len(results) - PREKEYS

        with DirectoryClient(second.url) as owner:
            status = owner.status(root, "alice@example.org")
            assert status["remaining"] == 0
            refill = owner.publish(
                root, agreement, store, name="alice@example.org", intro=intro_address(),
                prekeys=3,
            )  # fmt: skip
            assert refill["remaining"] == 3 and refill["logged"] is False
            again = owner.claim(claimers[0], "alice@example.org")
            assert not again.last_resort and again.prekey is not None
            assert again.prekey.opk_id not in handed
    finally:
        first.stop()
        second.stop()


def test_refusals_on_postgresql_consume_nothing(
    softhsm_token: SoftHSMToken, database: str, tmp_path: Path
) -> None:
    import httpx

    rules = tmp_path / "rules.toml"
    rules.write_text("[limits]\nclaims_per_claimer = 2\n")
    key_uri = directory_key(softhsm_token.uri, "dir-claims")
    server = DirectoryProcess(tmp_path / "a", key_uri, store=database, rules=rules)
    try:
        root = software_keys(tmp_path / "owner", 1)[0]
        agreement = software_keys(tmp_path / "owner-x", 1, Algorithm.X25519)[0]
        claimer, other = software_keys(tmp_path / "claimers", 2)
        with DirectoryClient(server.url) as client:
            client.publish(
                root, agreement, PrekeyStore(tmp_path / "prekeys", Suite.X25519),
                name="alice@example.org", intro=intro_address(), prekeys=5,
            )  # fmt: skip
            body = {
                "request": client._signed(
                    other, "janus-dir-claim+jws", op="claim", name="alice@example.org"
                )
            }
            first = httpx.post(f"{server.url}/v1/dir/claim", json=body, timeout=10)
            assert first.status_code == 200 and first.json()["one_time"] is not None
            replay = httpx.post(f"{server.url}/v1/dir/claim", json=body, timeout=10)
            assert replay.status_code == 403
            assert replay.json()["error"]["code"] == "bad_directory_request"
            client.claim(claimer, "alice@example.org")
            client.claim(claimer, "alice@example.org")
            with pytest.raises(RateLimitedError):
                client.claim(claimer, "alice@example.org")
            with pytest.raises(UnknownNameError):
                client.claim(claimer, "nobody@example.org")
            assert client.status(root, "alice@example.org")["remaining"] == 2
    finally:
        server.stop()
