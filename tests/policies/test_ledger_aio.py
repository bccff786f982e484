"""Batched spends: ``Ledger.spend_many`` and the event loop's ``AsyncSpender``.

A batch must keep every rule of single spends: each spend is all or nothing on its
own, a refusal does not undo the others, the limits hold under concurrency, and a
caller is answered only with what was committed.
"""

from __future__ import annotations

import asyncio
import uuid

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
