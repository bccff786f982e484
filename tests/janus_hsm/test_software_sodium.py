"""Software Ed25519 keys sign through libsodium: the same signatures as OpenSSL's."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software import SoftwareKeyHandle, SoftwareProvider
from janus_hsm.errors import KeyNotFoundError


def test_sodium_signature_is_the_cryptography_signature(tmp_path: Path) -> None:
    uri = f"soft:dir={tmp_path}"
    with SoftwareProvider.open(
        uri, passphrase_source=lambda: "pass phrase", allow_extractable=True
    ) as store:
        handle = store.generate("soft:object=k", Algorithm.EdDSA)
        assert isinstance(handle, SoftwareKeyHandle)
        key = handle._key()
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        for data in (b"", b"x", bytes(range(256)) * 9):
            assert handle.sign(data) == key.sign(data)  # Ed25519 is deterministic
        store.delete("soft:object=k")
        with pytest.raises(KeyNotFoundError):  # the cached sodium key went with it
            handle.sign(b"x")
        assert handle._sodium is None
