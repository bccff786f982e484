"""The main job runs end to end, narrates every step, and is idempotent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_demo(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.demo", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_demo_succeeds_twice_reusing_its_token_and_keys(tmp_path: Path) -> None:
    first = run_demo(tmp_path / "demo")
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "generated root key pkcs11:token=janus;object=edge-root" in out
    assert "all 6 export routes refused" in out
    assert "payment 5 of 42.00 EUR signed" in out
    assert "a payment of 200.00 EUR is refused (caveat_failed" in out
    assert "a 6th payment is refused" in out
    assert "the next payment is refused immediately" in out
    assert "FAILED" not in out
    did = next(
        line.split("identity:")[1].strip() for line in out.splitlines() if "identity:" in line
    )

    second = run_demo(tmp_path / "demo")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "found existing root key" in second.stdout
    assert f"identity: {did}" in second.stdout
