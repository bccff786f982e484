"""Try every PKCS#11 route by which a private key could leave its token.

Used by the demo and by operators who want to see, on their own HSM, that a key is
really locked in: each attempt is made for real, through the same module and
session, and reported as refused (with the token's own error) or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from janus_hsm.errors import ExportRefusedError

from .handle import Pkcs11KeyHandle


@dataclass(frozen=True)
class ExportAttempt:
    route: str
    refused: bool
    detail: str


def probe_export(handle: Pkcs11KeyHandle) -> list[ExportAttempt]:
    """Attempt each export route against ``handle``'s private key; nothing is modified
    on a custody-grade key, because every attempt is refused by the token."""
    ts = handle._ts  # the handle's own logged-in session: the attacker has the PIN

    def private(session: Any) -> Any:
        return ts.object(session, ObjectClass.PRIVATE_KEY, handle.key_id, handle.label)

    def read_value(session: Any) -> Any:
        return private(session)[Attribute.VALUE]

    def set_extractable(session: Any) -> Any:
        private(session)[Attribute.EXTRACTABLE] = True

    def clear_sensitive(session: Any) -> Any:
        private(session)[Attribute.SENSITIVE] = False

    def copy_extractable(session: Any) -> Any:
        copy = private(session).copy({Attribute.EXTRACTABLE: True, Attribute.TOKEN: False})
        copy.destroy()  # only reached if the token wrongly allowed the copy

    def wrap(session: Any) -> Any:
        kek = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
        try:
            return kek.wrap_key(private(session), mechanism=Mechanism.AES_KEY_WRAP_PAD)
        finally:
            kek.destroy()

    routes: list[tuple[str, Callable[[Any], Any]]] = [
        ("read CKA_VALUE", read_value),
        ("set CKA_EXTRACTABLE=true", set_extractable),
        ("set CKA_SENSITIVE=false", clear_sensitive),
        ("C_CopyObject with CKA_EXTRACTABLE=true", copy_extractable),
        ("C_WrapKey under a fresh AES key", wrap),
    ]
    results = []
    for route, attempt in routes:
        try:
            ts.run(attempt, what=route)
        except Exception as exc:
            results.append(ExportAttempt(route, True, _reason(exc)))
        else:
            results.append(ExportAttempt(route, False, "the token allowed it"))
    try:
        handle.as_cryptography_key().private_bytes(*_pkcs8_args())
    except Exception as exc:
        results.append(ExportAttempt("cryptography private_bytes()", True, _reason(exc)))
    else:
        results.append(ExportAttempt("cryptography private_bytes()", False, "returned bytes"))
    return results


def _pkcs8_args() -> tuple[Any, Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return (
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, pkcs11.PKCS11Error | ExportRefusedError):
        return type(exc).__name__
    text = str(exc)
    # BackendError messages end with the token's own error name; keep that part.
    return text.rsplit(": ", 1)[-1] if text else type(exc).__name__
