"""Batched spends: ``Ledger.spend_many`` and the event loop's ``AsyncSpender``.

A batch must keep every rule of single spends: each spend is all or nothing on its
own, a refusal does not undo the others, the limits hold under concurrency, and a
caller is answered only with what was committed.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from policies.errors import LimitExceededError, ReplayError
from policies.ledger import Ledger, LinkLimit
from policies.ledger.aio import AsyncSpender
from policies.ledger.base import SpendReceipt, SpendRequest
from policies.ledger.sqlite import SqliteLedger

NOW = 1_700_000_000.0


def request(limits: list[LinkLimit], nonce: str | None = None) -> SpendRequest:
    return SpendRequest(limits, nonce or uuid.uuid4().hex, NOW + 300, NOW, {"n": 1})


def test_spend_many_refuses_each_spend_on_its_own(ledger: Ledger) -> None:
    limits = [LinkLimit("root", uses=None), LinkLimit("leaf", uses=3)]
    replayed = uuid.uuid4().hex
    batch = [request(limits, replayed), request(limits, replayed)]
    batch += [request(limits) for _ in range(3)]
    results = ledger.spend_many(batch)
    assert isinstance(results[0], SpendReceipt)
    assert isinstance(results[1], ReplayError)
    assert [type(r) for r in results[2:]] == [SpendReceipt, SpendReceipt, LimitExceededError]
    assert ledger.uses("leaf") == 3
    assert ledger.verify_audit() == 3


def test_spend_many_of_sqlite_shares_one_commit(tmp_path: object) -> None:
    ledger = SqliteLedger(f"{tmp_path}/l.db")
    try:
        before = ledger.commits
        results = ledger.spend_many([request([LinkLimit("a", uses=10)]) for _ in range(8)])
        assert all(isinstance(r, SpendReceipt) for r in results)
        assert ledger.commits == before + 1
        assert ledger.uses("a") == 8
    finally:
        ledger.close()


def test_async_spender_batches_and_never_overspends(ledger: Ledger) -> None:
    limits = [LinkLimit("root", uses=None), LinkLimit("leaf", uses=25)]

    async def run() -> tuple[list[SpendReceipt | BaseException], AsyncSpender]:
        spender = AsyncSpender(ledger)
        try:
            results = await asyncio.gather(
                *(spender.spend(request(limits)) for _ in range(40)), return_exceptions=True
            )
        finally:
            spender.close()
        return results, spender

    results, spender = asyncio.run(run())
    ok = [r for r in results if isinstance(r, SpendReceipt)]
    assert len(ok) == 25
    assert all(isinstance(r, LimitExceededError) for r in results if r not in ok)
    assert sorted(r.uses["leaf"] for r in ok) == list(range(1, 26))
    assert ledger.uses("leaf") == 25
    if ledger.batches_spends:
        assert 1 <= spender.batches < 40


def test_async_spender_survives_a_second_loop(tmp_path: object) -> None:
    """An app's lifespan can run twice (tests do): close, then spend again."""
    ledger = SqliteLedger(f"{tmp_path}/l.db")
    spender = AsyncSpender(ledger)
    limits = [LinkLimit("a", uses=None)]
    try:
        for _ in range(2):
            receipt = asyncio.run(spender.spend(request(limits)))
            assert isinstance(receipt, SpendReceipt)
            spender.close()
        assert ledger.uses("a") == 2
    finally:
        ledger.close()


def test_async_spender_cancelled_request_leaves_its_batch_alone(tmp_path: object) -> None:
    """Cancelling one waiting request (a client that left) must not cancel the others
    of its batch, whose uses are committed and answered."""
    ledger = SqliteLedger(f"{tmp_path}/l.db")
    limits = [LinkLimit("a", uses=None)]

    async def run() -> list[SpendReceipt | BaseException]:
        spender = AsyncSpender(ledger)
        try:
            first = asyncio.ensure_future(spender.spend(request(limits)))  # commits alone
            await asyncio.sleep(0)
            tasks = [asyncio.ensure_future(spender.spend(request(limits))) for _ in range(4)]
            await asyncio.sleep(0)  # all four wait in the batch after the first
            tasks[1].cancel()
            return await asyncio.gather(first, *tasks, return_exceptions=True)
        finally:
            spender.close()

    try:
        results = asyncio.run(run())
        assert isinstance(results[2], asyncio.CancelledError)
        answered = [r for i, r in enumerate(results) if i != 2]
        assert all(isinstance(r, SpendReceipt) for r in answered)
        # The cancelled request's use may be counted (it was queued), never lost ones.
        assert ledger.uses("a") >= len(answered)
        assert ledger.verify_audit() == ledger.uses("a")
    finally:
        ledger.close()


def test_async_spender_wakes_the_loop_once_per_batch(tmp_path: object) -> None:
    """One thread-safe wake-up of the loop per committed batch, not one per request."""
    ledger = SqliteLedger(f"{tmp_path}/l.db")
    limits = [LinkLimit("a", uses=None)]
    wakeups = 0

    async def run() -> list[SpendReceipt]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        spender = AsyncSpender(ledger)
        try:
            return await asyncio.gather(*(spender.spend(request(limits)) for _ in range(48)))
        finally:
            spender.close()
            batches.append(spender.batches)

    batches: list[int] = []
    try:
        receipts = asyncio.run(run())
        assert len(receipts) == 48 and ledger.uses("a") == 48
        assert batches[0] < 48  # requests shared batches
        assert wakeups == batches[0]
    finally:
        ledger.close()


class _FailsOnce(SqliteLedger):
    """A real SQLite ledger whose first batch write fails, as a full disk would."""

    failed = False

    def spend_many(self, requests: list[SpendRequest]) -> list[Any]:
        if not self.failed:
            self.failed = True
            raise OSError("database or disk is full")
        return super().spend_many(requests)


def test_async_spender_a_failed_batch_fails_only_its_own_spends(tmp_path: object) -> None:
    """The spends queued behind a failed batch get their own write, not its error."""
    from policies.errors import LedgerError

    ledger = _FailsOnce(f"{tmp_path}/l.db")
    limits = [LinkLimit("a", uses=None)]

    async def run() -> list[SpendReceipt | BaseException]:
        spender = AsyncSpender(ledger, max_batch=4)
        try:
            return await asyncio.gather(
                *(spender.spend(request(limits)) for _ in range(12)), return_exceptions=True
            )
        finally:
            spender.close()

    try:
        results = asyncio.run(run())
        failed = [r for r in results if isinstance(r, LedgerError)]
        done = [r for r in results if isinstance(r, SpendReceipt)]
        assert len(failed) == 4 and len(done) == 8, results
        assert ledger.uses("a") == 8
    finally:
        ledger.close()
