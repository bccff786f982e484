"""PIN sources: precedence, files, and the refusal to guess."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from janus_hsm.errors import PinUnavailableError, UriError
from janus_hsm.pin import pin_source_path, read_pin_file, resolve_pin_source


def pin_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "pin"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_uri_pin_source_wins_over_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JANUS_PIN", "from-env")
    path = pin_file(tmp_path, "from-file\n")
    assert resolve_pin_source(f"file:{path}", prompt="")() == "from-file"
    assert resolve_pin_source(None, prompt="")() == "from-env"


def test_pin_source_forms(tmp_path: Path) -> None:
    path = pin_file(tmp_path, "1234")
    assert pin_source_path(f"file:{path}") == path
    assert pin_source_path(f"file://{path}") == path
    assert pin_source_path(str(path)) == path
    assert pin_source_path("file:/a%20b/pin") == Path("/a b/pin")
    for bad in (
        "relative/pin",
        "|/bin/echo 1234",
        "https://example.com/pin",
        "env:X",
        "file://[x",
        "file:relative/pin",  # a file: URI whose path is not absolute
        "file:/tmp/a%00b",  # a NUL after percent-decoding
        "/tmp/a\x00b",
        "file:/tmp/pin?x=1",  # a query or fragment would be dropped silently
        "file:/tmp/pin#frag",
    ):
        with pytest.raises(UriError, match="not supported"):
            pin_source_path(bad)


def test_no_source_and_no_terminal_is_an_error_not_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JANUS_PIN", raising=False)
    source = resolve_pin_source(None, prompt="", interactive=False)
    with pytest.raises(PinUnavailableError, match="never taken from argv"):
        source()


def test_prompt_is_asked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JANUS_PIN", raising=False)
    answers = iter(["4321"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    source = resolve_pin_source(None, prompt="PIN: ", interactive=True)
    assert source() == "4321"
    assert source() == "4321"  # a prompted PIN is kept for re-login


def test_only_the_trailing_newline_is_stripped(tmp_path: Path) -> None:
    assert read_pin_file(pin_file(tmp_path, " 12 34 \r\n")) == " 12 34 "


@pytest.mark.parametrize("text", ["", "\n"])
def test_empty_pin_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(PinUnavailableError, match="empty"):
        read_pin_file(pin_file(tmp_path, text))


def test_unreadable_and_odd_pin_files(tmp_path: Path) -> None:
    with pytest.raises(PinUnavailableError, match="cannot read"):
        read_pin_file(tmp_path / "missing")
    with pytest.raises(PinUnavailableError, match="regular file"):
        read_pin_file(tmp_path)
    with pytest.raises(PinUnavailableError, match="too large"):
        read_pin_file(pin_file(tmp_path, "1" * 5000))


def test_world_readable_pin_file_is_warned_about_without_the_pin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = pin_file(tmp_path, "98765432", mode=0o644)
    with caplog.at_level(logging.WARNING):
        assert read_pin_file(path) == "98765432"
    assert "readable by other users" in caplog.text
    assert "98765432" not in caplog.text


def test_a_pin_from_the_environment_that_is_not_utf8_is_refused_unechoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JANUS_PIN", "S3cret\udcffPass")  # how Python shows a stray 0xff
    with pytest.raises(PinUnavailableError) as refused:
        resolve_pin_source(None, prompt="")()
    assert "S3cret" not in repr(refused.value) and "S3cret" not in str(refused.value)
