"""Keys for the DIDComm tests: real KeyHandles in a software keystore and in SoftHSM."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.backends.software import SoftwareProvider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle

PASSPHRASE = "didcomm test keystore"

# Two keys per key-agreement algorithm (for several recipients), plus signing keys.
SOFT_KEYS = {
    "x25519-a": Algorithm.X25519,
    "x25519-b": Algorithm.X25519,
    "x25519-c": Algorithm.X25519,
    "p256-a": Algorithm.ES256,
    "p256-b": Algorithm.ES256,
    "p384-a": Algorithm.ES384,
    "p384-b": Algorithm.ES384,
    "ed25519": Algorithm.EdDSA,
}


@pytest.fixture(scope="session")
def soft_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, KeyHandle]]:
    """Software keystore keys (passphrase-sealed files), unlocked once for the session."""
    directory: Path = tmp_path_factory.mktemp("didcomm-keystore")
    provider = SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: PASSPHRASE, allow_extractable=True
    )
    handles: dict[str, KeyHandle] = {}
    for name, alg in SOFT_KEYS.items():
        handle = provider.generate(provider.key_uri(name), alg)
        handle.unlock()
        handles[name] = handle
    yield handles
    provider.close()


@pytest.fixture(scope="session")
def hsm_keys(pkcs11_provider: Pkcs11Provider) -> Iterator[dict[str, KeyHandle]]:
    """Keys generated inside SoftHSM: non-extractable, ECDH done by the token."""
    prefix = f"didcomm-{secrets.token_hex(4)}"
    wanted = {
        "x25519": Algorithm.X25519,
        "x25519-b": Algorithm.X25519,
        "p256": Algorithm.ES256,
        "p256-b": Algorithm.ES256,
        "p384": Algorithm.ES384,
        "ed25519": Algorithm.EdDSA,
    }
    handles: dict[str, KeyHandle] = {}
    try:
        for name, alg in wanted.items():
            handles[name] = pkcs11_provider.generate(f"pkcs11:object={prefix}-{name}", alg)
        yield handles
    finally:
        for handle in handles.values():
            with contextlib.suppress(KeyNotFoundError):
                pkcs11_provider.delete(handle.uri)
