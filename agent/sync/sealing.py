"""Sync message bodies at rest, sealed under a key of the owner's relationship vault.

A sync store holds every message of an owner's conversations in the clear once they are
decrypted from their sessions; the relationship vault already keeps received messages
sealed under a storage key that only the token unlocks (one ECDH per process), so a copy
of the state directory reads nothing without the token.  The sync stores keep that
promise with a key derived from the same storage key: each message's encoding is sealed
with AES-256-GCM, its conversation and id as associated data, so a row cannot be moved
to another conversation or id unnoticed.  Ids, parents and timestamps stay in the clear:
causal delivery needs them, and an id is a hash that says nothing of the body.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.sync.errors import StoreError

if TYPE_CHECKING:
    from agent.relationships.vault import Vault

#: What the vault derives the sync stores' key for (``Vault.derived_key``).
SYNC_STORE_KEY_PURPOSE: Final = "sync-store"
_NONCE: Final = 12
_MESSAGE_AAD: Final = b"janus-sync-message/1|"
_CHECK_AAD: Final = b"janus-sync-store-check/1"
_CHECK_TEXT: Final = b"sealed sync store"


class StoreSealer:
    """Seals and opens the message bodies of one device's sync stores."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sync store key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def of_vault(cls, vault: Vault) -> StoreSealer:
        """The sealer of every sync store of the state whose vault this is."""
        return cls(vault.derived_key(SYNC_STORE_KEY_PURPOSE))

    @staticmethod
    def _aad(conv: bytes, mid: bytes) -> bytes:
        return _MESSAGE_AAD + len(conv).to_bytes(2, "big") + conv + mid

    def seal(self, conv: bytes, mid: bytes, encoded: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, encoded, self._aad(conv, mid))

    def open(self, conv: bytes, mid: bytes, blob: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], self._aad(conv, mid))
        except (InvalidTag, ValueError):
            raise StoreError("a sealed message of the sync store does not authenticate") from None

    def check_value(self) -> bytes:
        """What a sealed store keeps to tell its own key from another at opening."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, _CHECK_TEXT, _CHECK_AAD)

    def is_key_of(self, check: bytes) -> bool:
        try:
            return self._aead.decrypt(check[:_NONCE], check[_NONCE:], _CHECK_AAD) == _CHECK_TEXT
        except (InvalidTag, ValueError):
            return False
