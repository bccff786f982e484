"""``janus cloud serve`` checks what it can before it announces itself, and announces
itself only once it listens (real subprocesses, real sockets)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# did:key test vectors: an Ed25519 key (may be an owner) and an X25519 one (may not).
OWNER = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"
X25519 = "did:key:z6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc"


def env_without_pin() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "JANUS_PIN"}


def serve_args(state: Path, *extra: str, passphrase: Path | None = None) -> list[str]:
    args = [sys.executable, "-m", "agent", "cloud", "serve", "--state-dir", str(state)]
    if passphrase is not None:
        args += ["--passphrase-file", str(passphrase)]
    return args + list(extra)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A serve that must fail: it must exit by itself (a started server would not)."""
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env_without_pin(),
    )


class Served:
    """A running ``janus cloud serve`` and the first line it printed."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env_without_pin(),
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        if not ready:
            self.stop()
            pytest.fail("cloud serve announced nothing within 60 s")
        self.first_line = self.process.stdout.readline().decode()

    def stop(self) -> str:
        """SIGTERM: a clean stop, exit status 0."""
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        assert self.process.returncode == 0, err.decode()
        return err.decode()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (here: this one) listens on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("janus: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "janus cloud agent" not in result.stdout  # never announced
    return lines[0]


def test_a_busy_port_is_one_error_line_naming_it(tmp_path: Path, busy_port: int) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    result = run(serve_args(tmp_path / "s", "--port", str(busy_port), passphrase=passphrase))
    line = assert_one_error_line(result, f"127.0.0.1:{busy_port}", "already in use")
    assert "ERROR" not in result.stderr.replace(line, "")
    assert result.stdout == ""


def test_a_busy_port_with_json_is_a_json_error(tmp_path: Path, busy_port: int) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    result = run(
        serve_args(tmp_path / "s", "--port", str(busy_port), "--json", passphrase=passphrase)
    )
    assert result.returncode == 1, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "address_in_use" and str(busy_port) in error["message"]


def test_json_announces_one_line_once_listening(tmp_path: Path) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    served = Served(serve_args(tmp_path / "s", "--port", "0", "--json", passphrase=passphrase))
    try:
        announced = json.loads(served.first_line)
        assert set(announced) == {"url", "did", "pid"}
        assert announced["pid"] == served.process.pid
        assert announced["url"].startswith("http://127.0.0.1:")
        # Listening when announced: the first request, with no retry, is answered.
        health = httpx.get(f"{announced['url']}/healthz", timeout=10).json()
        assert health == {"status": "ok", "did": announced["did"]}
    finally:
        err = served.stop()
    assert "ERROR" not in err


def test_text_announcement_names_the_bound_port(tmp_path: Path) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    served = Served(serve_args(tmp_path / "s", "--port", "0", passphrase=passphrase))
    try:
        line = served.first_line.strip()
        assert line.startswith("janus cloud agent did:key:z") and " on http://127.0.0.1:" in line
        url = line.split(" on ")[1].split()[0]
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        served.stop()


def test_a_wrong_passphrase_fails_at_start_up_and_makes_no_key(tmp_path: Path) -> None:
    state = tmp_path / "s"
    right = secret_file(tmp_path / "right", "correct horse")
    first = Served(serve_args(state, "--port", "0", "--json", passphrase=right))
    did = json.loads(first.first_line)["did"]
    first.stop()
    keys = sorted(p.name for p in (state / "keys").iterdir())

    wrong = secret_file(tmp_path / "wrong", "battery staple")
    result = run(serve_args(state, "--port", "0", passphrase=wrong))
    line = assert_one_error_line(result, "passphrase", str(state))
    assert "battery staple" not in line + result.stdout
    assert sorted(p.name for p in (state / "keys").iterdir()) == keys  # nothing made

    again = Served(serve_args(state, "--port", "0", "--json", passphrase=right))
    assert json.loads(again.first_line)["did"] == did  # the right one still works
    again.stop()


@pytest.mark.parametrize(
    ("owner", "says"),
    [
        ("did:key:zBOGUS", "not a valid did:key"),
        ("did:web:example.com", "not a valid did:key"),
        ("", "not a valid did:key"),
        (X25519, "key-agreement key"),
    ],
)
def test_a_bad_owner_fails_at_start_up(tmp_path: Path, owner: str, says: str) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    result = run(serve_args(tmp_path / "s", "--owner", owner, "--port", "0", passphrase=passphrase))
    assert_one_error_line(result, "--owner", says)
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_a_good_owner_is_accepted(tmp_path: Path) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    served = Served(
        serve_args(tmp_path / "s", "--owner", OWNER, "--port", "0", "--json", passphrase=passphrase)
    )
    try:
        url = json.loads(served.first_line)["url"]
        assert httpx.get(f"{url}/v1/did", timeout=10).json()["owner"] == OWNER
    finally:
        served.stop()


def test_no_passphrase_and_no_terminal_names_the_passphrase_flag(tmp_path: Path) -> None:
    result = run(serve_args(tmp_path / "s", "--port", "0"))
    line = assert_one_error_line(result, "--passphrase-file", "JANUS_PIN")
    assert "pin-source" not in line
    assert not (tmp_path / "s").exists()


def test_a_missing_passphrase_file_is_said_at_once(tmp_path: Path) -> None:
    result = run(serve_args(tmp_path / "s", "--port", "0", passphrase=tmp_path / "nope"))
    assert_one_error_line(result, "--passphrase-file", "nope")


def test_the_ledger_it_creates_is_said_on_stderr_only(tmp_path: Path) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    state = tmp_path / "s"
    for first in (True, False):
        served = Served(serve_args(state, "--port", "0", "--json", passphrase=passphrase))
        served.process.terminate()
        rest, err = served.process.communicate(timeout=20)
        assert served.process.returncode == 0, err
        assert set(json.loads(served.first_line)) == {"url", "did", "pid"}
        assert rest == b""  # --json: the one line on stdout, nothing else
        note = f"janus: created ledger {state.resolve() / 'cloud.db'}"
        assert (note in err.decode()) is first, err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "3601"])
def test_a_body_timeout_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    passphrase = secret_file(tmp_path / "pass", "correct horse")
    result = run(serve_args(tmp_path / "s", "--body-timeout", value, passphrase=passphrase))
    assert_one_error_line(result, "--body-timeout")
