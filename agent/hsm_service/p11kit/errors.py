"""The error the p11-kit RPC front raises for bytes that are not the protocol."""

from __future__ import annotations

from agent.hsm_service.errors import HsmServiceError


class MalformedMessage(HsmServiceError):
    """A frame or message a p11-kit client would never send: the connection is dropped.

    The message names what was wrong with the framing, never the bytes themselves (they
    may carry a PIN or data to sign)."""

    code = "bad_p11kit_message"
    status = 400
