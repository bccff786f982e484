"""The README's "Using it" runs as written: its shell block, word for word, in a fresh
directory laid out as `make demo` leaves it (a SoftHSM token under .state/demo)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from hardware.postgres import free_port
from hardware.softhsm import ensure_token

ROOT = Path(__file__).resolve().parents[2]


def using_it_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, "the Using it section has one shell block"
    return blocks[0]


def test_using_it_runs_as_written(tmp_path: Path) -> None:
    script = using_it_block()
    assert script.count("8700") == 2  # the agent's port and its URL: moved together
    script = script.replace("8700", str(free_port()))
    ensure_token(tmp_path / ".state" / "demo", "janus")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in ("JANUS_PIN", "SOFTHSM2_CONF")}
    process = subprocess.Popen(
        ["bash", "-e", "-u", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the background cloud agent is in this group too
    )
    try:
        out, err = process.communicate(timeout=300)
    finally:
        # The block stops its agent itself; if it failed before that, stop it here.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    assert process.returncode == 0, f"{out}\n{err}"
    assert "Traceback" not in err
    assert "valid: sign/payment" in out
    assert "refused, as it should be" in out
    assert "janus: error: cloud agent refused: caveat_failed" in err
    assert re.search(r"\bactive\s+sign/payment on janus:payments/eur\s+uses 1/5", out), out
    assert "revoked " in out
    assert (tmp_path / "message.sig").stat().st_size == 64
    assert (tmp_path / "signer.csr").read_text().startswith("-----BEGIN CERTIFICATE REQUEST")
