"""Benchmark: spends per second through the Janus ledger vs a raw single-statement update.

Why these measurements:

* Every use of a capability ends in ``Ledger.spend``: one durable transaction that
  refuses a replayed nonce, a revoked link or an exhausted one, counts a use on every
  link of the chain and appends a hash-chained audit entry.  A limit that a crash can
  forget is not a limit, so the transaction must be on disk before the call returns.
  The cheapest durable thing a store can do per use is one single-statement
  transaction, ``UPDATE counts SET n = n + 1 WHERE id = ? AND n < ?``; that is the
  baseline, run side by side against the same database (SQLite: its own table in the
  ledger's file, the same WAL and ``synchronous=FULL``; PostgreSQL: its own table in
  the ledger's database, autocommit).  Target: janus/raw >= 0.8.
* A spend necessarily writes more than one counter: a nonce row (and its indexes), one
  row per link, an audit row, and on PostgreSQL the audit head.  The API has no switch
  to leave the audit out, so to show where the time goes the benchmark also runs the
  same writes as hand-written SQL on tables of its own, without Janus's Python layer
  or checks: once without the audit row and once with it.  janus / "same writes"
  is Janus's own overhead; "same writes" / raw is what recording a use costs in that
  store.
* PostgreSQL is there for several processes or hosts sharing limits, so it is measured
  with 1 and with 4 concurrent clients: spawned processes, each with its own ledger
  and its own raw connection, all spending on the same 2-link chain (raw: all updating
  the same row), started together at a barrier.  SQLite is one client (one writer is
  what SQLite allows; see docs/ledger.md).

The PostgreSQL rows need Debian's ``postgresql`` server binaries (``make test``
installs them) and psycopg; the benchmark starts a throwaway cluster (fsync on) the
way the test suite does (hardware/postgres.py) and prints a clear skip if it cannot.
Everything lives in a temporary directory on the same disk and is deleted at the end.

It is a benchmark, not a test: it prints a table (and writes JSON with ``--json``) and
only fails when an operation itself fails.  Run it as::

    .venv/bin/python benchmarks/ledger.py [--seconds S] [--repeat N] [--json OUT]
        [--no-postgres] [--clients 1,4] [--pg-function-times]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import hashlib
import json
import multiprocessing as mp
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Benchmark the checkout this file lives in, not whatever janus_hsm is installed.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
from harness import median, ops_per_second, positive_int, progress  # noqa: E402

from policies.ledger import Ledger, LinkLimit, open_ledger  # noqa: E402

DEFAULT_SECONDS = 0.6
DEFAULT_REPEAT = 9
WARMUP_SECONDS = 0.3
BARRIER_TIMEOUT = 120.0
DEFAULT_CLIENTS = (1, 4)  # PostgreSQL clients

TARGET_JANUS_VS_RAW = 0.8

BIG = 10**15  # a use limit that never runs out
NONCE_LIFETIME = 300.0
AUDIT_DATA = {"can": "sign/payment", "with": "janus:payments/eur"}
AUDIT_TEXT = json.dumps(AUDIT_DATA, sort_keys=True, separators=(",", ":"))

Operation = Callable[[], object]


def cap_id() -> str:
    """A capability id as Janus makes them: base64url(SHA-256(...)), 43 characters."""
    digest = hashlib.sha256(os.urandom(32)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_nonce() -> str:
    """A fresh invocation nonce: 144 random bits, base64url (as policies.invocation)."""
    return base64.urlsafe_b64encode(os.urandom(18)).decode()


# --------------------------------------------------------------------------- timing


# ---------------------------------------------------------------- the three sides


def janus_spender(ledger: Ledger, limits: list[LinkLimit], counter: list[int]) -> Operation:
    def spend() -> None:
        now = time.time()
        ledger.spend(
            limits,
            nonce=new_nonce(),
            nonce_expires_at=now + NONCE_LIFETIME,
            now=now,
            audit=AUDIT_DATA,
        )
        counter[0] += 1

    return spend


def audit_hash(prev: str, seq: int, at: float, cap: str) -> str:
    """The same amount of hashing as a Janus audit entry (not the same canonical form)."""
    body = (
        f'{{"at":{at!r},"cap_id":"{cap}","data":{AUDIT_TEXT},"kind":"use",'
        f'"prev":"{prev}","seq":{seq}}}'
    )
    return hashlib.sha256(body.encode()).hexdigest()


# SQLite --------------------------------------------------------------------------

SQLITE_RAW_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS counts (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    # The same shapes as the ledger's nonce and audit tables (docs/ledger.md).
    "CREATE TABLE IF NOT EXISTS bench_nonces (nonce TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS bench_nonces_expiry ON bench_nonces (expires_at)",
    "CREATE TABLE IF NOT EXISTS bench_audit (seq INTEGER PRIMARY KEY, at REAL NOT NULL,"
    " kind TEXT NOT NULL, cap_id TEXT NOT NULL, data TEXT NOT NULL, prev TEXT NOT NULL,"
    " hash TEXT NOT NULL)",
)


class SqliteRaw:
    """Hand-written SQL on the benchmark's own tables in the ledger's database file."""

    def __init__(self, path: Path, leaf: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"SQLite refused WAL mode (got {mode!r})")
        self.conn.execute("PRAGMA synchronous = FULL")  # as the ledger: durable commits
        for statement in SQLITE_RAW_SCHEMA:
            self.conn.execute(statement)
        self.conn.executemany(
            "INSERT OR IGNORE INTO counts (id, n) VALUES (?, 0)", [(1,), (2,), (3,)]
        )
        self.leaf = leaf

    def update(self) -> None:
        """The baseline: one UPDATE, its own (autocommit) transaction."""
        cur = self.conn.execute("UPDATE counts SET n = n + 1 WHERE id = ? AND n < ?", (1, BIG))
        if cur.rowcount != 1:
            raise RuntimeError("raw update changed no row")

    def same_writes(self, audit: bool) -> Operation:
        """Nonce insert, 2 link updates (and an audit row) in one BEGIN IMMEDIATE transaction."""
        conn, leaf = self.conn, self.leaf

        def spend() -> None:
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO bench_nonces (nonce, expires_at) VALUES (?, ?)",
                    (new_nonce(), now + NONCE_LIFETIME),
                )
                conn.execute("UPDATE counts SET n = n + 1 WHERE id IN (2, 3) AND n < ?", (BIG,))
                if audit:
                    row = conn.execute(
                        "SELECT seq, hash FROM bench_audit ORDER BY seq DESC LIMIT 1"
                    ).fetchone()
                    seq, prev = (1, "0" * 64) if row is None else (row[0] + 1, row[1])
                    conn.execute(
                        "INSERT INTO bench_audit (seq, at, kind, cap_id, data, prev, hash)"
                        " VALUES (?, ?, 'use', ?, ?, ?, ?)",
                        (seq, now, leaf, AUDIT_TEXT, prev, audit_hash(prev, seq, now, leaf)),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return spend

    def close(self) -> None:
        self.conn.close()


# PostgreSQL ----------------------------------------------------------------------

PG_RAW_UPDATE = "UPDATE counts SET n = n + 1 WHERE id = %s AND n < %s"

# The rows a Janus spend writes, in the order it locks them (link rows in id order,
# the audit head last), with none of its checks: a nonce row, 2 link rows and, with
# the audit, the audit row and the audit head.  A server-side function, like the
# ledger's, so that it is one round trip and the head is held only for its tail.
PG_SAME_WRITES_FUNCTION = """
CREATE OR REPLACE FUNCTION bench_spend(
    p_nonce text, p_expires double precision, p_big bigint, p_audit boolean,
    p_at double precision, p_cap text, p_prefix text, p_data text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_seq bigint;
    v_prev text;
    v_hash text;
BEGIN
    INSERT INTO bench_nonces (nonce, expires_at) VALUES (p_nonce, p_expires);
    PERFORM 1 FROM counts WHERE id IN (2, 3) ORDER BY id FOR UPDATE;
    UPDATE counts SET n = n + 1 WHERE id IN (2, 3) AND n < p_big;
    IF NOT p_audit THEN
        RETURN 0;
    END IF;
    SELECT h.seq, h.hash INTO v_seq, v_prev FROM bench_head AS h WHERE h.id = 1 FOR UPDATE;
    v_seq := v_seq + 1;
    v_hash := encode(sha256(convert_to(
        p_prefix || '"' || v_prev || '","seq":' || v_seq::text || '}', 'UTF8')), 'hex');
    INSERT INTO bench_audit (seq, at, kind, cap_id, data, prev, hash)
        VALUES (v_seq, p_at, 'use', p_cap, p_data, v_prev, v_hash);
    UPDATE bench_head SET seq = v_seq, hash = v_hash WHERE id = 1;
    RETURN v_seq;
END
$fn$
"""
PG_SAME_WRITES = "SELECT bench_spend(%s, %s, %s, %s, %s, %s, %s, %s)"


PG_RAW_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS counts (id integer PRIMARY KEY, n bigint NOT NULL)",
    "INSERT INTO counts (id, n) VALUES (1, 0), (2, 0), (3, 0) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS bench_nonces (nonce text PRIMARY KEY,"
    " expires_at double precision NOT NULL)",
    "CREATE INDEX IF NOT EXISTS bench_nonces_expiry ON bench_nonces (expires_at)",
    "CREATE TABLE IF NOT EXISTS bench_audit (seq bigint PRIMARY KEY,"
    " at double precision NOT NULL, kind text NOT NULL, cap_id text NOT NULL,"
    " data text NOT NULL, prev text NOT NULL, hash text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bench_head (id integer PRIMARY KEY, seq bigint NOT NULL,"
    " hash text NOT NULL)",
    "INSERT INTO bench_head (id, seq, hash) VALUES (1, 0, repeat('0', 64)) ON CONFLICT DO NOTHING",
    PG_SAME_WRITES_FUNCTION,
)


def pg_operations(
    dsn: str, limits: list[LinkLimit], counter: list[int]
) -> tuple[Ledger, Any, dict[str, Operation]]:
    """A ledger, a raw autocommit connection, and the workloads that use them."""
    import psycopg

    ledger = open_ledger(dsn)
    conn = psycopg.connect(dsn, autocommit=True)
    leaf = limits[-1].cap_id

    def raw() -> None:
        cur = conn.execute(PG_RAW_UPDATE, (1, BIG))
        if cur.rowcount != 1:
            raise RuntimeError("raw update changed no row")

    def same_writes(audit: bool) -> Operation:
        def spend() -> None:
            now = time.time()
            prefix = f'{{"at":{now!r},"cap_id":"{leaf}","data":{AUDIT_TEXT},"kind":"use","prev":'
            conn.execute(
                PG_SAME_WRITES,
                (new_nonce(), now + NONCE_LIFETIME, BIG, audit, now, leaf, prefix, AUDIT_TEXT),
            )

        return spend

    workloads: dict[str, Operation] = {
        "janus": janus_spender(ledger, limits, counter),
        "raw": raw,
        "same_writes_no_audit": same_writes(audit=False),
        "same_writes": same_writes(audit=True),
    }
    return ledger, conn, workloads


def _worker(dsn: str, limits: list[LinkLimit], conn: Any, barriers: dict[int, Any]) -> None:
    """A spawned client process: its own ledger and raw connection, reused throughout."""
    try:
        counter = [0]
        ledger, raw_conn, workloads = pg_operations(dsn, limits, counter)
        for operation in workloads.values():  # connect, prepare, warm up
            operation()
        conn.send(("ready", os.getpid()))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, workload, parties, seconds = message
            barriers[parties].wait(BARRIER_TIMEOUT)
            conn.send(("rate", ops_per_second(workloads[workload], seconds)))
        conn.send(("spends", counter[0]))
        raw_conn.close()
        ledger.close()
    except Exception as exc:  # report, so the parent does not wait forever
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ClientPool:
    """Spawned PostgreSQL client processes, started once and reused for every measurement."""

    def __init__(self, dsn: str, limits: list[LinkLimit], clients: tuple[int, ...]) -> None:
        ctx = mp.get_context("spawn")
        size = max(clients)
        self.barriers = {n: ctx.Barrier(n + 1) for n in clients}
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        try:
            for _ in range(size):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker, args=(dsn, limits, child_end, self.barriers), daemon=True
                )
                process.start()
                child_end.close()
                self.conns.append(parent_end)
                self.processes.append(process)
            for i in range(size):
                self._expect(i, "ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, index: int, kind: str) -> Any:
        conn, process = self.conns[index], self.processes[index]
        try:
            if not conn.poll(BARRIER_TIMEOUT):
                raise RuntimeError(f"client {index} did not answer in {BARRIER_TIMEOUT} s")
            got, value = conn.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(f"client {index} died (exit code {process.exitcode})") from None
        if got == "error":
            raise RuntimeError(f"client {index} failed: {value}")
        if got != kind:
            raise RuntimeError(f"client {index} sent {got!r}, expected {kind!r}")
        return value

    def run(self, workload: str, clients: int, seconds: float) -> float:
        """Total ops/s of ``clients`` processes running ``workload`` from a shared start."""
        for conn in self.conns[:clients]:
            conn.send(("run", workload, clients, seconds))
        self.barriers[clients].wait(BARRIER_TIMEOUT)
        return sum(float(self._expect(i, "rate")) for i in range(clients))

    def stop(self) -> int:
        """Stop the clients; return how many Janus spends they made in all."""
        total = 0
        for i, conn in enumerate(self.conns):
            conn.send(("stop",))
            total += int(self._expect(i, "spends"))
        self.close()
        return total

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)


# ------------------------------------------------------------------ measurements


@dataclass(frozen=True)
class Measurement:
    key: str  # "<store>/<side>"
    store: str
    side: str
    run: Callable[[float], float]  # seconds -> ops/s


def in_process(operation: Operation) -> Callable[[float], float]:
    return lambda seconds: ops_per_second(operation, seconds)


def in_clients(pool: ClientPool, workload: str, clients: int) -> Callable[[float], float]:
    return lambda seconds: pool.run(workload, clients, seconds)


SIDES = {
    "janus": "Janus Ledger.spend (2-link chain)",
    "raw": "raw: one UPDATE, one transaction",
    "same_writes_no_audit": "same writes, no audit: nonce + 2 links",
    "same_writes": "same writes: nonce + 2 links + audit",
}


@dataclass(frozen=True)
class Store:
    key: str
    label: str


def run_interleaved(
    measurements: list[Measurement], seconds: float, repeat: int
) -> dict[str, list[float]]:
    for m in measurements:
        m.run(min(WARMUP_SECONDS, seconds))
    samples: dict[str, list[float]] = {m.key: [] for m in measurements}
    for rep in range(repeat):
        for m in measurements if rep % 2 == 0 else reversed(measurements):
            gc.collect()
            samples[m.key].append(m.run(seconds))
        progress(f"  repetition {rep + 1}/{repeat} done")
    return samples


def ratio_row(
    store: Store, a: str, b: str, samples: dict[str, list[float]], target: float | None
) -> dict[str, Any]:
    sa, sb = samples[f"{store.key}/{a}"], samples[f"{store.key}/{b}"]
    ratios = [x / y for x, y in zip(sa, sb, strict=True)]
    ratio = median(ratios)
    row: dict[str, Any] = {
        "store": store.key,
        "a": a,
        "b": b,
        "ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target": target,
    }
    if target is not None:
        row["met"] = ratio >= target
    return row


# ------------------------------------------------------------------------ output


def environment() -> dict[str, Any]:
    return {
        **harness.machine(),
        "sqlite": sqlite3.sqlite_version,
        "psycopg": harness.version("psycopg"),
        "postgresql": None,
    }


def render(result: dict[str, Any]) -> str:
    env, params = result["environment"], result["parameters"]
    lines = [
        "Janus ledger: durable spends/s vs a raw single-statement update, same database",
        f"{env['date_utc']}  {env['os']}  {env['cpu_count']} CPUs  Python {env['python']}  "
        f"SQLite {env['sqlite']}  PostgreSQL {env['postgresql'] or '-'}  "
        f"psycopg {env['psycopg'] or '-'}",
        f"{params['repeat']} repetitions x {params['seconds']:g} s per measurement, "
        "interleaved; medians. Ratio = median of the per-repetition ratios "
        "(range in brackets).",
        f"load average at start / end: {env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}",
        "",
    ]
    header = f"{'store':<26}{'workload':<42}{'ops/s':>9}{'us/op':>8}"
    lines += [header, "-" * len(header)]
    for row in result["workloads"]:
        lines.append(
            f"{row['store_label']:<26}{SIDES[row['side']]:<42}"
            f"{row['ops_per_s']:>9,.0f}{1e6 / row['ops_per_s']:>8.0f}"
        )
    header = f"{'store':<26}{'ratio':<34}{'':>8}{'range':>14}{'target':>9}{'met':>5}"
    lines += ["", header, "-" * len(header)]
    labels = {
        "janus": "janus",
        "raw": "raw",
        "same_writes": "same",
        "same_writes_no_audit": "same-no-audit",
    }
    for row in result["ratios"]:
        if row["target"] is None:
            target, met = "info", ""
        else:
            target, met = f">={row['target']:.1f}x", "yes" if row["met"] else "NO"
        name = f"{labels[row['a']]} / {labels[row['b']]}"
        span = f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]"
        lines.append(
            f"{row['store_label']:<26}{name:<34}{row['ratio']:>7.2f}x{span:>14}{target:>9}{met:>5}"
        )
    if result["postgres_skipped"]:
        lines += ["", f"PostgreSQL rows skipped: {result['postgres_skipped']}"]
    if result["pg_function_times"]:
        lines += [
            "",
            "PostgreSQL server-side execution per call, whole run (track_functions; the",
            "commit's WAL flush, the round trip and the client are not included):",
        ]
        for row in result["pg_function_times"]:
            lines.append(
                f"  {row['function']:<14}{row['calls']:>8} calls{row['total_us']:>8.0f} us total"
                f"{row['self_us']:>8.0f} us in itself"
            )
    lines += ["", "Checks after the run:"]
    lines += [f"  {check}" for check in result["checks"]]
    lines += [
        "",
        "'same writes' is hand-written SQL on the benchmark's own tables that writes the rows",
        "a spend writes (nonce row + indexes, 2 link rows; with the audit: the audit row, and",
        "on PostgreSQL the audit head), without Janus's checks or Python layer. janus / same",
        "is Janus's own overhead; same / raw is what recording a use costs in that store.",
    ]
    return "\n".join(line.rstrip() for line in lines)


# -------------------------------------------------------------------------- main


def client_counts(text: str) -> tuple[int, ...]:
    counts = tuple(sorted({positive_int(part) for part in text.split(",")}))
    if not counts:
        raise argparse.ArgumentTypeError("give one or more client counts, e.g. 1,4")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Janus ledger spends/s vs a raw single-statement update (SQLite, PostgreSQL)."
    )
    harness.add_run_arguments(parser, seconds=DEFAULT_SECONDS, repeat=DEFAULT_REPEAT)
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    parser.add_argument(
        "--clients",
        type=client_counts,
        default=DEFAULT_CLIENTS,
        metavar="N,M",
        help=f"PostgreSQL client counts to measure (default {','.join(map(str, DEFAULT_CLIENTS))})",
    )
    parser.add_argument(
        "--pg-function-times",
        action="store_true",
        help="also report the server-side time per call of the PL/pgSQL functions "
        "(janus_spend, bench_spend), averaged over the run (with several clients this "
        "includes row-lock waits: use --clients 1); adds a little timing overhead to both",
    )
    return parser.parse_args(argv)


def start_postgres() -> tuple[Any, str | None]:
    """A throwaway cluster as the test suite starts it, or (None, why not)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install 'janus-hsm[postgres]')"
    try:
        from hardware.postgres import PostgresUnavailable, start_cluster
    except ImportError as exc:
        return None, f"hardware.postgres is not available: {exc}"
    try:
        return start_cluster(), None
    except PostgresUnavailable as exc:
        return None, f"cannot start PostgreSQL: {exc}"


def read_function_times(dsn: str) -> list[dict[str, Any]]:
    """Per-call server time of each PL/pgSQL function, from pg_stat_user_functions.

    Called after every client has disconnected: a backend reports its statistics at
    exit at the latest.
    """
    import psycopg

    time.sleep(1.0)  # let the last backends' statistics arrive
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions"
            " WHERE calls > 0 ORDER BY funcname"
        ).fetchall()
    return [
        {
            "function": str(name),
            "calls": int(calls),
            "total_us": 1000.0 * float(total) / int(calls),
            "self_us": 1000.0 * float(own) / int(calls),
        }
        for name, calls, total, own in rows
    ]


def postgres_version(bin_dir: Path) -> str | None:
    done = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    found = re.search(r"\(PostgreSQL\) (\S+)", done.stdout)
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    env = environment()
    limits = [LinkLimit(cap_id(), uses=BIG), LinkLimit(cap_id(), uses=BIG)]
    checks: list[str] = []
    cluster, skipped = (None, "--no-postgres") if args.no_postgres else start_postgres()
    if skipped:
        progress(f"PostgreSQL rows skipped: {skipped}")
    pool: ClientPool | None = None
    function_times: list[dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(prefix="janus-bench-ledger-") as tmp:
        try:
            path = Path(tmp) / "ledger.db"
            ledger = open_ledger(f"sqlite://{path}")
            raw = SqliteRaw(path, limits[-1].cap_id)
            sqlite_spends = [0]
            sqlite_ops = {
                "janus": janus_spender(ledger, limits, sqlite_spends),
                "raw": raw.update,
                "same_writes_no_audit": raw.same_writes(audit=False),
                "same_writes": raw.same_writes(audit=True),
            }
            stores = [Store("sqlite", "SQLite WAL, sync=FULL")]
            measurements = [
                Measurement(f"sqlite/{side}", "sqlite", side, in_process(op))
                for side, op in sqlite_ops.items()
            ]
            pg_ledger = None
            if cluster is not None:
                env["postgresql"] = postgres_version(cluster.bin_dir)
                dsn = cluster.dsn()
                import psycopg
                import psycopg.sql

                if args.pg_function_times:
                    # Server-side time per call of every PL/pgSQL function (the ledger's
                    # janus_spend and janus_append, the benchmark's bench_spend), in every
                    # session opened from now on.  It adds two clock reads per call.
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        conn.execute(
                            psycopg.sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(
                                psycopg.sql.Identifier(conn.info.dbname)
                            )
                        )
                pg_ledger = open_ledger(dsn)  # creates the ledger's schema once
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for statement in PG_RAW_SCHEMA:
                        conn.execute(statement)
                progress(f"PostgreSQL {env['postgresql']} on port {cluster.port}")
                pool = ClientPool(dsn, limits, args.clients)
                for clients in args.clients:
                    store = Store(
                        f"postgres_{clients}",
                        f"PostgreSQL, {clients} client{'s' if clients > 1 else ''}",
                    )
                    stores.append(store)
                    for side in SIDES:
                        measurements.append(
                            Measurement(
                                f"{store.key}/{side}",
                                store.key,
                                side,
                                in_clients(pool, side, clients),
                            )
                        )
            progress(
                f"measuring {len(measurements)} workloads x {args.repeat} repetitions x "
                f"{args.seconds:g} s"
            )
            samples = run_interleaved(measurements, args.seconds, args.repeat)

            # Every spend the benchmark was told succeeded must be in the ledger.
            leaf = limits[-1].cap_id
            recorded = ledger.uses(leaf)
            audited = ledger.verify_audit()
            checks.append(
                f"SQLite: {sqlite_spends[0]} spends made, {recorded} uses recorded on each "
                f"link, audit chain intact with {audited} entries"
            )
            if recorded != sqlite_spends[0] or audited != sqlite_spends[0]:
                raise RuntimeError(f"SQLite ledger lost spends: {checks[-1]}")
            ledger.close()
            raw.close()
            if pool is not None and pg_ledger is not None:
                made = pool.stop()  # includes each client's spends while warming up
                pool = None
                recorded = pg_ledger.uses(leaf)
                audited = pg_ledger.verify_audit()
                checks.append(
                    f"PostgreSQL: {made} spends made, {recorded} uses recorded on each link, "
                    f"audit chain intact with {audited} entries"
                )
                if recorded != made or audited != made:
                    raise RuntimeError(f"PostgreSQL ledger lost spends: {checks[-1]}")
                pg_ledger.close()
                if args.pg_function_times:
                    function_times = read_function_times(dsn)
        finally:
            if pool is not None:
                pool.close()
            if cluster is not None:
                cluster.stop()
    env["loadavg_end"] = list(os.getloadavg())

    labels = {s.key: s.label for s in stores}
    ratios = []
    for store in stores:
        ratios += [
            ratio_row(store, "janus", "raw", samples, TARGET_JANUS_VS_RAW),
            ratio_row(store, "janus", "same_writes", samples, None),
            ratio_row(store, "same_writes", "raw", samples, None),
            ratio_row(store, "same_writes_no_audit", "raw", samples, None),
        ]
    for row in ratios:
        row["store_label"] = labels[row["store"]]
    result = {
        "benchmark": "ledger",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/ledger.py", *sys.argv[1:]]
            if argv is None
            else ["benchmarks/ledger.py", *argv]
        ),
        "parameters": {
            "seconds": args.seconds,
            "repeat": args.repeat,
            "clients": list(args.clients),
            "audit_data": AUDIT_DATA,
        },
        "environment": env,
        "workloads": [
            {
                "key": m.key,
                "store": m.store,
                "store_label": labels[m.store],
                "side": m.side,
                "ops_per_s": median(samples[m.key]),
                "samples": samples[m.key],
            }
            for m in measurements
        ],
        "ratios": ratios,
        "postgres_skipped": skipped,
        "checks": checks,
        "pg_function_times": function_times,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print(render(result))
    print(f"\n(whole run: {result['wall_seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.json, result)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
