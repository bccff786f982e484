"""janus_hsm: key custody. Private keys stay in hardware; this package reaches them.

Start with :func:`open_provider` (a token or keystore) or :func:`open_key` (one key),
both of which take a key URI: ``pkcs11:`` (RFC 7512), ``piv:`` (a PIV card slot, e.g. a
YubiKey's) or ``soft:`` (software keystore).  Backends that live outside this package
(the HSM service's ``hsm+https:`` keys) are registered by URI scheme: with
:func:`register_scheme`, or as an entry point of the ``janus.key_providers`` group
named by the scheme, so this package never imports them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

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
    "register_scheme",
    "uri_scheme",
]

SCHEMES = ("pkcs11", "piv", "soft")
#: The entry point group outside backends register under, one entry point per scheme
#: (its name), whose object is a :class:`ProviderOpener`.
ENTRY_POINT_GROUP = "janus.key_providers"
_SCHEME_NAME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")


class ProviderOpener(Protocol):
    """What an outside backend registers: ``open_provider``'s signature."""

    def __call__(
        self,
        uri: str,
        *,
        pin_source: PinSource | None,
        allow_extractable: bool,
        on_touch: Callable[[str], None] | None,
    ) -> KeyProvider: ...


_registered: dict[str, ProviderOpener] = {}
_entry_points_loaded = False
_registry_lock = threading.Lock()


def register_scheme(scheme: str, opener: ProviderOpener) -> None:
    """Serve key URIs of ``scheme`` with ``opener`` (an outside backend).

    The built-in schemes cannot be replaced: a ``pkcs11:`` URI always means a token.
    """
    scheme = scheme.lower()
    if not _SCHEME_NAME.fullmatch(scheme) or scheme in SCHEMES:
        raise ValueError(f"cannot register the key URI scheme {scheme!r}")
    with _registry_lock:
        _registered[scheme] = opener


def _outside_opener(scheme: str) -> ProviderOpener | None:
    """The registered opener of ``scheme``, looking at installed entry points once."""
    global _entry_points_loaded
    with _registry_lock:
        if scheme not in _registered and not _entry_points_loaded:
            _entry_points_loaded = True
            from importlib.metadata import entry_points

            for entry in entry_points(group=ENTRY_POINT_GROUP):
                name = entry.name.lower()
                if _SCHEME_NAME.fullmatch(name) and name not in SCHEMES:
                    _registered.setdefault(name, _LazyOpener(entry.value))
        return _registered.get(scheme)


class _LazyOpener:
    """An entry point's opener, imported only when a URI of its scheme is opened."""

    def __init__(self, target: str) -> None:
        self._target = target

    def __call__(
        self,
        uri: str,
        *,
        pin_source: PinSource | None,
        allow_extractable: bool,
        on_touch: Callable[[str], None] | None,
    ) -> KeyProvider:
        from importlib.metadata import EntryPoint

        opener: ProviderOpener = EntryPoint(name="", value=self._target, group="").load()
        return opener(
            uri, pin_source=pin_source, allow_extractable=allow_extractable, on_touch=on_touch
        )


def uri_scheme(uri: str) -> str:
    scheme, colon, _ = uri.partition(":")
    scheme = scheme.lower()
    if not colon or (scheme not in SCHEMES and _outside_opener(scheme) is None):
        from janus_hsm.uri_grammar import shown_scheme

        # Only the scheme is named: the rest may be a secret pasted in the wrong place.
        known = [*SCHEMES, *sorted(_registered)]
        raise UriError(
            f"unsupported key URI ({shown_scheme(uri)}): expected one of "
            + ", ".join(f"{s}:…" for s in known)
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
    if scheme not in SCHEMES:
        opener = _outside_opener(scheme)
        assert opener is not None  # uri_scheme refused unknown schemes
        return opener(
            uri, pin_source=pin_source, allow_extractable=allow_extractable, on_touch=on_touch
        )
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
