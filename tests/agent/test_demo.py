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


def test_demo_succeeds_twice_reusing_its_token_and_key(tmp_path: Path) -> None:
    first = run_demo(tmp_path / "demo")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "generated pkcs11:token=janus;object=edge-root" in first.stdout
    assert "all 6 export routes refused" in first.stdout
    assert "ALLOWED" not in first.stdout
    did = next(
        line.strip() for line in first.stdout.splitlines() if line.strip().startswith("did:key:")
    )

    second = run_demo(tmp_path / "demo")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "found existing pkcs11:token=janus;object=edge-root" in second.stdout
    assert did in second.stdout
