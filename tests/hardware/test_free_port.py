"""free_port() never hands out a port twice in one process.

The kernel chooses a bind(0) port at random, so without that memory 500 calls would
repeat some port nearly always (about 9 repeats expected among ~14,000 ports): a NATS
server or cluster given the same port twice fails to start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# In a child process, so that the 500 ports are not kept from the rest of the run.
_CHILD = """
from hardware.postgres import free_port
ports = [free_port() for _ in range(500)]
print(len(ports), len(set(ports)))
"""


def test_free_port_never_repeats_a_port() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["500", "500"]
