"""Benchmark: RFC 9162 inclusion-proof verifications per second at 10^6 leaves.

Why these measurements:

* Every directory lookup and attestation carries an inclusion proof that the client
  checks (``agent.directory.merkle.verify_inclusion``, RFC 9162 §2.1.3.2); the
  question is what that costs over the SHA-256 it cannot avoid.  The baseline is raw
  ``hashlib``: for each verification, the same number of SHA-256 computations over
  inputs of the same sizes (one ``0x00 || leaf``, then one ``0x01 || left || right``
  per path hash), with no proof logic.  Ratio = verify / baseline (1.0 would mean the
  algorithm costs nothing over its hashes).
* The log of 10^6 leaves (64-byte entries, about a binding leaf's size) is built once
  in the in-memory node store (the same ``MerkleLog`` code the SQLite and PostgreSQL
  stores run); proofs for random indices against the full tree are made once, then
  only verification is timed.  Medians of ``--repeat`` rounds.
* Proof sizes: audit paths and consistency proofs at 10^3 and 10^6 leaves (bytes =
  32 x hashes; the JSON form is base64, 44 characters per hash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.directory.merkle import MemoryNodeStore, MerkleLog, verify_inclusion


def build(n: int) -> tuple[MerkleLog, list[bytes]]:
    log = MerkleLog(MemoryNodeStore())
    leaves = [i.to_bytes(8, "big") * 8 for i in range(n)]
    for leaf in leaves:
        log.append(leaf)
    return log, leaves


def sizes(log: MerkleLog, rng: random.Random, samples: int) -> dict[str, float]:
    n = log.size()
    paths = [len(log.inclusion(rng.randrange(n), n)) for _ in range(samples)]
    cons = [len(log.consistency(rng.randrange(1, n), n)) for _ in range(samples)]
    return {
        "tree_size": n,
        "audit_path_hashes_mean": statistics.mean(paths),
        "audit_path_hashes_max": max(paths),
        "audit_path_bytes_max": 32 * max(paths),
        "consistency_hashes_mean": statistics.mean(cons),
        "consistency_hashes_max": max(cons),
        "consistency_bytes_max": 32 * max(cons),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(9162)

    small, _ = build(1000)
    started = time.perf_counter()
    log, leaves = build(args.leaves)
    build_s = time.perf_counter() - started
    n = log.size()
    root = log.root()
    cases = []
    for _ in range(args.proofs):
        index = rng.randrange(n)
        cases.append((leaves[index], index, log.inclusion(index, n)))

    def verify_round() -> float:
        t = time.perf_counter()
        for leaf, index, path in cases:
            verify_inclusion(leaf, index, n, path, root)
        return len(cases) / (time.perf_counter() - t)

    def baseline_round() -> float:
        sha = hashlib.sha256
        pair = b"\x01" + bytes(64)
        t = time.perf_counter()
        for leaf, _index, path in cases:
            sha(b"\x00" + leaf).digest()
            for _ in path:
                sha(pair).digest()
        return len(cases) / (time.perf_counter() - t)

    verify_rates: list[float] = []
    baseline_rates: list[float] = []
    for i in range(args.repeat):
        order = (verify_round, baseline_round) if i % 2 == 0 else (baseline_round, verify_round)
        for run in order:
            (verify_rates if run is verify_round else baseline_rates).append(run())
    verify_rate = statistics.median(verify_rates)
    baseline_rate = statistics.median(baseline_rates)
    result = {
        "benchmark": "merkle",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "leaves": n,
        "build_seconds": round(build_s, 2),
        "appends_per_second": round(n / build_s),
        "verifications_per_second": round(verify_rate),
        "baseline_sha256_only_per_second": round(baseline_rate),
        "ratio_verify_over_baseline": round(verify_rate / baseline_rate, 3),
        "rounds": {
            "verify": [round(r) for r in verify_rates],
            "baseline": [round(r) for r in baseline_rates],
        },
        "proof_sizes": [sizes(small, rng, 1000), sizes(log, rng, 1000)],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
