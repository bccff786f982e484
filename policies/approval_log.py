"""Approvals are good for one capability: the issuer remembers which it has used.

An approval is a WebAuthn assertion over the digest of the claims about to be signed
(:func:`policies.approvals.approval_challenge`), ``jti`` included, so it cannot be moved
to other claims.  The same claims can be signed again, though, and an ECDSA signature
differs each time, so each signing would be a new capability (a new id, its own use
count) carrying the same valid approvals.  The issuing program therefore records each
challenge whose approvals it used, durably and before the key signs, and refuses a
challenge it has seen: "2 approvals, 1 use" means one use.

The record is a text file of hex digests, one per line, appended to under an exclusive
``flock`` and fsynced before the signature is made; a line torn by a crash is ended
before the next one is added and matches no digest.  Whoever can edit the file can
forget a use: it protects the flow, not against the issuer machine's owner (docs/
threat-model.md, scenario 17).
"""

from __future__ import annotations

import os
from pathlib import Path

from janus_hsm.atomic_file import fsync_directory
from janus_hsm.file_lock import locked_file
from policies.errors import ReplayError

FILE_NAME = "used-approvals"


class ApprovalReusedError(ReplayError):
    """These approvals were already used to sign a capability."""

    code = "approval_reused"


class UsedApprovals:
    """The challenges whose approvals this issuer has signed with, in ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def claim(self, challenge: bytes) -> None:
        """Record ``challenge`` as used, durably; ApprovalReusedError if it was already."""
        line = challenge.hex()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self.path.exists()
        with locked_file(self.path, flags=os.O_APPEND) as fd:
            with os.fdopen(os.dup(fd), "rb") as reader:
                text = reader.read().decode("ascii", errors="replace")
            if line in text.split("\n"):
                raise ApprovalReusedError(
                    "these approvals were already used to sign a capability: ask the "
                    "approvers again for a new grant (each approval is good for one)"
                )
            prefix = "\n" if text and not text.endswith("\n") else ""  # a torn last line
            os.write(fd, f"{prefix}{line}\n".encode("ascii"))
            os.fsync(fd)
        if created:
            fsync_directory(self.path.parent)
