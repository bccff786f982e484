"""Run inside a small filesystem (see test_disk_full.py): spend until the disk is full.

    python -m tests.faults.disk_full_child DIR [--fill]

With ``--fill`` the rest of the filesystem is first taken by a filler file; without it,
RLIMIT_FSIZE stops every file from growing (the fallback where no private mount can be
made).  Prints one
JSON object: what was acknowledged, the first refusal (type, code, message), the counts
before and after it, and what a reopened ledger says once space is free again.  Any
exception outside the ledger's typed errors ends the script with a traceback (exit 1).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from policies.errors import LedgerError, PolicyError
from policies.ledger import LinkLimit, open_ledger

CHAIN = [LinkLimit("disk-root", uses=1_000_000), LinkLimit("disk-leaf", uses=1_000_000)]
PAD = "x" * 2048  # audit data, so each use takes room


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last byte
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                        raise
                    break
    finally:
        os.close(fd)


def _spend(ledger: Any, attempt: int) -> None:
    now = time.time()
    ledger.spend(
        CHAIN,
        nonce=f"disk-{attempt}-nonce-padding",
        nonce_expires_at=now + 3600,
        now=now,
        audit={"attempt": attempt, "pad": PAD},
    )


def main(argv: list[str]) -> int:
    directory = Path(argv[0])
    url = f"sqlite://{directory / 'ledger.db'}"
    result: dict[str, Any] = {"acknowledged": 0}
    hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    with open_ledger(url) as ledger:
        for attempt in range(5):
            _spend(ledger, attempt)
            result["acknowledged"] += 1
        if "--fill" in argv:
            _fill(directory / "filler")
        else:  # no private mount: no file may grow past its present size
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
            largest = max(p.stat().st_size for p in directory.iterdir())
            resource.setrlimit(resource.RLIMIT_FSIZE, (largest, hard_limit))
        attempt = 5
        for attempt in range(5, 5000):
            before = ledger.uses("disk-root")
            try:
                _spend(ledger, attempt)
            except LedgerError as exc:
                result["refusal"] = {
                    "type": type(exc).__name__,
                    "code": exc.code,
                    "message": str(exc),
                }
                result["uses_before"] = before
                result["uses_after"] = ledger.uses("disk-root")
                break
            result["acknowledged"] += 1
        # Refused again while still full: typed each time, never a half-written use.
        for retry in range(3):
            try:
                _spend(ledger, 10_000 + retry)
                result["acknowledged"] += 1
            except LedgerError:
                pass
    (directory / "filler").unlink(missing_ok=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard_limit, hard_limit))
    try:
        with open_ledger(url) as reopened:
            result["reopened_uses"] = reopened.uses("disk-root")
            result["reopened_audit"] = reopened.verify_audit()
            _spend(reopened, 20_000)
            result["after_recovery_uses"] = reopened.uses("disk-root")
    except PolicyError as exc:
        result["reopen_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
