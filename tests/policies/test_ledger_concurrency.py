"""The ledger under real concurrency and real crashes, on SQLite and PostgreSQL.

- 8 processes race 200 attempts each against a root limited to 100 uses: exactly 100
  may succeed, however the transactions interleave.
- A process spending in a loop is killed with SIGKILL at a random moment: every use it
  reported must still be counted afterwards, the audit chain must verify, and the
  limit must still hold to the unit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from multiprocessing import get_context
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from policies.errors import LimitExceededError
from policies.ledger import LinkLimit, open_ledger

ROOT_DIR = Path(__file__).resolve().parents[2]

RACE_PROCESSES = 8
RACE_ATTEMPTS = 200
RACE_LIMIT = 100
RACE_CHAIN = [LinkLimit("race-root", uses=RACE_LIMIT), LinkLimit("race-leaf", uses=1000)]

CRASH_LIMIT = 2000
CRASH_CHAIN = [LinkLimit("crash-root", uses=CRASH_LIMIT), LinkLimit("crash-leaf", uses=10_000)]


def _race(url: str, worker: int, barrier: Barrier, results: Queue[tuple[int, int, int]]) -> None:
    """A spawned process: open its own ledger, wait for the others, then spend."""
    succeeded = refused = 0
    with open_ledger(url) as ledger:
        barrier.wait(timeout=60)
        for attempt in range(RACE_ATTEMPTS):
            now = time.time()
            try:
                ledger.spend(
                    RACE_CHAIN,
                    nonce=f"race-{worker}-{attempt}",
                    nonce_expires_at=now + 300,
                    now=now,
                    audit={"worker": worker, "attempt": attempt},
                )
                succeeded += 1
            except LimitExceededError:
                refused += 1
    results.put((worker, succeeded, refused))


@pytest.mark.slow
def test_processes_race_for_the_last_uses(ledger_url: str) -> None:
    context = get_context("spawn")
    barrier = context.Barrier(RACE_PROCESSES)
    results: Queue[tuple[int, int, int]] = context.Queue()
    with open_ledger(ledger_url):  # create the schema once, outside the race
        pass
    processes = [
        context.Process(target=_race, args=(ledger_url, worker, barrier, results))
        for worker in range(RACE_PROCESSES)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    succeeded = sum(o[1] for o in outcomes)
    refused = sum(o[2] for o in outcomes)
    assert succeeded == RACE_LIMIT, outcomes
    assert refused == RACE_PROCESSES * RACE_ATTEMPTS - RACE_LIMIT
    with open_ledger(ledger_url) as ledger:
        assert ledger.uses("race-root") == RACE_LIMIT
        assert ledger.uses("race-leaf") == RACE_LIMIT
        assert ledger.verify_audit() == RACE_LIMIT


def crash_child(url: str, tag: str) -> None:
    """Run in a subprocess: spend until refused, printing one line per committed use.

    A line is written only after spend() returned, i.e. after the commit was durable:
    it is the acknowledgement that the parent holds the ledger to.
    """
    with open_ledger(url) as ledger:
        for attempt in range(CRASH_LIMIT + 1):
            now = time.time()
            try:
                ledger.spend(
                    CRASH_CHAIN, nonce=f"{tag}-{attempt}", nonce_expires_at=now + 300, now=now
                )
            except LimitExceededError:
                return
            sys.stdout.write("ok\n")
            sys.stdout.flush()


def _spend_and_kill(url: str, tag: str, after: int) -> int:
    """Start a spending child, SIGKILL it after ``after`` acknowledgements; return them all."""
    code = (
        "import sys; from tests.policies.test_ledger_concurrency import crash_child; "
        "crash_child(sys.argv[1], sys.argv[2])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    child = subprocess.Popen(
        [sys.executable, "-c", code, url, tag],
        stdout=subprocess.PIPE,
        cwd=ROOT_DIR,
        env=env,
    )
    assert child.stdout is not None
    acknowledged = 0
    try:
        while acknowledged < after:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the spending child ended early (exit {child.wait()})")
            acknowledged += 1
        # Let it run on a random moment more, so the kill lands anywhere in a spend.
        time.sleep(random.uniform(0, 0.02))
        os.kill(child.pid, signal.SIGKILL)
        acknowledged += child.stdout.read().count(b"ok\n")  # written before it died
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_use(ledger_url: str) -> None:
    with open_ledger(ledger_url):  # the schema, so the child starts spending at once
        pass
    acknowledged = 0
    for round_ in range(3):
        acknowledged += _spend_and_kill(ledger_url, f"crash{round_}", random.randint(20, 150))
        with open_ledger(ledger_url) as ledger:
            recorded = ledger.uses("crash-root")
            # At most one use can be committed and not yet reported when the kill lands.
            assert acknowledged <= recorded <= acknowledged + round_ + 1
            assert ledger.uses("crash-leaf") == recorded
            assert ledger.verify_audit() == recorded
        acknowledged = recorded  # the unreported one counts from now on
    with open_ledger(ledger_url) as ledger:
        more = 0
        while True:
            now = time.time()
            try:
                ledger.spend(
                    CRASH_CHAIN, nonce=f"after-{more}", nonce_expires_at=now + 300, now=now
                )
            except LimitExceededError as refused:
                assert refused.link == 0
                break
            more += 1
        assert recorded + more == CRASH_LIMIT
        assert ledger.uses("crash-root") == CRASH_LIMIT
        assert ledger.verify_audit() == CRASH_LIMIT
