"""SoftHSM token set-up: private directory, no PINs on argv, idempotent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hardware.softhsm import ensure_token


def test_token_in_its_own_directory_with_private_pin_files(tmp_path: Path) -> None:
    token = ensure_token(tmp_path / "state", "setup-test")
    assert token.conf_path.read_text().startswith(f"directories.tokendir = {tmp_path}")
    for pin_file in (token.pin_file, token.so_pin_file):
        assert pin_file.stat().st_mode & 0o777 == 0o600
        assert len(pin_file.read_text().strip()) >= 8
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0
    assert any((tmp_path / "state" / "tokens").iterdir())
    assert "pin-source=file:" in token.uri()
    assert token.pin_file.read_text().strip() not in token.uri()


def test_second_run_reuses_the_token(tmp_path: Path) -> None:
    first = ensure_token(tmp_path, "again")
    pin = first.pin_file.read_text()
    tokens_before = sorted(p.name for p in (tmp_path / "tokens").iterdir())
    second = ensure_token(tmp_path, "again")
    assert second == first
    assert second.pin_file.read_text() == pin
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == tokens_before


def test_token_is_usable_from_a_fresh_process(tmp_path: Path) -> None:
    token = ensure_token(tmp_path, "fresh")
    code = (
        "import sys; from janus_hsm import open_provider; "
        "print(len(open_provider(sys.argv[1]).list_keys()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, token.uri()],
        env=token.environ(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
