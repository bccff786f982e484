"""Virtual cards in a real PC/SC stack: private pcscd, vpcd reader, `VpcdCardBridge`.

These pin down what the PIV and FIDO2 tiers rely on: the card shows up for pyscard and
ykman under a YubiKey's reader name with a YubiKey's ATR, APDUs make the round trip
fast (the TCP_QUICKACK fix), pulling a card fails the client instead of hanging it,
cards can be swapped between tests, and no pcscd outlives its owner.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from smartcard.CardConnection import CardConnection  # type: ignore[import-untyped]
from smartcard.CardRequest import CardRequest  # type: ignore[import-untyped]
from smartcard.Exceptions import CardConnectionException  # type: ignore[import-untyped]
from smartcard.System import readers  # type: ignore[import-untyped]

from hardware.card import YUBIKEY_ATR, Command, VirtualCard
from hardware.pcscd import READER_NAME, VirtualReaders, list_readers

ECHO_AID = bytes.fromhex("F0A11CE00001")
SELECT_ECHO = bytes.fromhex("00A40400") + bytes([len(ECHO_AID)]) + ECHO_AID
REPO = Path(__file__).resolve().parents[2]
PlugCard = Callable[..., str]  # the pcsc_reader fixture: plug(card, slot=0) -> reader name


class EchoApplet:
    """Answers every command with its data reversed, and counts selections."""

    aid = ECHO_AID

    def __init__(self) -> None:
        self.selections = 0

    def select(self) -> tuple[bytes, int]:
        self.selections += 1
        return b"echo", 0x9000

    def deselect(self) -> None:
        pass

    def process(self, command: Command) -> tuple[bytes, int]:
        if command.ins == 0x01:
            return command.data[::-1], 0x9000
        if command.ins == 0x02:  # a long answer: chunked by the card with 61xx
            return bytes(range(256)) * 3, 0x9000
        return b"", 0x6D00


def connect(reader_name: str) -> CardConnection:
    reader = next(r for r in readers() if str(r) == reader_name)
    connection = reader.createConnection()
    connection.connect()
    return connection


def transmit(connection: CardConnection, apdu: bytes) -> tuple[bytes, int]:
    data, sw1, sw2 = connection.transmit(list(apdu))
    return bytes(data), (sw1 << 8) | sw2


def test_card_appears_with_a_yubikey_reader_name_and_atr(pcsc_reader: PlugCard) -> None:
    name = pcsc_reader(VirtualCard([EchoApplet()]))
    assert name == f"{READER_NAME} 00 00"
    assert name in [str(r) for r in readers()]
    service = CardRequest(readers=[name], timeout=10).waitforcard()
    connection = service.connection
    connection.connect()
    try:
        assert bytes(connection.getATR()) == YUBIKEY_ATR
    finally:
        connection.release()


def test_apdu_round_trip_with_chaining_and_get_response(pcsc_reader: PlugCard) -> None:
    applet = EchoApplet()
    connection = connect(pcsc_reader(VirtualCard([applet])))
    try:
        assert transmit(connection, SELECT_ECHO) == (b"echo", 0x9000)
        assert transmit(connection, bytes.fromhex("0001000003010203")) == (b"\3\2\1", 0x9000)
        data, sw = transmit(connection, bytes.fromhex("0002000000"))
        assert (data, sw) == (bytes(range(256)), 0x61FF)  # 512 more bytes waiting
        rest = b""
        while sw & 0xFF00 == 0x6100:
            data, sw = transmit(connection, bytes.fromhex("00C0000000"))
            rest += data
        assert (rest, sw) == (bytes(range(256)) * 2, 0x9000)
        assert transmit(connection, bytes.fromhex("00FF0000")) == (b"", 0x6D00)
    finally:
        connection.release()
    assert applet.selections == 1


def test_ykman_lists_the_reader(pcsc_reader: PlugCard) -> None:
    from ykman.pcsc import list_devices

    name = pcsc_reader(VirtualCard([EchoApplet()]))
    assert name in [device.reader.name for device in list_devices()]  # type: ignore[no-untyped-call]


def test_apdu_latency_is_not_the_delayed_ack_timer(pcsc_reader: PlugCard) -> None:
    """100 APDUs took 4.8 s without TCP_QUICKACK (delayed ACKs) and ~15 ms with it."""
    connection = connect(pcsc_reader(VirtualCard([EchoApplet()])))
    try:
        transmit(connection, SELECT_ECHO)
        started = time.perf_counter()
        for i in range(100):
            assert transmit(connection, bytes([0, 1, 0, 0, 1, i])) == (bytes([i]), 0x9000)
        elapsed = time.perf_counter() - started
    finally:
        connection.release()
    assert elapsed < 2.0, f"100 APDUs took {elapsed:.2f} s"


def test_pulled_card_fails_the_client_without_hanging(
    pcsc_reader: PlugCard, pcsc_readers: VirtualReaders
) -> None:
    connection = connect(pcsc_reader(VirtualCard([EchoApplet()])))
    transmit(connection, SELECT_ECHO)
    bridge = pcsc_readers.bridge(0)
    assert bridge is not None
    started = time.monotonic()
    bridge.remove()
    with pytest.raises(CardConnectionException):
        transmit(connection, SELECT_ECHO)
    assert time.monotonic() - started < 5
    connection.release()


def test_card_flagged_removed_disappears_and_returns(pcsc_reader: PlugCard) -> None:
    card = VirtualCard([EchoApplet()])
    name = pcsc_reader(card)
    connection = connect(name)
    transmit(connection, SELECT_ECHO)
    card.removed = True
    with pytest.raises(CardConnectionException):
        transmit(connection, SELECT_ECHO)
    connection.release()
    card.removed = False
    CardRequest(readers=[name], timeout=10).waitforcard()
    connection = connect(name)
    try:
        assert transmit(connection, SELECT_ECHO) == (b"echo", 0x9000)
    finally:
        connection.release()


def test_cards_swap_without_a_new_daemon(pcsc_reader: PlugCard) -> None:
    first, second = EchoApplet(), EchoApplet()
    name = pcsc_reader(VirtualCard([first]))
    connection = connect(name)
    transmit(connection, SELECT_ECHO)
    connection.release()
    assert pcsc_reader(VirtualCard([second])) == name
    connection = connect(name)
    try:
        transmit(connection, SELECT_ECHO)
    finally:
        connection.release()
    assert (first.selections, second.selections) == (1, 1)

    # Another ATR needs a reinsertion, which plug() does.
    other_atr = bytes.fromhex("3B8C8001597562696B65794E454F7233")
    pcsc_reader(VirtualCard([EchoApplet()], atr=other_atr))
    connection = connect(name)
    try:
        assert bytes(connection.getATR()) == other_atr
    finally:
        connection.release()


def test_second_slot_hosts_a_second_card(pcsc_reader: PlugCard) -> None:
    name0 = pcsc_reader(VirtualCard([EchoApplet()]))
    name1 = pcsc_reader(VirtualCard([EchoApplet()]), 1)
    assert (name0, name1) == (f"{READER_NAME} 00 00", f"{READER_NAME} 00 01")
    for name in (name0, name1):
        connection = connect(name)
        try:
            assert transmit(connection, SELECT_ECHO) == (b"echo", 0x9000)
        finally:
            connection.release()


def test_only_the_virtual_readers_are_visible(pcsc_readers: VirtualReaders) -> None:
    """USB drivers are hidden from the private daemon: a real key never gets in the way."""
    assert sorted(list_readers()) == [slot.reader_name for slot in pcsc_readers.pcscd.slots]
    assert os.environ["PCSCLITE_CSOCK_NAME"] == str(pcsc_readers.pcscd.socket_path)


# A fresh process: starts its own daemon, plugs a card, prints the daemon's pid and
# runtime dir, then either stops cleanly or waits to be killed.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from hardware.card import VirtualCard
    from hardware.pcscd import VirtualReaders, use_private_socket
    use_private_socket()
    readers = VirtualReaders().start()
    readers.plug(VirtualCard([]))
    print(readers.pcscd.pid, readers.pcscd.runtime_dir, flush=True)
    if sys.argv[1] == "stop":
        readers.stop()
    else:
        time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its dead parent's reaper) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_no_pcscd_outlives_its_owner(how: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PCSCLITE_CSOCK_NAME"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, how],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        pid_text, runtime_dir = child.stdout.readline().split()
        pid = int(pid_text)
        assert Path(f"/proc/{pid}/exe").resolve().name == "pcscd"
        if how == "kill":
            child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert _gone_within(pid, 5), f"pcscd {pid} still running"
        if how == "stop":
            assert child.returncode == 0
            assert not Path(runtime_dir).exists()
        else:
            shutil.rmtree(runtime_dir, ignore_errors=True)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
