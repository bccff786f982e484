"""Message and conversation ids: 32 bytes on the wire and on disk, base64url in the API.

One module so that every layer spells an id the same way and refuses the same
non-canonical spellings (janus_hsm.b64url is strict: one text per id).
"""

from __future__ import annotations

import os
from typing import Final

from agent.sync.errors import SyncError
from janus_hsm import b64url

ID_BYTES: Final = 32
ID_CHARS: Final = 43  # unpadded base64url of 32 bytes


def id_text(raw: bytes) -> str:
    """A 32-byte id as the text the API uses."""
    return b64url.encode(raw)


def id_bytes(text: object, what: str, error: type[SyncError]) -> bytes:
    """Parse an id given as text, or raise ``error`` naming ``what``."""
    if type(text) is not str or len(text) != ID_CHARS:
        raise error(f"{what} must be a {ID_CHARS}-character base64url id")
    raw = b64url.decode(text, what, error=error)
    if len(raw) != ID_BYTES:  # pragma: no cover - 43 canonical chars are 32 bytes
        raise error(f"{what} must be {ID_BYTES} bytes")
    return raw


def new_conversation_id() -> str:
    """A fresh random conversation id: unguessable, so it reveals nothing and collides never."""
    return id_text(os.urandom(ID_BYTES))
