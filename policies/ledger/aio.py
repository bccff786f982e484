"""Spending from an asyncio event loop: group commit without a thread per request.

A server on an event loop could run each blocking ``Ledger.spend`` in a thread pool,
and a batching ledger (SQLite) would then share commits between those threads; but
every request then wakes a thread, and the threads fight the loop for the GIL.  Here
the loop itself gathers the spends that arrive while the previous batch is being
committed and hands them to one writer thread as a single ``spend_many``: one thread
hand-off and one fsync per batch, and each request awaits a future that is resolved
only after the batch's commit is durable.

Ledgers that gain nothing from batching (PostgreSQL, whose concurrent connections
commit in parallel) are called one spend per pool thread, as before.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from policies.errors import LedgerError
from policies.ledger.base import Ledger, SpendReceipt, SpendRequest

_Pending = tuple[SpendRequest, "asyncio.Future[SpendReceipt]"]


class AsyncSpender:
    """Spends for coroutines of one event loop; create and use it on that loop."""

    def __init__(self, ledger: Ledger, *, max_batch: int = 64) -> None:
        self.ledger = ledger
        self._max_batch = max(1, max_batch)
        self._writer: ThreadPoolExecutor | None = None  # started by the first spend
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0  # batches handed to the writer (tests check batching with it)

    async def spend(self, request: SpendRequest) -> SpendReceipt:
        """``ledger.spend(request)``, durable when it returns; refusals are raised."""
        if not self.ledger.batches_spends:
            return await asyncio.to_thread(self.ledger.spend_one, request)
        future: asyncio.Future[SpendReceipt] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Hand the pending spends to the writer, batch after batch, until none are left."""
        loop = asyncio.get_running_loop()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="janus-ledger-writer")
        batch: list[_Pending] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                try:
                    results = await loop.run_in_executor(
                        self._writer, self.ledger.spend_many, [request for request, _ in batch]
                    )
                except Exception as exc:
                    # Only this batch's callers learn of it (a spend of it may have been
                    # committed: over-counted, never over-spent); the spends queued
                    # behind it get their own try, so a passing fault fails one batch.
                    failure = LedgerError(f"the ledger write failed: {exc!r}")
                    for _, future in batch:
                        _settle(future, failure)
                    batch = []
                    continue
                self.batches += 1
                for (_, future), result in zip(batch, results, strict=True):
                    _settle(future, result)
                batch = []
        except BaseException as exc:
            # The loop is shutting down (or the drainer itself broke): nobody waits
            # forever.  A spend of the batch in flight may have been committed; its
            # caller gets an error, which over-counts but never over-spends.
            failure = LedgerError(f"the ledger write failed: {exc!r}")
            for _, future in batch + self._pending:
                _settle(future, failure)
            self._pending.clear()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._drainer = None

    def close(self) -> None:
        """Stop the writer thread (after the batch it is running, if any).

        A later spend starts a new one: an app's lifespan may run more than once.
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)


def _settle(future: asyncio.Future[SpendReceipt], result: SpendReceipt | Exception) -> None:
    if future.done():  # the waiting request was cancelled
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
