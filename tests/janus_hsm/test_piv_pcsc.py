"""The PIV provider through real PC/SC discovery (pcscd + pyscard + ykman.pcsc).

A card is opened exclusively, so a second provider for the same card in one process
(two keys in one command: a root in 9c and its agreement key in 9d) cannot find it by
discovery; it must reuse the connection this process already holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from hardware.card import VirtualCard
from hardware.virtual_piv import VirtualPivApplet, VirtualYubiKey
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.piv import PivProvider
from janus_hsm.errors import TokenNotFoundError
from janus_hsm.provider import SignatureFormat

SERIAL = 13572468
PIN = "123456"  # the virtual card's factory PIN: a throwaway card
PlugCard = Callable[..., str]


@pytest.fixture
def pin_file(tmp_path: Path) -> Path:
    path = tmp_path / "pin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(PIN)
    return path


def test_two_keys_of_one_card_in_one_process(pcsc_reader: PlugCard, pin_file: Path) -> None:
    pcsc_reader(VirtualYubiKey(piv=VirtualPivApplet(serial=SERIAL)).card, 0)
    pcsc_reader(VirtualCard([]), 1)  # a card without PIV next door is skipped
    query = f"?pin-source=file:{pin_file}"
    first = PivProvider.open(f"piv:serial={SERIAL};slot=9c{query}")
    second = None
    try:
        root = first.generate(f"piv:serial={SERIAL};slot=9c", Algorithm.ES256)
        # The card is now held by `first`: discovery alone would report "no PIV card".
        second = PivProvider.open(f"piv:serial={SERIAL};slot=9d{query}")
        agreement = second.generate(f"piv:serial={SERIAL};slot=9d", Algorithm.X25519)
        signature = root.sign(b"both keys, one card", format=SignatureFormat.DER)
        public = root.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"both keys, one card", ec.ECDSA(hashes.SHA256()))
        peer = x25519.X25519PrivateKey.generate()
        peer_public = agreement.public_key()
        assert isinstance(peer_public, x25519.X25519PublicKey)
        assert agreement.exchange(peer.public_key()) == peer.exchange(peer_public)
        # Another serial is still not found, held card or not.
        with pytest.raises(TokenNotFoundError):
            PivProvider.open(f"piv:serial={SERIAL + 1};slot=9c{query}")
    finally:
        if second is not None:
            second.close()
        first.close()
