"""Where a PIV card's management key comes from, and authenticating with it.

The management key guards generating keys and writing certificates. Sources, in order:

1. ``management-key-source=file:/path`` in the URI: a file holding the key in hex;
2. ``JANUS_PIV_MANAGEMENT_KEY``: the key in hex in the environment (set but empty is an
   error, never a reason to fall back to the sources below);
3. a PIN-protected key stored on the card, as ``ykman piv access
   change-management-key --protect`` leaves it (PIVMAN data flags it; the key itself
   sits in the PRINTED object, readable only after PIN verification);
4. the factory default key, which anyone can use: Janus uses it only with a loud
   warning, and reports it (``PivProvider.default_management_key``) so the CLI can too.

Never from argv.  The key type (3DES or AES-128/192/256) is the card's: read from its
metadata on firmware 5.3+ (yubikit does this when the session opens), 3DES before.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from pathlib import Path

from yubikit.core.smartcard import ApduError
from yubikit.piv import MANAGEMENT_KEY_TYPE, PivSession

from janus_hsm.errors import ManagementKeyError
from janus_hsm.pin import pin_source_path

log = logging.getLogger(__name__)

MANAGEMENT_KEY_ENV = "JANUS_PIV_MANAGEMENT_KEY"
#: 0102030405060708 three times: the factory default of every YubiKey (3DES, or AES-192
#: from firmware 5.7). Public knowledge, so a card still using it has no real guard.
DEFAULT_MANAGEMENT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")
_MAX_FILE = 1024

ManagementKeySource = Callable[[], bytes]


def parse_management_key(text: str, where: str) -> bytes:
    """A management key written in hex (whitespace and a 0x prefix tolerated)."""
    cleaned = "".join(text.split()).removeprefix("0x")
    try:
        key = bytes.fromhex(cleaned)
    except ValueError:
        raise ManagementKeyError(f"the management key in {where} is not hex") from None
    if len(key) not in (16, 24, 32):
        raise ManagementKeyError(
            f"the management key in {where} is {len(key)} bytes; PIV management keys are "
            "16 (AES-128), 24 (3DES or AES-192) or 32 (AES-256) bytes"
        )
    return key


def read_management_key_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_FILE:
            raise ManagementKeyError(f"{path} is too large to hold a management key")
        if path.stat().st_mode & 0o077:
            log.warning("management key file %s is readable by other users; chmod 600 it", path)
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise ManagementKeyError(
            f"cannot read management key file {path}: {exc.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise ManagementKeyError(f"management key file {path} is not hex text") from None
    return parse_management_key(text, str(path))


def resolve_management_key_source(uri_source: str | None) -> ManagementKeySource | None:
    """The URI's file, else the environment variable, else None (card-stored or default)."""
    if uri_source:
        path = pin_source_path(uri_source)
        return lambda: read_management_key_file(path)
    if MANAGEMENT_KEY_ENV in os.environ:
        if not os.environ[MANAGEMENT_KEY_ENV].strip():
            # Set but empty (an unexpanded ${VAR}, a blank secret): falling back to the
            # card-stored key, or before 5.3 to the factory default, would hide the mistake.
            return _empty_environment
        return lambda: parse_management_key(
            os.environ.get(MANAGEMENT_KEY_ENV, ""), MANAGEMENT_KEY_ENV
        )
    return None


def _empty_environment() -> bytes:
    raise ManagementKeyError(
        f"{MANAGEMENT_KEY_ENV} is set but empty. Put the management key (hex) in it, or "
        "unset it to use the PIN-protected key stored on the card, or name a key file "
        "with management-key-source=file:/path"
    )


def warn_default(where: str) -> None:
    log.warning(
        "%s still uses the FACTORY DEFAULT PIV management key: anyone holding the card "
        "can overwrite its keys and certificates. Change it now: `ykman piv access "
        "change-management-key --generate --protect`",
        where,
    )


def is_default_key(key: bytes) -> bool:
    return hmac.compare_digest(key, DEFAULT_MANAGEMENT_KEY)


def card_reports_default(session: PivSession) -> bool | None:
    """What the card's metadata says (firmware 5.3+), or None when it cannot say."""
    try:
        return session.get_management_key_metadata().default_value
    except Exception:  # NotSupportedError before 5.3; anything else: unknown
        return None


def stored_key(session: PivSession, verify_pin: Callable[[], object]) -> bytes | None:
    """The PIN-protected management key ykman stored on the card, if there is one."""
    from ykman.piv import get_pivman_data, get_pivman_protected_data

    pivman = get_pivman_data(session)
    if pivman.has_stored_key:
        verify_pin()
        key = get_pivman_protected_data(session).key
        if not key:
            raise ManagementKeyError(
                "the card says its management key is PIN-protected, but the protected "
                "object holds no key; set one with `ykman piv access "
                "change-management-key --protect`"
            )
        return bytes(key)
    if pivman.has_derived_key:
        raise ManagementKeyError(
            "this card's management key is derived from the PIN (a deprecated ykman "
            "scheme Janus does not use); switch with `ykman piv access "
            "change-management-key --protect`, or give the key via management-key-source"
        )
    return None


def authenticate(
    session: PivSession,
    *,
    source: ManagementKeySource | None,
    verify_pin: Callable[[], object],
    where: str,
) -> bool:
    """Authenticate ``session`` with the management key; True if it is the factory default."""
    key_type = session.management_key_type
    if source is not None:
        key = source()
        origin = "the configured management key"
    else:
        found = stored_key(session, verify_pin)
        if found is not None:
            key, origin = found, "the PIN-protected management key stored on the card"
        else:
            if card_reports_default(session) is False:
                raise ManagementKeyError(
                    f"{where} has a non-default management key and none was given: put it "
                    f"(hex) in a file named by management-key-source=file:/path, or in "
                    f"{MANAGEMENT_KEY_ENV}, or store it PIN-protected on the card "
                    "(`ykman piv access change-management-key --protect`)"
                )
            key, origin = DEFAULT_MANAGEMENT_KEY, "the factory default management key"
    if len(key) != key_type.key_len:
        raise ManagementKeyError(
            f"{where} has a {key_type.name} management key ({key_type.key_len} bytes), "
            f"but {origin} is {len(key)} bytes"
        )
    try:
        session.authenticate(key)
    except ApduError:
        raise ManagementKeyError(
            f"{where} rejected {origin}. Check management-key-source / "
            f"{MANAGEMENT_KEY_ENV}; the card's key type is {_describe(key_type)}"
        ) from None
    return is_default_key(key)


def _describe(key_type: MANAGEMENT_KEY_TYPE) -> str:
    return {
        MANAGEMENT_KEY_TYPE.TDES: "3DES",
        MANAGEMENT_KEY_TYPE.AES128: "AES-128",
        MANAGEMENT_KEY_TYPE.AES192: "AES-192",
        MANAGEMENT_KEY_TYPE.AES256: "AES-256",
    }.get(key_type, key_type.name)
