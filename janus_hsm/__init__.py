"""janus_hsm: key custody. Private keys stay in hardware; this package reaches them.

Start with :func:`open_provider` (a token or keystore) or :func:`open_key` (one key),
both of which take a key URI: ``pkcs11:`` (RFC 7512), ``piv:`` (a PIV card slot, e.g. a
YubiKey's) or ``soft:`` (software keystore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import JanusHSMError, KeystoreError, UriError
from janus_hsm.pin import PinSource
from janus_hsm.provider import (
    Attestation,
    KeyHandle,
    KeyProperties,
    KeyProvider,
    SignatureFormat,
)

if TYPE_CHECKING:
    from janus_hsm.backends.software.keyfile import HmacSecretRecipient

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

SCHEMES = ("pkcs11", "piv", "soft")


def uri_scheme(uri: str) -> str:
    scheme, colon, _ = uri.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in SCHEMES:
        from janus_hsm.uri_grammar import shown_scheme

        # Only the scheme is named: the rest may be a secret pasted in the wrong place.
        raise UriError(
            f"unsupported key URI ({shown_scheme(uri)}): expected one of "
            + ", ".join(f"{s}:…" for s in SCHEMES)
        )
    return scheme


def open_provider(
    uri: str,
    *,
    pin_source: PinSource | None = None,
    allow_extractable: bool = False,
    on_touch: Callable[[str], None] | None = None,
) -> KeyProvider:
    """The key store a URI points into (object attributes in the URI are ignored).

    ``on_touch`` is called with a sentence before an operation that waits for a touch
    (PIV slots with a touch policy); other backends ignore it.
    """
    scheme = uri_scheme(uri)
    if scheme == "pkcs11":
        from janus_hsm.backends.pkcs11 import Pkcs11Provider

        return Pkcs11Provider.open(uri, pin_source=pin_source, allow_extractable=allow_extractable)
    if scheme == "piv":
        from janus_hsm.backends.piv import PivProvider

        return PivProvider.open(
            uri, pin_source=pin_source, allow_extractable=allow_extractable, on_touch=on_touch
        )
    from janus_hsm.backends.software import SoftwareProvider

    return SoftwareProvider.open(
        uri,
        passphrase_source=pin_source,
        allow_extractable=allow_extractable,
        hmac_secret=_Fido2KeystoreOpener(on_touch),
    )


def open_key(
    uri: str,
    *,
    pin_source: PinSource | None = None,
    allow_extractable: bool = False,
    on_touch: Callable[[str], None] | None = None,
) -> KeyHandle:
    """The one key a URI names, checked fit for custody unless ``allow_extractable``."""
    provider = open_provider(
        uri, pin_source=pin_source, allow_extractable=allow_extractable, on_touch=on_touch
    )
    return provider.find(uri)


class _Fido2KeystoreOpener:
    """Lets keys sealed for FIDO2 credentials open with a connected security key.

    Every software keystore opened here gets one; it enrols nothing (new keys use the
    passphrase) and imports python-fido2 only when a FIDO2-protected key is unlocked,
    so other commands pay nothing for it.
    """

    def __init__(self, on_touch: Callable[[str], None] | None) -> None:
        self._on_touch = on_touch

    def enrolled(self) -> Sequence[HmacSecretRecipient]:
        return ()

    def hmac_secret(
        self, recipients: Sequence[HmacSecretRecipient], salt: bytes
    ) -> tuple[int, bytes]:
        try:
            from janus_hsm.fido2.keystore import keystore_opener
        except ImportError:
            raise KeystoreError(
                "this key opens only with a FIDO2 security key, and python-fido2 is not "
                "installed: pip install 'janus-hsm[fido2]'"
            ) from None
        return keystore_opener(self._on_touch).hmac_secret(recipients, salt)
