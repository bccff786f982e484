"""janus_hsm: key custody. Private keys stay in hardware; this package reaches them.

Start with :func:`open_provider` (a token or keystore) or :func:`open_key` (one key),
both of which take a key URI: ``pkcs11:`` (RFC 7512) or ``soft:`` (software keystore).
"""

from __future__ import annotations

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import JanusHSMError, UriError
from janus_hsm.pin import PinSource
from janus_hsm.provider import (
    Attestation,
    KeyHandle,
    KeyProperties,
    KeyProvider,
    SignatureFormat,
)

__all__ = [
    "Algorithm",
    "Attestation",
    "JanusHSMError",
    "KeyHandle",
    "KeyProperties",
    "KeyProvider",
    "SignatureFormat",
    "open_key",
    "open_provider",
    "uri_scheme",
]

SCHEMES = ("pkcs11", "soft")


def uri_scheme(uri: str) -> str:
    scheme, colon, _ = uri.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in SCHEMES:
        raise UriError(
            f"unsupported key URI {uri[:40]!r}: expected one of "
            + ", ".join(f"{s}:…" for s in SCHEMES)
        )
    return scheme


def open_provider(
    uri: str, *, pin_source: PinSource | None = None, allow_extractable: bool = False
) -> KeyProvider:
    """The key store a URI points into (object attributes in the URI are ignored)."""
    scheme = uri_scheme(uri)
    if scheme == "pkcs11":
        from janus_hsm.backends.pkcs11 import Pkcs11Provider

        return Pkcs11Provider.open(uri, pin_source=pin_source, allow_extractable=allow_extractable)
    from janus_hsm.backends.software import SoftwareProvider

    return SoftwareProvider.open(
        uri, passphrase_source=pin_source, allow_extractable=allow_extractable
    )


def open_key(
    uri: str, *, pin_source: PinSource | None = None, allow_extractable: bool = False
) -> KeyHandle:
    """The one key a URI names, checked fit for custody unless ``allow_extractable``."""
    provider = open_provider(uri, pin_source=pin_source, allow_extractable=allow_extractable)
    return provider.find(uri)
