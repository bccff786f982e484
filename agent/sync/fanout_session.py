"""One device-pair session: a relationship session between two devices' agreement keys.

The initiator's messages repeat the session's initial header until the other device
answers (as Signal's prekey messages do): if the first message is lost, the next one
still opens the session, and the responder, which keeps the header's digest, takes a
repeated header for the session it already holds instead of a replay.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from agent.relationships import suite as suites
from agent.relationships.errors import DecryptError, DuplicateMessageError
from agent.relationships.ratchet import RatchetState
from agent.relationships.x3dh import KIND_RATCHET


@dataclass
class DeviceSession:
    """This device's side of a session with one other device (a peer's or its own)."""

    device: str
    owner: str
    initiator: bool
    state: RatchetState
    #: SHA-256 of the initial header: names the session on both sides.
    initial_digest: bytes
    #: The initial header, put before every message until the other device answers.
    initial: bytes | None = None
    #: Set when the other device left its owner's list: nothing is sent or accepted.
    ended: bool = False
    sent: int = 0
    received: int = 0

    def encrypt(self, plaintext: bytes) -> bytes:
        """The wire bytes of one message (this advances the ratchet)."""
        wire = self.state.encrypt(plaintext)
        self.sent += 1
        return wire if self.initial is None else self.initial + wire[2:]

    def try_open(self, ratchet_wire: bytes) -> tuple[RatchetState, bytes] | None:
        """(new state, plaintext) if the message is this session's, else None; this
        session's state is left as it is (the caller commits the new one)."""
        try:
            return self.state.decrypt(ratchet_wire)
        except DuplicateMessageError:
            raise
        except DecryptError:
            return None

    def fingerprint(self) -> tuple[object, ...]:
        """Everything this session holds, comparable (to prove a refusal changed nothing)."""
        state = self.state.to_bytes()
        return (self.device, self.owner, self.initiator, state, self.initial_digest,
                self.initial, self.ended, self.sent, self.received)  # fmt: skip


def ratchet_part(suite: suites.Suite, rest: bytes) -> bytes:
    """The ratchet message that follows an initial header, with its own prefix back."""
    return bytes((suites.SUITE_IDS[suite], KIND_RATCHET)) + rest


def digest_of(header: bytes) -> bytes:
    return hashlib.sha256(header).digest()
