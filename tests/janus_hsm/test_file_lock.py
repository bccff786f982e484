"""The one file lock: exclusive across processes, released when its holder dies."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from janus_hsm.file_lock import locked_file

HOLDER = """
import sys
from janus_hsm.file_lock import locked_file
with locked_file(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_process_waits_for_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "registry.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        acquired: list[float] = []

        def take() -> None:
            with locked_file(lock):
                acquired.append(time.monotonic())

        waiter = threading.Thread(target=take)
        waiter.start()
        time.sleep(0.3)
        assert not acquired  # still held by the other process
        released = time.monotonic()
        holder.kill()  # dying releases it: no stale lock
        waiter.join(timeout=10)
        assert acquired and acquired[0] >= released
    finally:
        holder.kill()
        holder.wait()
    assert os.stat(lock).st_mode & 0o777 == 0o600


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "x.lock").symlink_to(target)
    with pytest.raises(OSError), locked_file(tmp_path / "x.lock"):
        pass
    assert not target.exists()
