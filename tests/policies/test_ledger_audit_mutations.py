"""`janus audit verify` over systematically damaged audit logs, SQLite and PostgreSQL.

A real log is written by the real ledger (grants, uses, a revocation); then every
column of every row is set to values of every stored type, rows are deleted,
duplicated and inserted out of sequence, and the schema version is altered.  Each
damaged log must be refused the one documented way: exit status 1, one
``janus: error:`` line on stderr (no traceback), and with ``--json`` a document with
``"valid": false`` and an error code.  A mutation the database itself refuses (a
type PostgreSQL will not store, a duplicate key) is not a damaged log, and is counted
apart; the test insists most mutations do apply.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.cli import main
from policies.errors import LimitExceededError
from policies.ledger import LinkLimit, open_ledger
from tests.policies.conftest import LedgerDb

NOW = 1_700_000_000.0
COLUMNS = ("seq", "at", "kind", "cap_id", "data", "prev", "hash")
INSERT = f"INSERT INTO janus_audit ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * 7)})"  # noqa: S608
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_DATA = f"UPDATE janus_audit SET data = '{DEEP}' WHERE seq = 2"  # noqa: S608
CODES = {"audit_broken", "ledger_error", "ledger_not_found"}


@dataclass
class Mutation:
    name: str
    statements: list[tuple[str, tuple[Any, ...]]]
    loosen: bool = False  # SQLite: drop the NOT NULL constraints first (to store NULLs)
    applied: bool = field(default=False, compare=False)


def write_log(url: str) -> list[tuple[Any, ...]]:
    """A log of 6 entries written by the ledger itself; returns its rows."""
    with open_ledger(url) as ledger:
        ledger.record_grant("cap-root", {"to": "did:key:z6MkA", "uses": 5})
        ledger.record_grant("cap-leaf", {"to": "did:key:z6MkB", "uses": 2})
        limits = [LinkLimit("cap-root", uses=5), LinkLimit("cap-leaf", uses=2)]
        for i in range(3):
            # The third use is over the leaf's limit: refused, and not audited.
            with contextlib.suppress(LimitExceededError):
                ledger.spend(
                    limits,
                    nonce=uuid.uuid4().hex,
                    nonce_expires_at=NOW + 60,
                    now=NOW + i,
                    audit={"action": "sign/payment", "n": str(i)},
                )
        ledger.spend(limits[:1], nonce="x", nonce_expires_at=NOW + 60, now=NOW + 9)
        ledger.revoke("cap-leaf", record="r", data={"reason": "test"})
        assert ledger.verify_audit() == 6
    return LedgerDb(url).execute(f"SELECT {', '.join(COLUMNS)} FROM janus_audit ORDER BY seq")  # noqa: S608


def one_char_changed(value: Any) -> Any:
    """The value with one character of its text changed, as the same type if it parses."""
    text = repr(value) if isinstance(value, float) else str(value)
    i = next((k for k in range(len(text) - 1, -1, -1) if text[k].isdigit()), len(text) - 1)
    if text[i].isdigit():
        swapped = "1" if text[i] == "0" else "0"
    else:
        swapped = "y" if text[i] == "x" else "x"
    changed = text[:i] + swapped + text[i + 1 :]
    for kind in (int, float):
        if isinstance(value, kind):
            return kind(changed)
    return changed


def mutations(rows: list[tuple[Any, ...]]) -> Iterator[Mutation]:
    values: list[tuple[str, Any]] = [
        ("NULL", None),
        ("blob", b"\x00\xff"),
        ("empty", ""),
        ("-1", -1),
        ("0", 0),
        ("huge", 2**63 - 1),
        ("float", 1.5),
        ("deep JSON", DEEP),
    ]
    last = len(rows)
    for row in rows:
        seq = row[0]
        for column, original in zip(COLUMNS, row, strict=True):
            sql = f"UPDATE janus_audit SET {column} = %s WHERE seq = %s"  # noqa: S608
            for label, value in [*values, ("one char", one_char_changed(original))]:
                yield Mutation(
                    f"entry {seq} {column} := {label}",
                    [(sql, (value, seq))],
                    loosen=value is None,
                )
        yield Mutation(f"entry {seq} deleted", [("DELETE FROM janus_audit WHERE seq = %s", (seq,))])
        yield Mutation(f"entry {seq} duplicated", [(INSERT, (last + 1, *row[1:]))])
    for new_seq in (-1, 0, last + 1, -(2**63)):
        yield Mutation(f"entry inserted at seq {new_seq}", [(INSERT, (new_seq, *rows[0][1:]))])
    yield Mutation(
        "entry 2 renumbered -1",
        [("UPDATE janus_audit SET seq = -1 WHERE seq = 2", ())],
    )
    yield Mutation("all entries deleted but the head kept", [("DELETE FROM janus_audit", ())])
    version = "UPDATE janus_meta SET value = %s WHERE key = 'schema_version'"
    for label, value in [*values, ("one char", "2"), ("text", "one"), ("padded", " 1")]:
        yield Mutation(f"schema_version := {label}", [(version, (value,))])
    yield Mutation(
        "schema_version deleted", [("DELETE FROM janus_meta WHERE key = 'schema_version'", ())]
    )


class Store:
    """Gives each mutation a fresh copy of the written log, as a ledger URL."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.rows = write_log(url)
        self.is_sqlite = url.startswith("sqlite:")
        self.original = self._contents(url)
        if not self.is_sqlite:
            db = LedgerDb(url)
            self.saved = {
                table: db.execute(f"SELECT * FROM {table}")  # noqa: S608
                for table in ("janus_audit", "janus_audit_head", "janus_meta")
            }

    def apply(self, mutation: Mutation, index: int) -> str | None:
        """The URL of a copy with ``mutation`` applied, or None if the database refused
        it or it changed nothing (PostgreSQL rounds 1.5 into a bigint seq of 2…)."""
        url = self._apply(mutation, index)
        if url is None or (mutation.statements and self._contents(url) == self.original):
            return None
        return url

    @staticmethod
    def _contents(url: str) -> list[list[tuple[Any, ...]]]:
        db = LedgerDb(url)
        return [
            db.execute("SELECT * FROM janus_audit ORDER BY seq"),
            db.execute("SELECT * FROM janus_meta ORDER BY key"),
        ]

    def _apply(self, mutation: Mutation, index: int) -> str | None:
        if self.is_sqlite:
            return self._apply_sqlite(mutation, index)
        self._restore()
        try:
            with psycopg.connect(self.url, autocommit=True) as pg, pg.transaction():
                for sql, params in mutation.statements:
                    pg.execute(sql.encode(), params)
        except psycopg.Error:
            return None
        return self.url

    def _apply_sqlite(self, mutation: Mutation, index: int) -> str | None:
        source = Path(self.url.removeprefix("sqlite://"))
        copy = self.tmp / f"case-{index}.db"
        shutil.copyfile(source, copy)
        conn = sqlite3.connect(copy, isolation_level=None)
        try:
            conn.execute("BEGIN")
            if mutation.loosen:
                conn.execute("ALTER TABLE janus_audit RENAME TO old_audit")
                conn.execute(
                    "CREATE TABLE janus_audit (seq INTEGER PRIMARY KEY, at REAL, kind TEXT,"
                    " cap_id TEXT, data TEXT, prev TEXT, hash TEXT)"
                )
                conn.execute("INSERT INTO janus_audit SELECT * FROM old_audit")
                conn.execute("DROP TABLE old_audit")
            for sql, params in mutation.statements:
                conn.execute(sql.replace("%s", "?"), params)
            conn.execute("COMMIT")
        except (sqlite3.Error, OverflowError):
            return None
        finally:
            conn.close()
        return f"sqlite://{copy}"

    def _restore(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as pg, pg.transaction():
            for table, rows in self.saved.items():
                pg.execute(f"DELETE FROM {table}".encode())  # noqa: S608
                for row in rows:
                    marks = ", ".join(["%s"] * len(row))
                    pg.execute(f"INSERT INTO {table} VALUES ({marks})".encode(), row)  # noqa: S608


def verify(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["audit", "verify", "--ledger", url, "--json"])
    out = capsys.readouterr()
    return status, out.out, out.err


def assert_refused(name: str, status: int, out: str, err: str) -> None:
    assert status == 1, f"{name}: accepted as valid: {out}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("janus: error: "), f"{name}: {err}"
    assert "Traceback" not in err
    document = json.loads(out)
    assert document["valid"] is False, name
    assert document["error"]["code"] in CODES, (name, document)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_every_damaged_audit_log_is_refused(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = _fresh_url(backend, request, tmp_path)
    store = Store(url, tmp_path)
    status, out, err = verify(store.apply(Mutation("none", []), 0) or "", capsys)
    assert status == 0 and json.loads(out) == {"valid": True, "entries": 6}, err
    applied = refused_by_db = 0
    for index, mutation in enumerate(mutations(store.rows), start=1):
        damaged = store.apply(mutation, index)
        if damaged is None:
            refused_by_db += 1
            continue
        applied += 1
        assert_refused(mutation.name, *verify(damaged, capsys))
    # SQLite stores every type in every column but seq; PostgreSQL refuses wrong types.
    assert applied >= (350 if backend == "sqlite" else 150), (applied, refused_by_db)


def _fresh_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'ledger.db'}"
    from tests.policies.conftest import with_schema

    dsn: str = request.getfixturevalue("postgres_dsn")
    schema = f"m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())

    request.addfinalizer(drop)
    return with_schema(dsn, schema)


@pytest.mark.parametrize(
    ("name", "sql"),
    [
        ("kind stored as a blob", "UPDATE janus_audit SET kind = x'00ff' WHERE seq = 2"),
        ("cap_id stored as a blob", "UPDATE janus_audit SET cap_id = x'00ff' WHERE seq = 1"),
        ("seq set to -1", "UPDATE janus_audit SET seq = -1 WHERE seq = 1"),
        (
            "entry added at seq 0",
            "INSERT INTO janus_audit SELECT 0, at, kind, cap_id, data, prev, hash"
            " FROM janus_audit WHERE seq = 1",
        ),
        ("at empty", "UPDATE janus_audit SET at = '' WHERE seq = 3"),
        ("data nested 100,000 deep", DEEP_DATA),
        ("last entry removed", "DELETE FROM janus_audit WHERE seq = 6"),
        (
            "schema_version not a number",
            "UPDATE janus_meta SET value = 'one' WHERE key = 'schema_version'",
        ),
    ],
)
def test_damaged_log_through_the_real_command(tmp_path: Path, name: str, sql: str) -> None:
    """The cases that were accepted or crashed, as a user runs them."""
    url = f"sqlite://{tmp_path / 'ledger.db'}"
    write_log(url)
    conn = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    conn.execute(sql)
    conn.close()
    for as_json in (True, False):
        result = subprocess.run(
            [sys.executable, "-m", "agent", "audit", "verify", "--ledger", url]
            + (["--json"] if as_json else []),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if as_json:
            assert_refused(name, result.returncode, result.stdout, result.stderr)
        else:
            assert result.returncode == 1 and result.stdout == "", name
            assert result.stderr.startswith("janus: error: ") and "Traceback" not in result.stderr
