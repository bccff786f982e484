"""The ledger's rules, run against SQLite and PostgreSQL alike (the ``ledger`` fixture).

Every refusal is checked for what it must not do as much as for the error: no count
moves, the nonce stays free, no audit entry appears.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from policies.errors import (
    AuditError,
    FormatError,
    LedgerError,
    LimitExceededError,
    PolicyError,
    RateLimitedError,
    ReplayError,
    RevokedError,
)
from policies.ledger import GENESIS, AuditEntry, Ledger, LinkLimit, Rate, open_ledger
from policies.ledger._common import audit_prefix, entry_hash, normalise_data, redact_dsn
from policies.ledger.base import SpendReceipt, SpendRequest
from policies.ledger.sqlite import SqliteLedger
from tests.policies.conftest import LedgerDb

NOW = 1_700_000_000.0


def nonce() -> str:
    return uuid.uuid4().hex


def spend(ledger: Ledger, limits: list[LinkLimit], now: float = NOW, **audit: object) -> int:
    """Spend once with a fresh nonce; returns the receipt's audit sequence number."""
    receipt = ledger.spend(
        limits, nonce=nonce(), nonce_expires_at=now + 300, now=now, audit=audit or None
    )
    return receipt.audit_seq


def counts(ledger: Ledger, limits: list[LinkLimit]) -> list[int]:
    return [ledger.uses(link.cap_id) for link in limits]


def chain(*uses: int | None, prefix: str = "cap") -> list[LinkLimit]:
    return [LinkLimit(f"{prefix}-{i}", uses=u) for i, u in enumerate(uses)]


def nonce_count(db: LedgerDb) -> int:
    return int(db.scalar("SELECT count(*) FROM janus_nonces"))


# -- counting ------------------------------------------------------------------------


def test_spend_counts_every_link(ledger: Ledger) -> None:
    limits = chain(None, 10, 5)  # the root has no use limit: it is counted all the same
    receipt = ledger.spend(limits, nonce="n-1", nonce_expires_at=NOW + 60, now=NOW)
    assert receipt.uses == {"cap-0": 1, "cap-1": 1, "cap-2": 1}
    assert receipt.audit_seq == 1
    receipt = ledger.spend(limits, nonce="n-2", nonce_expires_at=NOW + 60, now=NOW)
    assert receipt.uses == {"cap-0": 2, "cap-1": 2, "cap-2": 2}
    assert receipt.audit_seq == 2
    assert counts(ledger, limits) == [2, 2, 2]
    assert ledger.uses("never-used") == 0


@pytest.mark.parametrize("exhausted", [0, 1, 2])
def test_limit_on_any_link_refuses_and_changes_nothing(
    ledger: Ledger, ledger_db: LedgerDb, exhausted: int
) -> None:
    uses: list[int | None] = [10, 10, 10]
    uses[exhausted] = 2
    limits = chain(*uses)
    spend(ledger, limits)
    spend(ledger, limits)
    with pytest.raises(LimitExceededError) as refused:
        ledger.spend(limits, nonce="refused", nonce_expires_at=NOW + 60, now=NOW, audit={"a": 1})
    assert type(refused.value) is LimitExceededError
    assert refused.value.link == exhausted
    assert refused.value.code == "uses_exhausted"
    assert counts(ledger, limits) == [2, 2, 2]
    assert nonce_count(ledger_db) == 2  # the refused nonce was not recorded…
    assert len(list(ledger.audit_entries())) == 2  # …nor audited
    other = chain(None, prefix="other")
    ledger.spend(other, nonce="refused", nonce_expires_at=NOW + 60, now=NOW)  # still free


def test_zero_uses_never_spends(ledger: Ledger) -> None:
    with pytest.raises(LimitExceededError) as refused:
        spend(ledger, chain(None, 0))
    assert refused.value.link == 1


def test_ancestor_limit_binds_siblings(ledger: Ledger) -> None:
    """Two leaves under a parent limited to 3 uses share those 3, whatever they allow."""
    root = LinkLimit("root")
    parent = LinkLimit("parent", uses=3)
    left = [root, parent, LinkLimit("left", uses=100)]
    right = [root, parent, LinkLimit("right", uses=100)]
    spend(ledger, left)
    spend(ledger, right)
    spend(ledger, left)
    for leaf in (left, right):
        with pytest.raises(LimitExceededError) as refused:
            spend(ledger, leaf)
        assert refused.value.link == 1
    assert ledger.uses("parent") == 3
    assert ledger.uses("left") == 2
    assert ledger.uses("right") == 1
    assert ledger.uses("root") == 3


# -- rates ---------------------------------------------------------------------------


def test_rate_windows_are_fixed(ledger: Ledger, ledger_db: LedgerDb) -> None:
    limits = [LinkLimit("root", rate=Rate(10, 3600)), LinkLimit("leaf", rate=Rate(2, 60))]
    start = 60.0 * 1000  # the start of a window
    spend(ledger, limits, now=start)
    spend(ledger, limits, now=start + 30)
    with pytest.raises(RateLimitedError) as refused:
        spend(ledger, limits, now=start + 59.999)
    assert refused.value.link == 1
    assert refused.value.code == "rate_limited"
    assert isinstance(refused.value, LimitExceededError)  # callers may catch either
    assert counts(ledger, limits) == [2, 2]
    assert nonce_count(ledger_db) == 2
    spend(ledger, limits, now=start + 60)  # the next window: fresh
    spend(ledger, limits, now=start + 61)
    with pytest.raises(RateLimitedError):
        spend(ledger, limits, now=start + 62)
    assert counts(ledger, limits) == [4, 4]


def test_rate_of_an_ancestor_binds(ledger: Ledger) -> None:
    limits = [LinkLimit("root", rate=Rate(1, 10)), LinkLimit("leaf", uses=100)]
    spend(ledger, limits, now=100.0)
    with pytest.raises(RateLimitedError) as refused:
        spend(ledger, limits, now=105.0)
    assert refused.value.link == 0
    spend(ledger, limits, now=110.0)


def test_use_limit_is_checked_before_rate(ledger: Ledger) -> None:
    limits = [LinkLimit("root", rate=Rate(1, 10)), LinkLimit("leaf", uses=1)]
    spend(ledger, limits, now=100.0)
    with pytest.raises(LimitExceededError) as refused:
        spend(ledger, limits, now=101.0)
    assert type(refused.value) is LimitExceededError
    assert refused.value.link == 1


def test_a_clock_behind_counts_in_the_latest_window(ledger: Ledger) -> None:
    """A host whose clock lags must not reopen a window that a faster host filled."""
    limits = [LinkLimit("leaf", rate=Rate(2, 60))]
    spend(ledger, limits, now=6000.0)
    spend(ledger, limits, now=6001.0)
    with pytest.raises(RateLimitedError):
        spend(ledger, limits, now=5990.0)  # the previous window, as seen by a slow clock
    spend(ledger, limits, now=6060.0)


# -- nonces --------------------------------------------------------------------------


def test_replayed_nonce_is_refused(ledger: Ledger) -> None:
    limits = chain(None, 10)
    ledger.spend(limits, nonce="once", nonce_expires_at=NOW + 300, now=NOW)
    with pytest.raises(ReplayError) as refused:
        ledger.spend(limits, nonce="once", nonce_expires_at=NOW + 300, now=NOW + 1)
    assert refused.value.code == "replayed"
    with pytest.raises(ReplayError):  # nonces are global, not per capability
        ledger.spend(chain(None, prefix="x"), nonce="once", nonce_expires_at=NOW + 300, now=NOW)
    assert counts(ledger, limits) == [1, 1]
    assert len(list(ledger.audit_entries())) == 1


def test_replay_is_checked_first(ledger: Ledger) -> None:
    limits = chain(1)
    ledger.spend(limits, nonce="n", nonce_expires_at=NOW + 300, now=NOW)
    ledger.revoke("cap-0", record="r", data={})
    with pytest.raises(ReplayError):
        ledger.spend(limits, nonce="n", nonce_expires_at=NOW + 300, now=NOW)


def test_prune_nonces_forgets_only_expired(ledger: Ledger, ledger_db: LedgerDb) -> None:
    limits = chain(None)
    ledger.spend(limits, nonce="old", nonce_expires_at=NOW + 10, now=NOW)
    ledger.spend(limits, nonce="new", nonce_expires_at=NOW + 400, now=NOW)
    assert ledger.prune_nonces(NOW + 5) == 0
    assert ledger.prune_nonces(NOW + 100) == 1
    assert nonce_count(ledger_db) == 1
    with pytest.raises(ReplayError):
        ledger.spend(limits, nonce="new", nonce_expires_at=NOW + 400, now=NOW + 100)


# -- revocation ----------------------------------------------------------------------


def test_revoked_link_is_refused(ledger: Ledger, ledger_db: LedgerDb) -> None:
    limits = chain(None, 10, 10)
    spend(ledger, limits)
    assert ledger.revoked(["cap-0", "cap-1", "cap-2"]) is None
    assert ledger.revoke("cap-1", record="signed-record", data={"by": "did:key:z6Mk"}) is True
    with pytest.raises(RevokedError) as refused:
        spend(ledger, limits)
    assert refused.value.link == 1
    assert refused.value.code == "revoked"
    assert counts(ledger, limits) == [1, 1, 1]
    assert ledger.revoked(["cap-2", "cap-1", "cap-0"]) == "cap-1"
    assert ledger.revoked([]) is None
    assert ledger_db.scalar("SELECT record FROM janus_revocations") == "signed-record"
    # Idempotent: a second revocation changes and audits nothing.
    assert ledger.revoke("cap-1", record="another", data={}) is False
    kinds = [entry.kind for entry in ledger.audit_entries()]
    assert kinds == ["use", "revoke"]
    # A sibling under the revoked link is refused too; an unrelated chain is not.
    with pytest.raises(RevokedError):
        spend(ledger, [*limits[:2], LinkLimit("sibling")])
    spend(ledger, chain(None, prefix="unrelated"))


def test_revocation_is_checked_before_limits(ledger: Ledger) -> None:
    limits = chain(1)
    spend(ledger, limits)
    ledger.revoke("cap-0", record="r", data={})
    with pytest.raises(RevokedError):
        spend(ledger, limits)


# -- audit ---------------------------------------------------------------------------


def test_audit_chain_links_and_verifies(ledger: Ledger) -> None:
    assert ledger.verify_audit() == 0
    grant_seq = ledger.record_grant("cap-1", {"to": "did:key:z6Mk", "uses": 5})
    limits = chain(None, 5)
    data = {"action": "sign", "nested": {"list": (1, 2.5, "é")}, "n": 10**20}
    receipt = ledger.spend(
        limits, nonce="n", nonce_expires_at=NOW + 60, now=NOW + 0.123456789, audit=data
    )
    ledger.revoke("cap-1", record="r", data={"reason": "test"})
    entries = list(ledger.audit_entries())
    assert [e.seq for e in entries] == [1, 2, 3] and grant_seq == 1 and receipt.audit_seq == 2
    assert [e.kind for e in entries] == ["grant", "use", "revoke"]
    assert entries[0].prev == GENESIS
    assert entries[1].prev == entries[0].hash and entries[2].prev == entries[1].hash
    use = entries[1]
    assert use.cap_id == "cap-1"  # the leaf's
    assert use.at == NOW + 0.123456789  # the exact float, so the hash verifies
    assert use.data == {"action": "sign", "nested": {"list": [1, 2.5, "é"]}, "n": 10**20}
    assert all(e.hash == e.compute_hash() for e in entries)
    assert ledger.verify_audit() == 3
    head = getattr(ledger, "audit_head")()  # noqa: B009 - a helper of both backends
    assert head == (3, entries[2].hash)


def test_integer_now_round_trips(ledger: Ledger) -> None:
    ledger.spend(chain(None), nonce="n", nonce_expires_at=2000, now=1000)
    assert ledger.verify_audit() == 1


@pytest.mark.parametrize(
    ("column", "value"),
    [("data", '{"action":"forged"}'), ("at", 1.5), ("cap_id", "other"), ("kind", "grant")],
)
def test_tampered_entry_is_named(
    ledger: Ledger, ledger_db: LedgerDb, column: str, value: object
) -> None:
    for _ in range(3):
        spend(ledger, chain(None), action="sign")
    ledger_db.execute(f"UPDATE janus_audit SET {column} = %s WHERE seq = 2", (value,))  # noqa: S608
    with pytest.raises(AuditError) as broken:
        ledger.verify_audit()
    assert broken.value.entry == 2
    assert "entry 2" in str(broken.value)


def test_removed_or_relinked_entry_is_named(ledger: Ledger, ledger_db: LedgerDb) -> None:
    for _ in range(4):
        spend(ledger, chain(None))
    ledger_db.execute("UPDATE janus_audit SET prev = %s WHERE seq = 3", (GENESIS,))
    with pytest.raises(AuditError) as broken:
        ledger.verify_audit()
    assert broken.value.entry == 3
    ledger_db.execute("DELETE FROM janus_audit WHERE seq = 2")
    with pytest.raises(AuditError) as broken:
        ledger.verify_audit()
    assert broken.value.entry == 2


def test_non_json_audit_data_is_refused(ledger: Ledger) -> None:
    with pytest.raises(FormatError):
        spend(ledger, chain(None), value=float("nan"))
    with pytest.raises(FormatError):
        ledger.record_grant("cap", {"key": object()})
    assert ledger.verify_audit() == 0


@pytest.mark.parametrize(
    ("at", "kind", "cap_id", "data"),
    [
        (1.0, "use", "c", {}),
        (1700000000.123456, "grant", 'cap-é"\\', {"z": [1, 2.5, None], "a": {"ü": "\u2028"}}),
        (0.1 + 0.2, "revoke", "x" * 43, {"n": 10**30, "t": True, 10: "b", 2: (1, 2)}),
    ],
)
def test_entry_hash_is_audit_hash(at: float, kind: str, cap_id: str, data: dict[Any, Any]) -> None:
    """Hashing prefix + prev + seq (both backends do) is audit_hash of the read-back body."""
    text = normalise_data(data)
    entry = AuditEntry(
        seq=42, at=at, kind=kind, cap_id=cap_id, data=json.loads(text), prev="ab" * 32
    )
    assert entry_hash(audit_prefix(at, kind, cap_id, text), entry.prev, 42) == (
        entry.compute_hash()
    )


def test_non_string_keys_round_trip(ledger: Ledger) -> None:
    """Keys that become strings are sorted as strings, so the stored entry verifies."""
    odd: dict[Any, Any] = {10: "a", 2: "b"}
    ledger.spend(chain(None), nonce="n", nonce_expires_at=NOW, now=NOW, audit={"x": odd})
    ledger.record_grant("g", odd)
    assert ledger.verify_audit() == 2
    assert list(ledger.audit_entries())[1].data == {"10": "a", "2": "b"}


# -- arguments, reopening, threads ---------------------------------------------------


@pytest.mark.parametrize(
    "limits",
    [
        [],
        [LinkLimit("a"), LinkLimit("a")],
        [LinkLimit("")],
        [LinkLimit("a", uses=-1)],
        [LinkLimit("a", rate=Rate(1, 0))],
        [LinkLimit("a", uses=2**64)],
    ],
)
def test_malformed_spends_are_refused(ledger: Ledger, limits: list[LinkLimit]) -> None:
    with pytest.raises(FormatError):
        ledger.spend(limits, nonce="n", nonce_expires_at=NOW, now=NOW)


@pytest.mark.parametrize(
    ("nonce_", "limits", "now"),
    [
        ("n\x00m", [LinkLimit("a")], NOW),  # a NUL ends a string inside SQLite's JSON
        ("n\ud800", [LinkLimit("a")], NOW),  # a lone surrogate cannot be UTF-8
        ("n\nm", [LinkLimit("a")], NOW),
        ("n" * 1025, [LinkLimit("a")], NOW),
        ("", [LinkLimit("a")], NOW),
        ("n", [LinkLimit("a\x00b")], NOW),
        ("n", [LinkLimit("a"), LinkLimit("\udc00")], NOW),
        ("n", [LinkLimit("a")], -1.0),
        ("n", [LinkLimit("a")], 1e19),  # its rate window would not fit in 64 bits
        ("n", [LinkLimit("a")], float("inf")),
    ],
)
def test_keys_and_times_a_store_cannot_hold_exactly_are_refused(
    ledger: Ledger, ledger_db: LedgerDb, nonce_: str, limits: list[LinkLimit], now: float
) -> None:
    with pytest.raises(FormatError):
        ledger.spend(limits, nonce=nonce_, nonce_expires_at=NOW, now=now)
    assert nonce_count(ledger_db) == 0 and ledger.verify_audit() == 0
    for cap_id in ("a\x00b", "a\ud800", "a\tb"):
        with pytest.raises(FormatError):
            ledger.revoke(cap_id, record="r", data={})
        with pytest.raises(FormatError):
            ledger.record_grant(cap_id, {})
    assert ledger.verify_audit() == 0


def test_a_spend_the_database_refuses_fails_alone_in_its_batch(tmp_path: Path) -> None:
    """One caller's fault (here a trigger in the database refuses its nonce) fails that
    spend only, as in a transaction of its own; the others of the batch are counted."""
    import sqlite3

    batched, single = (SqliteLedger(tmp_path / f"{name}.db") for name in ("batched", "single"))
    try:
        for ledger in (batched, single):
            ledger.uses("root")  # the schema exists
            db = sqlite3.connect(ledger.path, isolation_level=None)
            db.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON janus_nonces"
                " WHEN NEW.nonce LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'injected'); END"
            )
            db.close()
        limits = [LinkLimit("root", uses=10), LinkLimit("leaf")]
        names = ["n-0", "poison-1", "n-2", "poison-3", "n-4"]
        requests = [SpendRequest(limits, name, NOW + 60, NOW) for name in names]
        before = batched.commits
        together = batched.spend_many(requests)
        assert batched.commits == before + 1
        apart: list[SpendReceipt | Exception] = []
        for request in requests:
            try:
                apart.append(single.spend_one(request))
            except (PolicyError, LedgerError) as exc:
                apart.append(exc)
        outcomes = [_outcome(r) for r in together]
        assert outcomes == [_outcome(r) for r in apart]
        assert outcomes[1] == outcomes[3] == ("LedgerError", None)
        assert [o for i, o in enumerate(outcomes) if i % 2 == 0] == [
            {"root": n, "leaf": n} for n in (1, 2, 3)
        ]
        assert "injected" in str(together[1])
        for ledger in (batched, single):
            assert ledger.uses("root") == 3 and ledger.verify_audit() == 3
    finally:
        batched.close()
        single.close()


def test_state_survives_reopening(ledger_url: str) -> None:
    limits = chain(2)
    with open_ledger(ledger_url) as first:
        spend(first, limits)
        first.revoke("gone", record="r", data={})
    with open_ledger(ledger_url) as second:  # creating the schema again is a no-op
        assert second.uses("cap-0") == 1
        assert second.revoked(["gone"]) == "gone"
        spend(second, limits)
        with pytest.raises(LimitExceededError):
            spend(second, limits)
        assert second.verify_audit() == 3


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    limits = [LinkLimit("root", uses=60), LinkLimit("leaf", uses=1000)]
    successes: list[int] = []
    refusals: list[int] = []

    def worker() -> None:
        for _ in range(25):
            try:
                spend(ledger, limits)
                successes.append(1)
            except LimitExceededError:
                refusals.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(successes) == 60 and len(refusals) == 40
    assert counts(ledger, limits) == [60, 60]
    assert ledger.verify_audit() == 60


def test_sqlite_threads_share_commits(tmp_path: Path) -> None:
    """Group commit: concurrent spends of one process share fsyncs, refusals stay alone.

    Each thread replays five of its own nonces: a replay is refused as such if the
    first attempt went through, and by the limit if the first attempt was refused.
    """
    ledger = SqliteLedger(tmp_path / "ledger.db")
    limits = [LinkLimit("root", uses=150), LinkLimit("leaf")]
    outcome: dict[tuple[int, int], str] = {}

    def worker(n: int) -> None:
        for i in range(25):
            try:
                ledger.spend(limits, nonce=f"{n}-{i % 20}", nonce_expires_at=NOW, now=NOW)
                outcome[n, i] = "ok"
            except ReplayError:
                outcome[n, i] = "replay"
            except LimitExceededError:
                outcome[n, i] = "limit"

    try:
        before = ledger.commits
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        firsts = [outcome[n, i] for n in range(8) for i in range(20)]
        assert firsts.count("ok") == 150 and firsts.count("limit") == 10
        for n in range(8):
            for i in range(20, 25):
                assert outcome[n, i] == ("replay" if outcome[n, i - 20] == "ok" else "limit")
        assert ledger.uses("root") == 150
        assert ledger.verify_audit() == 150
        assert ledger.commits - before < 8 * 25  # batches formed
    finally:
        ledger.close()


def _mixed_spends() -> list[SpendRequest]:
    """Spends whose outcomes depend on the ones before them in the same batch."""
    shared = LinkLimit("root", uses=6)
    rated = LinkLimit("rated", rate=Rate(1, 60))
    requests = []
    for i in range(10):
        leaf = LinkLimit(f"leaf-{i % 3}", uses=2)
        requests.append(
            SpendRequest(
                [shared, rated, leaf] if i % 4 == 0 else [shared, leaf],
                nonce=f"n-{i % 7}",  # 7, 8 and 9 replay 0, 1 and 2
                nonce_expires_at=NOW + 300,
                now=NOW + i / 10,
                audit={"i": str(i)},
            )
        )
    requests.append(SpendRequest([LinkLimit("revoked")], "n-r", NOW + 300, NOW))
    return requests


def _outcome(result: SpendReceipt | Exception) -> object:
    if isinstance(result, Exception):
        return type(result).__name__, getattr(result, "link", None)
    return result.uses


def test_a_batch_decides_as_spends_one_at_a_time(tmp_path: Path) -> None:
    """spend_many (one transaction, decided together) == the same spends one by one."""
    batched, single = (SqliteLedger(tmp_path / f"{name}.db") for name in ("batched", "single"))
    try:
        for ledger in (batched, single):
            ledger.revoke("revoked", record="r", data={})
        before = batched.commits
        together = batched.spend_many(_mixed_spends())
        assert batched.commits == before + 1
        apart: list[SpendReceipt | Exception] = []
        for request in _mixed_spends():
            try:
                apart.append(single.spend_one(request))
            except PolicyError as exc:
                apart.append(exc)
        outcomes = [_outcome(r) for r in together]
        assert outcomes == [_outcome(r) for r in apart]
        kinds = {o[0] for o in outcomes if isinstance(o, tuple)}
        assert kinds == {"ReplayError", "LimitExceededError", "RateLimitedError", "RevokedError"}

        def uses_logged(ledger: SqliteLedger) -> list[tuple[Any, ...]]:
            # (the revocation entries differ: they carry the time they were made)
            return [
                (e.seq, e.at, e.cap_id, e.data) for e in ledger.audit_entries() if e.kind == "use"
            ]

        assert uses_logged(batched) == uses_logged(single)
        assert batched.verify_audit() == single.verify_audit() > 2
        for cap_id in ("root", "rated", "leaf-0", "leaf-1", "leaf-2"):
            assert batched.uses(cap_id) == single.uses(cap_id)
    finally:
        batched.close()
        single.close()


def test_a_write_between_spends_of_a_batch_is_seen_by_the_later_ones(tmp_path: Path) -> None:
    """Spends queued after a revocation in the same batch are decided after it."""
    from policies.ledger import sqlite

    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        limits = [LinkLimit("root"), LinkLimit("leaf", uses=10)]

        def revoke_root(c: Any) -> bool:
            c.execute(
                "INSERT INTO janus_revocations (cap_id, record, revoked_at) VALUES (?, ?, ?)",
                ("root", "r", NOW),
            )
            return True

        works = [
            sqlite._Work(spend=ledger._prepare(SpendRequest(limits, f"n{i}", NOW + 60, NOW)))
            for i in range(2)
        ]
        works.append(sqlite._Work(fn=revoke_root))
        works += [
            sqlite._Work(spend=ledger._prepare(SpendRequest(limits, f"m{i}", NOW + 60, NOW)))
            for i in range(2)
        ]
        ledger._submit(works)
        assert [type(w.error).__name__ if w.error else "ok" for w in works] == [
            "ok",
            "ok",
            "ok",
            "RevokedError",
            "RevokedError",
        ]
        assert ledger.uses("leaf") == 2 and ledger.verify_audit() == 2
    finally:
        ledger.close()


def test_closed_ledger_refuses(ledger_url: str) -> None:
    opened = open_ledger(ledger_url)
    opened.close()
    with pytest.raises(LedgerError, match="closed"):
        opened.uses("x")


# -- SQLite specifics ----------------------------------------------------------------


def test_sqlite_files_are_private_and_durable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    try:
        spend(ledger, chain(1))
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
        conn = ledger._writer
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        ledger.close()


# -- open_ledger ---------------------------------------------------------------------


def test_open_ledger_sqlite_forms(tmp_path: Path) -> None:
    spaced = tmp_path / "with space.db"
    with open_ledger(f"sqlite://{str(spaced).replace(' ', '%20')}") as ledger:
        assert isinstance(ledger, SqliteLedger) and ledger.path == spaced
    with open_ledger(str(tmp_path / "bare.db")) as ledger:
        assert isinstance(ledger, SqliteLedger)
    with open_ledger(f"sqlite:///{tmp_path / 'four.db'}") as ledger:  # sqlite:////tmp/…
        assert isinstance(ledger, SqliteLedger) and ledger.path == tmp_path / "four.db"
    assert spaced.exists() and (tmp_path / "bare.db").exists()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://user@host/db",
        "http://example.org/ledger",
        "sqlite://host/path.db",
        "sqlite:relative.db",
        "sqlite:///",
        "sqlite://",
        "sqlite:///tmp/x.db?mode=ro",
        "postgresql:dbname=janus",
        ":memory:",
    ],
)
def test_open_ledger_refuses_bad_urls(url: str) -> None:
    with pytest.raises(FormatError):
        open_ledger(url)


def test_open_ledger_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="directory"):
        open_ledger(str(tmp_path))


def test_unreachable_postgres_names_the_redacted_dsn() -> None:
    with pytest.raises(LedgerError) as failed:
        open_ledger("postgresql://janus:s3cret@127.0.0.1:1/janus?connect_timeout=2")
    assert "s3cret" not in str(failed.value)
    assert "postgresql://janus:***@127.0.0.1:1/janus" in str(failed.value)


def test_missing_psycopg_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    with pytest.raises(LedgerError, match=r"pip install 'janus-hsm\[postgres\]'"):
        open_ledger("postgres://janus@127.0.0.1:1/janus")


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db?password=pw&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
        ("host=h password='p w' dbname=d", "host=h password=*** dbname=d"),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted
