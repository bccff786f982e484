"""hardware/container/build-p11-kit.sh: p11-kit built from Debian's source, checked
against its pinned sha256, and not rebuilt once built."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from hardware.token_container import P11_KIT_BUILD_SCRIPT, P11_KIT_PREFIX


def build(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(P11_KIT_BUILD_SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        check=False,
    )


def test_a_tarball_with_another_sha256_is_refused(tmp_path: Path) -> None:
    forged = tmp_path / "p11-kit_0.25.5.orig.tar.xz"
    forged.write_bytes(b"not the tarball Debian publishes")
    prefix = tmp_path / "prefix"
    result = build(
        str(prefix),
        env={"JANUS_P11_KIT_URL": f"file://{forged}", "JANUS_DOWNLOADS": str(tmp_path / "dl")},
    )
    assert result.returncode == 1
    assert "refusing to build it" in result.stderr
    assert "04d0a86450cdb1be018f26af6699857171a188ac6d5b8c90786a60854e1198e5" in result.stderr
    assert not prefix.exists()
    assert list((tmp_path / "dl").iterdir()) == []  # nothing unverified is kept


def test_built_once_then_instant() -> None:
    first = build()  # builds here only when no test session built it yet
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() == str(P11_KIT_PREFIX)
    started = time.monotonic()
    again = build()
    assert again.returncode == 0 and again.stdout.strip() == str(P11_KIT_PREFIX)
    assert again.stderr == ""  # no "building", no download
    assert time.monotonic() - started < 2
    assert (P11_KIT_PREFIX / "lib" / "pkcs11" / "p11-kit-client.so").exists()
    assert (P11_KIT_PREFIX / "libexec" / "p11-kit" / "p11-kit-server").exists()
