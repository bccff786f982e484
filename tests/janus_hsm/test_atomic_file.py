"""replace_file: the one way Janus replaces key files, registries, state and outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from janus_hsm.atomic_file import replace_file


def test_replaces_content_with_private_mode_by_default(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    target.write_bytes(b"old")
    target.chmod(0o644)
    replace_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600  # the new file's mode, not the old one's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]


def test_an_explicit_mode_is_applied(tmp_path: Path) -> None:
    target = tmp_path / "bundle.json"
    replace_file(target, b"{}", mode=0o644)
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        replace_file(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
