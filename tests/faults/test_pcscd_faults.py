"""The card pulled and pcscd restarted while a process signs on a virtual YubiKey.

A private pcscd of this test's own (not the session's shared one, which other tests
use) serves a vpcd reader holding a virtual YubiKey; a child process signs in a loop
(tests/faults/pcsc_child.py).  The card is pulled and put back, then pcscd is stopped
and started again with the card plugged back in.  While the card or the daemon is
away every attempt must end in a typed error within a few seconds (no hang, no
traceback), and signing must resume once they are back.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.pcscd import SOCKET_ENV, PcscdUnavailable, PrivatePcscd, VirtualReaders
from hardware.virtual_piv import VirtualPivApplet, VirtualYubiKey

ROOT_DIR = Path(__file__).resolve().parents[2]
SERIAL = 24681357
PIN = "123456"  # the virtual card's factory PIN
SILENCE = 20.0  # seconds without a line from the child: it hangs


class Child:
    """The signing child and its output lines, read on a thread."""

    def __init__(self, socket: Path, pin_file: Path, stop: Path) -> None:
        env = {**os.environ, SOCKET_ENV: str(socket), "PYTHONPATH": str(ROOT_DIR)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.faults.pcsc_child",
                str(SERIAL),
                str(pin_file),
                str(stop),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT_DIR,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=SILENCE)
        except queue.Empty:
            done = self.process.poll() is not None and self.process.stderr is not None
            stderr = self.process.stderr.read() if done and self.process.stderr else ""
            pytest.fail(f"the child said nothing for {SILENCE} s (hang?) {stderr}")
        self.seen.append(line)
        return line

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.next_line()
            if line.startswith(prefix):
                return line
        pytest.fail(f"no {prefix!r} within {timeout} s; last lines: {self.seen[-5:]}")


@pytest.fixture
def readers(tmp_path: Path) -> Iterator[VirtualReaders]:
    saved = os.environ.get(SOCKET_ENV)  # start() repoints this process's children
    started = VirtualReaders(PrivatePcscd(tmp_path / "pcscd"))
    try:
        started.start()
    except PcscdUnavailable as exc:
        pytest.fail(f"cannot run a private pcscd: {exc}", pytrace=False)
    try:
        yield started
    finally:
        started.stop()
        if saved is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = saved


# libpcsclite reads the daemon's socket name once per process: in a process whose
# earlier tests already talked to the session's shared pcscd, this test's own daemon
# would never be asked.  So the scenario runs in a fresh interpreter of its own.
INNER = "JANUS_PCSC_FAULT_INNER"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_card_pulled_and_pcscd_restarted_mid_signing(tmp_path: Path) -> None:
    selected = f"{Path(__file__).relative_to(ROOT_DIR)}::test_scenario_in_a_fresh_process"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", selected, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT_DIR,
        env={**os.environ, INNER: "1", "PYTHONPATH": str(ROOT_DIR)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]


def _scenario(readers: VirtualReaders, tmp_path: Path) -> None:
    saved = os.environ.get(SOCKET_ENV)
    card = VirtualYubiKey(piv=VirtualPivApplet(serial=SERIAL)).card
    readers.plug(card, 0)
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)
    stop = tmp_path / "stop"
    child = Child(readers.pcscd.socket_path, pin_file, stop)
    try:
        child.wait_for("ready")
        for _ in range(3):
            child.wait_for("ok")

        readers.unplug(0, timeout=45)  # mid-stream: the loop is signing as fast as it can
        pulled = child.wait_for("error")
        readers.plug(card, 0, timeout=45)
        child.wait_for("ok")

        runtime = readers.pcscd.runtime_dir
        readers.stop()  # pcscd gone (the card with it)
        down = child.wait_for("error")
        restarted = VirtualReaders(PrivatePcscd(runtime))
        restarted.start()
        try:
            restarted.plug(card, 0, timeout=45)
            child.wait_for("ok", timeout=60)
            for _ in range(3):
                child.wait_for("ok")
        finally:
            stop.touch()
            child.process.wait(timeout=30)
            restarted.stop()
    finally:
        stop.touch()
        if child.process.poll() is None:
            child.process.kill()
        child.process.wait(timeout=30)
        if saved is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = saved
    stderr = child.process.stderr.read() if child.process.stderr else ""
    errors = sorted({line for line in child.seen if line.startswith("error")})
    assert child.process.returncode == 0, f"the child failed: {stderr}"
    for line in (pulled, down):
        _, kind, code = line.split()
        assert kind.endswith("Error") and code, line
    # Nothing on stderr but the card's own warnings: no traceback, not even one that
    # Python could only print ("Exception ignored in ... __del__") from a dropped
    # connection whose daemon had gone.
    assert "Traceback" not in stderr, f"errors seen: {errors}\n{stderr}"


if os.environ.get(INNER) == "1":

    @pytest.mark.timeout(240)
    def test_scenario_in_a_fresh_process(readers: VirtualReaders, tmp_path: Path) -> None:
        _scenario(readers, tmp_path)
