"""Benchmark: directory claims with exactly-once prekey consumption, against a raw DELETE.

What it answers
* **Claims/s.** ``DirectoryService.claim`` as the HTTP route runs it, without HTTP: the
  claimer's signed request checked (ES256/EdDSA verify), its nonce recorded, the
  namespace's rate limits counted, the claim recorded, one one-time prekey consumed by
  one ``DELETE … RETURNING`` (PostgreSQL: ``FOR UPDATE SKIP LOCKED``), the package's
  root signature verified, a contact capability signed, and the inclusion proof read,
  all in one transaction.  The directory key is a software Ed25519 key here (a token's
  signature would add its own latency to both a claim and nothing else).
* **Baseline.** The same database, the same durability (SQLite WAL with
  ``synchronous=FULL``; PostgreSQL with fsync on), one transaction per operation doing
  only ``DELETE … RETURNING`` of one row of a table of the same shape.  Target: claims
  >= 0.5x the baseline.
* Both run with 1 and 4 concurrent workers (``--threads``), on SQLite and on a
  throwaway PostgreSQL cluster (hardware/postgres.py), interleaved, medians of
  ``--repeat`` runs.  Claim requests are signed before the clock starts (the claimer's
  work is not the directory's).

Run it as::

    .venv/bin/python benchmarks/directory.py [--claims N] [--repeat N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
from harness import median, progress  # noqa: E402

from agent.directory.keypackage import OneTimePrekey, sign_package  # noqa: E402
from agent.directory.service import (  # noqa: E402
    CLAIM_TYP,
    REQUEST_TYP,
    DirectoryService,
    statement_digest,
)
from agent.directory.store import DirectoryStore  # noqa: E402
from agent.protocol import sign_request  # noqa: E402
from agent.relationships.delivery import Address  # noqa: E402
from agent.relationships.prekeys import PrekeyStore  # noqa: E402
from agent.relationships.suite import Suite  # noqa: E402
from janus_hsm import b64url  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.software import SoftwareProvider  # noqa: E402
from janus_hsm.database_url import sqlite_url  # noqa: E402
from janus_hsm.provider import KeyHandle  # noqa: E402

NAME = "bench@example.org"


def keystore(directory: Path) -> SoftwareProvider:
    return SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: "bench", allow_extractable=True
    )


def unlocked(handle: KeyHandle) -> KeyHandle:
    handle.sign(b"unlock")  # decrypt the key file now, not inside the clock
    return handle


class World:
    """A directory over one database, its owner, and signed claim requests."""

    def __init__(self, url: str, tmp: Path) -> None:
        keys = keystore(tmp / "keys")
        self.directory = unlocked(keys.generate("soft:object=dir", Algorithm.EdDSA))
        self.root = unlocked(keys.generate("soft:object=root", Algorithm.EdDSA))
        self.agreement = keys.generate("soft:object=x", Algorithm.X25519)
        self.claimers = [
            unlocked(keys.generate(f"soft:object=c{i}", Algorithm.EdDSA)) for i in range(8)
        ]
        self.store = DirectoryStore(url)
        self.service = DirectoryService(self.directory, "example.org", self.store)
        self.prekeys = PrekeyStore(tmp / "prekeys", Suite.X25519)
        self.intro = Address(
            "https://receiving.example",
            b64url.encode(os.urandom(16)),
            b64url.encode(os.urandom(32)),
        )

    def refill(self, count: int) -> None:
        while count > 0:
            batch_size = min(count, 200)
            spk, pq, opks, pqopks = self.prekeys.generate(one_time=batch_size)
            batch = [
                OneTimePrekey(o[0], o[1], p[0], p[1]) for o, p in zip(opks, pqopks, strict=True)
            ]
            statement = sign_package(
                self.root, self.agreement, name=NAME, directory=self.directory.did,
                signed_prekey=spk, pq_prekey=pq, one_time=batch,
                batch_id=secrets.token_urlsafe(16), intro=self.intro,
            )  # fmt: skip
            request = sign_request(
                self.root, typ=REQUEST_TYP, audience=self.directory.did, now=int(time.time()),
                op="publish", name=NAME, package=statement_digest(statement),
            )  # fmt: skip
            self.service.publish(
                {"request": request, "package": statement, "prekeys": [p.to_dict() for p in batch]}
            )
            count -= batch_size

    def requests(self, count: int) -> list[dict[str, Any]]:
        now = int(time.time())
        return [
            {
                "request": sign_request(
                    self.claimers[i % len(self.claimers)],
                    typ=CLAIM_TYP,
                    audience=self.directory.did,
                    now=now,
                    op="claim",
                    name=NAME,
                )
            }
            for i in range(count)
        ]


def raw_table(store: DirectoryStore, rows: int) -> None:
    with store.transaction() as tx:
        serial = "BIGSERIAL PRIMARY KEY" if tx.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS raw_prekeys (id {serial}, name TEXT NOT NULL,"
            " prekey TEXT NOT NULL, path TEXT NOT NULL)"
        )
        tx.execute("CREATE INDEX IF NOT EXISTS raw_by_name ON raw_prekeys (name, id)")
        payload = "x" * 1800  # about one stored prekey pair's JSON
        for _ in range(rows):
            tx.execute(
                "INSERT INTO raw_prekeys (name, prekey, path) VALUES (?, ?, ?)",
                (NAME, payload, "[]"),
            )


def raw_delete(store: DirectoryStore) -> Callable[[], None]:
    def take() -> None:
        with store.transaction() as tx:
            lock = " FOR UPDATE SKIP LOCKED" if tx.postgres else ""
            row = tx.execute(
                "DELETE FROM raw_prekeys WHERE id = (SELECT id FROM raw_prekeys WHERE name = ?"  # noqa: S608
                f" ORDER BY id LIMIT 1{lock}) RETURNING prekey, path",
                (NAME,),
            ).fetchone()
            assert row is not None

    return take


def timed(workers: int, count: int, operation: Callable[[int], None]) -> float:
    """Operations per second of ``count`` operations spread over ``workers`` threads."""
    start = threading.Barrier(workers + 1)
    per = count // workers

    def run(w: int) -> None:
        start.wait()
        for i in range(per):
            operation(w * per + i)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return per * workers / (time.perf_counter() - began)


def measure(url: str, tmp: Path, claims: int, workers: int) -> dict[str, float]:
    world = World(url, tmp)
    world.refill(claims)
    requests = world.requests(claims)
    one_time = [0]

    def claim(i: int) -> None:
        answer = world.service.claim(requests[i])
        if not answer["last_resort"]:
            one_time[0] += 1

    claims_per_s = timed(workers, claims, claim)
    assert one_time[0] == claims, "every claim must have consumed a one-time prekey"
    raw_table(world.store, claims)
    take = raw_delete(world.store)
    raw_per_s = timed(workers, claims, lambda i: take())
    world.store.close()
    return {"claims_per_s": claims_per_s, "raw_delete_per_s": raw_per_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=harness.positive_int, default=400)
    parser.add_argument(
        "--threads",
        default="1,4",
        help="comma-separated numbers of concurrent workers to measure (default 1,4)",
    )
    parser.add_argument("--repeat", type=harness.positive_int, default=3)
    parser.add_argument("--json", type=Path, metavar="OUT")
    args = parser.parse_args()
    from hardware.postgres import start_cluster

    threads = [int(t) for t in args.threads.split(",")]
    result: dict[str, Any] = {**harness.machine(), "claims": args.claims, "threads": threads}
    cluster = start_cluster()
    try:
        runs: dict[str, list[dict[str, float]]] = {
            f"{b}-{t}": [] for b in ("sqlite", "postgresql") for t in threads
        }
        for attempt in range(args.repeat):
            for backend, workers in ((b, t) for t in threads for b in ("sqlite", "postgresql")):
                with tempfile.TemporaryDirectory(prefix="janus-dir-bench-") as tmp:
                    if backend == "sqlite":
                        url = sqlite_url(Path(tmp) / "directory.db")
                    else:
                        import psycopg

                        db = f"bench_{secrets.token_hex(4)}"
                        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                            conn.execute(f"CREATE DATABASE {db}")
                        url = cluster.dsn(db)
                    progress(f"run {attempt + 1}/{args.repeat}: {backend}, {workers} thread(s)")
                    runs[f"{backend}-{workers}"].append(
                        measure(url, Path(tmp), args.claims, workers)
                    )
    finally:
        cluster.stop()
    for backend, samples in runs.items():
        claims = median([s["claims_per_s"] for s in samples])
        raw = median([s["raw_delete_per_s"] for s in samples])
        # Each run measures both back to back on one database: its own ratio is what a
        # busy machine's drift between runs does not distort.
        ratio = median([s["claims_per_s"] / s["raw_delete_per_s"] for s in samples])
        result[backend] = {
            "claims_per_s": claims,
            "raw_delete_per_s": raw,
            "ratio": ratio,
            "samples": samples,
        }
        print(
            f"{backend:14s}  claims/s {claims:8.0f}   raw DELETE…RETURNING/s {raw:8.0f}   "
            f"ratio {ratio:.2f} (median of runs; target >= 0.5)"
        )
    result["loadavg_end"] = list(os.getloadavg())
    if args.json:
        harness.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
