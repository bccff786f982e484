"""Fixtures that put virtual cards into real PC/SC readers (a private pcscd + vpcd).

A pytest plugin loaded by the root conftest, so that every test package (hardware,
janus_hsm, agent) can plug a virtual YubiKey into a reader.

One pcscd runs per test session and its readers are shared: a test plugs its card with
the ``pcsc_reader`` factory and gets the reader name to open with pyscard, ykman or
fido2; after the test a blank card takes its place.  See ``hardware/pcscd.py``.

libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process, at the first PC/SC call, so
it is pointed at the session's private daemon here, when pytest loads this plugin,
before any test runs.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest

from hardware.card import VirtualCard
from hardware.pcscd import PcscdUnavailable, VirtualReaders, use_private_socket

use_private_socket()

#: plug(card, slot=0) -> reader name
PlugCard = Callable[..., str]


@pytest.fixture(scope="session")
def pcsc_readers() -> Iterator[VirtualReaders]:
    """The session's private pcscd with its two vpcd readers (started on first use).

    A missing pcscd or vpcd driver fails the test instead of skipping it: ``make test``
    installs both, and a skip would hide that the PC/SC tier never ran.
    """
    try:
        readers = VirtualReaders().start()
    except PcscdUnavailable as exc:
        pytest.fail(f"cannot run a private pcscd for the PC/SC tests: {exc}", pytrace=False)
    try:
        yield readers
    finally:
        gc.collect()  # pyscard releases forgotten connections in __del__: while pcscd runs
        readers.stop()


@pytest.fixture
def pcsc_reader(pcsc_readers: VirtualReaders) -> Iterator[PlugCard]:
    """A factory: ``pcsc_reader(card, slot=0)`` puts ``card`` into a reader, returns its name.

    E.g. ``name = pcsc_reader(VirtualCard([piv_applet, Fido2Applet(authenticator)]))``;
    the card stays in until the test ends (``pcsc_readers.unplug()`` pulls it earlier).
    Afterwards every slot the test used gets a blank card again.
    """
    used: set[int] = set()

    def plug(card: VirtualCard, slot: int = 0) -> str:
        used.add(slot)
        return pcsc_readers.plug(card, slot)

    yield plug
    gc.collect()  # a connection the test forgot (ykman's are exclusive) must not block the next
    for slot in sorted(used):
        pcsc_readers.plug(VirtualCard([]), slot)
