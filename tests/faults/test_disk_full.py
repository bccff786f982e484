"""The disk fills up under the SQLite ledger: a typed error, and nothing half-written.

The ledger lives on a 4 MiB tmpfs mounted in a private mount namespace (``unshare -m``,
so nothing outside the test sees it), filled to the last byte once a few uses are
recorded (tests/faults/disk_full_child.py does the spending inside the namespace).
Where no namespace can be made (not root, no CAP_SYS_ADMIN in a container) the same
child runs under RLIMIT_FSIZE instead, which makes every file-growing write fail with
EFBIG: a weaker stand-in for ENOSPC, named in the test's id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT_DIR = Path(__file__).resolve().parents[2]


def _private_tmpfs_works(directory: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", directory],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


def _run_child(directory: Path) -> tuple[str, dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    child = [sys.executable, "-m", "tests.faults.disk_full_child"]
    if _private_tmpfs_works(directory):
        how = "tmpfs"
        script = 'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@" "$0" --fill'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(directory)]
        argv += child
    else:
        how = "rlimit-fsize"
        argv = [*child, str(directory)]
    done = subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT_DIR, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, f"the spending child failed ({how}):\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return how, json.loads(done.stdout)


def test_full_disk_is_a_typed_refusal_and_the_ledger_survives(tmp_path: Path) -> None:
    how, result = _run_child(tmp_path)
    refusal = result.get("refusal")
    assert refusal is not None, f"({how}) the disk never filled up: {result}"
    assert refusal["type"] == "LedgerError" and refusal["code"] == "ledger_error"
    if how == "tmpfs":
        assert "full" in refusal["message"], refusal["message"]
    acknowledged = result["acknowledged"]
    # The refused use was not counted, neither at once nor after reopening.
    assert result["uses_before"] == result["uses_after"] == acknowledged
    assert "reopen_error" not in result, result.get("reopen_error")
    assert result["reopened_uses"] == acknowledged
    assert result["reopened_audit"] == acknowledged  # the chain verifies, every use in it
    assert result["after_recovery_uses"] == acknowledged + 1  # and it records again
