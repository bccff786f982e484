"""A private pcscd with vsmartcard's vpcd reader, for tests: never the machine's own.

Why a private daemon: the tests put virtual cards (PIV, FIDO2) into a PC/SC reader so
that pyscard, ``ykman.pcsc``, ``fido2.pcsc``, ykcs11 and yubico-piv-tool drive them
exactly as they drive a YubiKey.  That needs pcscd with a vpcd reader, and the
machine's own pcscd (if any) must neither be disturbed nor used: a developer may have a
real YubiKey plugged in, and a test must not talk to it.

Why written by hand: pcsc-lite has no "instance" concept.  pcscd 1.9.9 puts its socket
and pid file at the compiled-in ``/run/pcscd`` (it does *not* read
``PCSCLITE_CSOCK_NAME``, measured: only the client library does), refuses to start when
that pid file names a live daemon, loads USB readers from the compiled-in
``/usr/lib/pcsc/drivers``, and its ``-c DIR`` option only replaces the reader
configuration.  So this module starts it under ``unshare --mount`` and, inside that
private mount namespace only:

* ``/run`` becomes an empty tmpfs and ``/run/pcscd`` a bind mount of a temporary
  directory of ours: the daemon's socket and pid file land there, where the client
  (this process, or tools it runs) reaches them through ``PCSCLITE_CSOCK_NAME``;
* ``/usr/lib/pcsc/drivers`` becomes an empty tmpfs, so the daemon finds no USB driver
  and ignores real readers ("Disabling USB support"); the vpcd driver is loaded from a
  copy in the temporary directory.

No network namespace: vpcd listens on ``0.0.0.0:PORT`` (and ``PORT+1`` for its second
slot) with a free port of ours instead of the default 0x8C7B, and the card bridge
(`hardware.vpcd`) connects from this process.  The machine's ``/run`` and the machine's
daemon are untouched.

The PC/SC client library reads ``PCSCLITE_CSOCK_NAME`` once per process, at the first
``SCardEstablishContext`` (importing pyscard does not count, measured), so a process
must call :func:`use_private_socket` before its first PC/SC call; the tests' conftest
does it when it is imported.

Every failure to run the daemon raises `PcscdUnavailable` with the reason; tests turn
it into a failure, not a skip, since ``make test`` installs pcscd and vpcd.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hardware.card import VirtualCard
from hardware.vpcd import VpcdCardBridge

__all__ = [
    "READER_NAME",
    "SOCKET_ENV",
    "VPCD_DRIVER",
    "PcscdUnavailable",
    "PrivatePcscd",
    "Slot",
    "VirtualReaders",
    "list_readers",
    "process_runtime_dir",
    "use_private_socket",
    "wait_for_card",
]

#: ykman lists only readers whose name contains "Yubico YubiKey"; this is a YubiKey 5's.
READER_NAME = "Yubico YubiKey OTP+FIDO+CCID"
#: The variable through which libpcsclite's clients find the daemon's socket.
SOCKET_ENV = "PCSCLITE_CSOCK_NAME"
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
_USB_DROP_DIR = "/usr/lib/pcsc/drivers"  # pcscd's compiled-in usbdropdir
_SOCKET_FILE = "pcscd.comm"  # pcscd's socket name inside its IPC directory
_VPCD_SLOTS = 2  # vpcd opens two slots per reader: PORT and PORT + 1
_STOP_GRACE = 5.0  # pcscd needs 1-2 s after SIGTERM while it has readers

# Runs inside the new mount namespace; $1 our runtime dir, $2 usbdropdir, $3 pcscd.
_NAMESPACE_SCRIPT = """\
set -e
mount -t tmpfs -o size=64k,mode=755 janus-pcscd-run /run
mkdir /run/pcscd
mount --bind "$1" /run/pcscd
if [ -d "$2" ]; then mount -t tmpfs -o size=4k,mode=755 janus-pcscd-drivers "$2"; fi
shift 2
exec "$@"
"""


class PcscdUnavailable(RuntimeError):
    """pcscd, the vpcd driver or unshare is missing, or the private daemon did not start."""


@dataclass(frozen=True)
class Slot:
    """One vpcd slot: the PC/SC reader name and the TCP port its card connects to."""

    index: int
    reader_name: str
    port: int


def process_runtime_dir() -> Path:
    """The directory whose ``pcscd.comm`` this process's PC/SC clients use (one per pid)."""
    return Path(tempfile.gettempdir()) / f"janus-pcscd-{os.getpid()}"


def use_private_socket(runtime_dir: Path | None = None) -> Path:
    """Points this process's (and its children's) PC/SC clients at a private pcscd.

    Must run before the process's first PC/SC call: libpcsclite reads the variable once.
    The daemon need not run yet.  Returns the socket path.
    """
    path = (runtime_dir or process_runtime_dir()) / _SOCKET_FILE
    os.environ[SOCKET_ENV] = str(path)
    return path


def _free_port_pair() -> int:
    """A port P such that P and P + 1 were both free on 0.0.0.0 a moment ago."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))  # noqa: S104 - vpcd itself binds INADDR_ANY
            port = int(probe.getsockname()[1])
        if port + _VPCD_SLOTS - 1 > 0xFFFF:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(_VPCD_SLOTS):
                    s = stack.enter_context(socket.socket())
                    s.bind(("0.0.0.0", port + offset))  # noqa: S104
            return port
        except OSError:
            continue
    raise PcscdUnavailable("no free pair of TCP ports for vpcd")


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn asking Linux to kill pcscd when the thread that started it dies.

    So a test run killed with SIGKILL (a CI timeout) leaves no daemon behind.  unshare
    and sh exec into pcscd, and the request survives exec.  libc is looked up here,
    before fork.
    """
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


def _check_prerequisites() -> tuple[str, str]:
    pcscd = shutil.which("pcscd") or (
        "/usr/sbin/pcscd" if Path("/usr/sbin/pcscd").exists() else None
    )
    unshare = shutil.which("unshare")
    missing = []
    if pcscd is None:
        missing.append("pcscd (Debian package pcscd)")
    if not VPCD_DRIVER.exists():
        missing.append(f"{VPCD_DRIVER} (Debian package vsmartcard-vpcd)")
    if unshare is None:
        missing.append("unshare (Debian package util-linux)")
    if missing:
        raise PcscdUnavailable(
            "cannot run a private pcscd, missing: " + "; ".join(missing)
            + " — `make setup` installs them (SYSTEM_PACKAGES in the Makefile)"
        )  # fmt: skip
    assert pcscd is not None and unshare is not None
    return pcscd, unshare


def _establish_context() -> int:
    from smartcard import scard  # type: ignore[import-untyped]

    rv, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if rv != scard.SCARD_S_SUCCESS:
        raise PcscdUnavailable(
            f"PC/SC client cannot reach the daemon: {scard.SCardGetErrorMessage(rv)}"
        )
    return int(context)


def list_readers() -> list[str]:
    """The readers the daemon that this process's PC/SC client uses knows about."""
    from smartcard import scard

    context = _establish_context()
    try:
        rv, readers = scard.SCardListReaders(context, [])
        if rv == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if rv != scard.SCARD_S_SUCCESS:
            raise PcscdUnavailable(f"SCardListReaders: {scard.SCardGetErrorMessage(rv)}")
        return [str(r) for r in readers]
    finally:
        scard.SCardReleaseContext(context)


def wait_for_card(reader: str, *, present: bool = True, timeout: float = 10.0) -> None:
    """Blocks until pcscd reports a card in (or, with present=False, none in) ``reader``.

    pcscd polls the vpcd driver, so a card shows up 0.2-0.4 s after the bridge connects.
    Raises TimeoutError.
    """
    from smartcard import scard

    context = _establish_context()
    try:
        deadline = time.monotonic() + timeout
        state = scard.SCARD_STATE_UNAWARE
        while True:
            rv, readers = scard.SCardGetStatusChange(context, 100, [(reader, state)])
            if rv == scard.SCARD_S_SUCCESS:
                _, state, _atr = readers[0]
                if state & scard.SCARD_STATE_UNKNOWN:
                    raise PcscdUnavailable(f"no reader named {reader!r}")
                has_card = bool(state & scard.SCARD_STATE_PRESENT) and not (
                    state & scard.SCARD_STATE_MUTE
                )
                if has_card == present:
                    return
                state &= ~scard.SCARD_STATE_CHANGED
            elif rv != scard.SCARD_E_TIMEOUT:
                raise PcscdUnavailable(f"SCardGetStatusChange: {scard.SCardGetErrorMessage(rv)}")
            if time.monotonic() > deadline:
                what = "a card" if present else "no card"
                raise TimeoutError(f"{reader!r} did not show {what} within {timeout:g} s")
    finally:
        scard.SCardReleaseContext(context)


class PrivatePcscd:
    """A pcscd of our own, with one vpcd reader named `READER_NAME`, for this process.

    :param runtime_dir: where the daemon's socket, pid file, reader configuration, driver
        copy and log go; created (emptied if stale) on start and removed on stop.
        Defaults to :func:`process_runtime_dir`, the directory :func:`use_private_socket`
        points clients at.
    :param reader_name: the reader's FRIENDLYNAME; pcscd appends " 00 00" / " 00 01".
    :param debug: run pcscd with ``-d -a`` (APDUs in :meth:`log`; slower).
    """

    def __init__(
        self,
        runtime_dir: Path | None = None,
        *,
        reader_name: str = READER_NAME,
        debug: bool = False,
    ) -> None:
        self.runtime_dir = runtime_dir or process_runtime_dir()
        self.reader_name = reader_name
        self.debug = debug
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / _SOCKET_FILE

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "pcscd.log"

    @property
    def pid(self) -> int | None:
        """The daemon's pid while it runs (unshare and sh exec into it)."""
        return self._process.pid if self._process is not None else None

    @property
    def slots(self) -> list[Slot]:
        """vpcd's slots: slot i is reader ``NAME 00 0i`` on port ``port + i``."""
        return [
            Slot(i, f"{self.reader_name} 00 {i:02X}", self.port + i) for i in range(_VPCD_SLOTS)
        ]

    def log(self) -> str:
        """What pcscd printed so far (errors only unless ``debug``)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> PrivatePcscd:
        """Starts the daemon and waits until its readers are listed; points clients at it.

        Retries with other ports if one was taken in the meantime.
        """
        if self._process is not None:
            raise RuntimeError("pcscd already started")
        pcscd, unshare = _check_prerequisites()
        use_private_socket(self.runtime_dir)
        last: PcscdUnavailable | None = None
        for _ in range(3):
            try:
                self._start_once(pcscd, unshare, timeout)
                atexit.register(self.stop)
                return self
            except PcscdUnavailable as exc:
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _start_once(self, pcscd: str, unshare: str, timeout: float) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        conf_dir = self.runtime_dir / "reader.conf.d"
        conf_dir.mkdir(parents=True, mode=0o755)
        driver = self.runtime_dir / VPCD_DRIVER.name
        shutil.copyfile(VPCD_DRIVER, driver)
        self.port = _free_port_pair()
        (conf_dir / "janus-vpcd").write_text(
            f'FRIENDLYNAME "{self.reader_name}"\n'
            f"DEVICENAME /dev/null:{self.port}\n"
            f"LIBPATH {driver}\n"
            f"CHANNELID {self.port}\n"
        )
        command = [unshare, "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            command.append("--map-root-user")  # mounts need CAP_SYS_ADMIN in a user namespace
        command += ["sh", "-c", _NAMESPACE_SCRIPT, "janus-pcscd"]
        command += [str(self.runtime_dir), _USB_DROP_DIR, pcscd, "-f", "-c", str(conf_dir)]
        if self.debug:
            command += ["-d", "-a"]
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", SOCKET_ENV)
        }
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent(),  # only prctl: safe with threads
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        wanted = {slot.reader_name for slot in self.slots}
        unreachable_since: float | None = None
        while True:
            if self._process.poll() is not None:
                raise PcscdUnavailable(
                    f"pcscd exited with status {self._process.returncode}"
                    f" (root, or user namespaces, are needed for its private /run):\n{self.log()}"
                )
            if self.socket_path.exists():
                try:
                    if wanted <= set(list_readers()):
                        return
                    unreachable_since = None
                except PcscdUnavailable as exc:
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > 3.0:
                        raise PcscdUnavailable(
                            f"{exc}, though pcscd listens on {self.socket_path}: libpcsclite"
                            f" reads {SOCKET_ENV} once per process, so call"
                            " hardware.pcscd.use_private_socket() before the first PC/SC call"
                        ) from exc
            if time.monotonic() > deadline:
                raise PcscdUnavailable(
                    f"pcscd did not list the vpcd readers {sorted(wanted)} within"
                    f" {timeout:g} s:\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops the daemon (SIGTERM, then SIGKILL) and removes the runtime directory."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_GRACE)
            atexit.unregister(self.stop)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> PrivatePcscd:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class VirtualReaders:
    """A private pcscd plus one `VpcdCardBridge` per vpcd slot: readers to plug cards into.

    Meant to live for a whole test session (a card that reconnects quickly can make pcscd
    report ``SCARD_W_REMOVED_CARD``), with :meth:`plug` swapping cards between tests.
    Slot 0's reader is :attr:`PrivatePcscd.slots` ``[0].reader_name``, i.e.
    ``"Yubico YubiKey OTP+FIDO+CCID 00 00"``; slot 1 is a second key when a test needs
    two.  An unused slot stays an empty reader.
    """

    def __init__(self, pcscd: PrivatePcscd | None = None) -> None:
        self.pcscd = pcscd or PrivatePcscd()
        self._bridges: dict[int, VpcdCardBridge] = {}

    def start(self) -> VirtualReaders:
        self.pcscd.start()
        return self

    def stop(self) -> None:
        """Pulls every card and stops pcscd; idempotent."""
        bridges, self._bridges = list(self._bridges.values()), {}
        try:
            for bridge in bridges:
                bridge.stop()
        finally:
            self.pcscd.stop()

    def __enter__(self) -> VirtualReaders:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reader_name(self, slot: int = 0) -> str:
        return self.pcscd.slots[slot].reader_name

    def bridge(self, slot: int = 0) -> VpcdCardBridge | None:
        """The slot's bridge, once a card was plugged there (tests pull cards with it)."""
        return self._bridges.get(slot)

    def plug(self, card: VirtualCard, slot: int = 0, *, timeout: float = 10.0) -> str:
        """Puts ``card`` into the slot's reader and waits until pcscd sees it.

        A card already there is swapped out without pcscd noticing, unless the ATRs
        differ or the card had been pulled: then the old one is removed (and pcscd is
        given time to see that) before the new one goes in.  Returns the reader name.
        """
        if not self.pcscd.running():
            raise PcscdUnavailable("the private pcscd is not running")
        name = self.reader_name(slot)
        bridge = self._bridges.get(slot)
        if bridge is None:
            bridge = VpcdCardBridge(card, port=self.pcscd.slots[slot].port)
            self._bridges[slot] = bridge
            bridge.start()
        elif bridge.connected and bridge.card.atr == card.atr:
            bridge.card = card
            return name
        else:
            if bridge.connected:
                bridge.remove()
            wait_for_card(name, present=False, timeout=timeout)
            bridge.card = card
            bridge.insert()
        bridge.wait_connected(timeout)
        wait_for_card(name, timeout=timeout)
        return name

    def unplug(self, slot: int = 0, *, timeout: float = 10.0) -> None:
        """Pulls the slot's card and waits until pcscd sees the reader empty."""
        bridge = self._bridges.get(slot)
        if bridge is not None:
            bridge.remove()
        wait_for_card(self.reader_name(slot), present=False, timeout=timeout)
