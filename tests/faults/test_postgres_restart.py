"""PostgreSQL stopped hard and restarted twice while four processes spend on its ledger.

The cluster is a private one, crashed and started again on the same port by
``PostgresCluster.restart`` (hardware/postgres.py: ``pg_ctl stop -m immediate``, no
checkpoint, in-flight transactions cut).  Each worker resolves every attempt: a
``LedgerError`` (the only error the ledger may raise while the server is away) leaves
the outcome unknown, so the worker retries the same nonce until it gets an answer; a
``ReplayError`` then means the first try had committed.  Afterwards the ledger must hold
exactly the limit, every acknowledged use must be among its audit entries, no attempt
may be there twice, and the audit chain must verify.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from multiprocessing import get_context
from multiprocessing.queues import Queue

import pytest

from hardware.postgres import PostgresCluster, PostgresUnavailable, start_cluster
from policies.errors import LedgerError, LimitExceededError, ReplayError
from policies.ledger import LinkLimit, open_ledger

WORKERS = 4
ATTEMPTS = 250
LIMIT = 600  # below WORKERS * ATTEMPTS: the last attempts must be refused
CHAIN = [LinkLimit("pg-root", uses=LIMIT), LinkLimit("pg-leaf", uses=10 * LIMIT)]
RESOLVE_WITHIN = 60.0  # seconds a worker keeps retrying one attempt while the server is down


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    try:
        started = start_cluster()
    except PostgresUnavailable as exc:
        pytest.fail(f"cannot start PostgreSQL: {exc}", pytrace=False)
    try:
        yield started
    finally:
        started.stop()


def test_restart_keeps_the_port_and_the_committed_data(cluster: PostgresCluster) -> None:
    cluster.psql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)", dbname="janus")
    port, old = cluster.port, cluster.process
    cluster.restart()
    assert cluster.port == port and cluster.process is not old
    assert cluster.process is not None and cluster.process.poll() is None
    cluster.psql("DO $$ BEGIN ASSERT (SELECT n FROM kept) = 7; END $$", dbname="janus")


def _worker(url: str, worker: int, results: Queue[tuple[int, list[int], list[int], int]]) -> None:
    """Spend ATTEMPTS times; report (worker, acknowledged, committed-on-retry, errors)."""
    acknowledged: list[int] = []
    committed_unseen: list[int] = []
    errors = 0
    with open_ledger(url) as ledger:
        for attempt in range(ATTEMPTS):
            nonce = f"w{worker}-a{attempt}-pgfault"
            deadline = time.monotonic() + RESOLVE_WITHIN
            retried = False
            while True:
                now = time.time()
                try:
                    ledger.spend(
                        CHAIN,
                        nonce=nonce,
                        nonce_expires_at=now + 3600,
                        now=now,
                        audit={"worker": worker, "attempt": attempt},
                    )
                    acknowledged.append(attempt)
                    break
                except LimitExceededError:
                    break
                except ReplayError:
                    assert retried, "a fresh nonce was called a replay"
                    committed_unseen.append(attempt)  # the first try had committed
                    break
                except LedgerError:
                    errors += 1
                    retried = True
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            time.sleep(0.002)  # spread the spends over the restarts
    results.put((worker, acknowledged, committed_unseen, errors))


def _wait_for_uses(url: str, at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with open_ledger(url) as ledger:
        while ledger.uses("pg-root") < at_least:
            assert time.monotonic() < deadline, f"fewer than {at_least} uses after {timeout} s"
            time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_restarts_lose_no_use_count_none_twice_and_keep_the_limit(
    cluster: PostgresCluster,
) -> None:
    url = cluster.dsn()
    with open_ledger(url):  # create the tables outside the race
        pass
    context = get_context("spawn")
    results: Queue[tuple[int, list[int], list[int], int]] = context.Queue()
    workers = [context.Process(target=_worker, args=(url, w, results)) for w in range(WORKERS)]
    for process in workers:
        process.start()
    try:
        _wait_for_uses(url, 100)
        cluster.restart()
        _wait_for_uses(url, 300)
        cluster.restart()
        outcomes = [results.get(timeout=180) for _ in workers]
    finally:
        for process in workers:
            process.join(timeout=RESOLVE_WITHIN + 10)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in workers] == [0] * WORKERS, "a worker raised an untyped error"
    assert sum(o[3] for o in outcomes) > 0, "no spend met the restarts: the test proved nothing"

    with open_ledger(url) as ledger:
        uses = [e for e in ledger.audit_entries() if e.kind == "use"]
        recorded = [(e.data["worker"], e.data["attempt"]) for e in uses]
        assert len(recorded) == len(set(recorded)), "an attempt was counted twice"
        assert ledger.uses("pg-root") == len(recorded) == LIMIT
        acknowledged = {(w, a) for w, acks, _, _ in outcomes for a in acks}
        assert acknowledged <= set(recorded), "an acknowledged use was lost"
        resolved = acknowledged | {(w, a) for w, _, late, _ in outcomes for a in late}
        assert resolved <= set(recorded)
        assert ledger.verify_audit() == LIMIT
