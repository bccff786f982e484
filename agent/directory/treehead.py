"""Signed tree heads, and the client's memory of them that catches equivocation.

A tree head commits the directory to its whole log: anyone who holds two heads of one
directory can demand a consistency proof between them, and a directory that showed
two histories cannot produce one.  The directory signs with its hardware key, so the
two conflicting heads are evidence a third party can check.

Signed bytes (docs/directory-formats.md): the context label
``janus-directory-tree-head-v1`` and a zero byte, then RFC 9162 §4.9 TreeHeadDataV2
with no extensions: uint64 timestamp (ms), uint64 tree_size, a one-byte length (32)
and the root hash, and a two-byte zero extensions length.  The label keeps a head
from ever being taken for anything else the same key signs (JWS signing inputs are
ASCII; these bytes are not).  The signature is the raw JOSE form ``KeyHandle.sign``
makes: r||s in low-S form for ES256/ES384, 64 bytes for Ed25519.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.directory.errors import EquivocationError, ProofError, TreeHeadError
from agent.directory.merkle import HASH_SIZE, MAX_TREE_SIZE, b64, unb64, verify_consistency
from janus_hsm.atomic_file import replace_file
from janus_hsm.file_lock import locked_file
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import PublicKeyFormatError, algorithm_of, from_did_key
from janus_hsm.strictjson import StrictJSONError, canonical_text, loads_object
from policies.errors import PolicyError
from policies.jws import ParsedJws, verify_signature

CONTEXT = b"janus-directory-tree-head-v1\x00"
MAX_TIMESTAMP = 2**63 - 1
FIELDS = frozenset({"tree_size", "root_hash", "timestamp", "signature", "key"})


def tree_head_tbs(tree_size: int, root_hash: bytes, timestamp: int) -> bytes:
    """The exact bytes a directory signs for a tree head."""
    return (
        CONTEXT
        + struct.pack(">QQB", timestamp, tree_size, len(root_hash))
        + root_hash
        + b"\x00\x00"
    )


def _int(value: Any, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise TreeHeadError(f"the tree head's {what} must be an integer from 0 to {limit}")
    return value


@dataclass(frozen=True)
class TreeHead:
    tree_size: int
    root_hash: bytes
    timestamp: int  # milliseconds since the Unix epoch
    signature: bytes
    key: str  # the directory's did:key

    def to_dict(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root_hash": b64(self.root_hash),
            "timestamp": self.timestamp,
            "signature": b64(self.signature),
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TreeHead:
        """Parse a head from outside: exactly the five members, well formed.

        Says nothing about the signature: :func:`verify_tree_head` does.
        """
        if not isinstance(data, dict):
            raise TreeHeadError("a tree head must be a JSON object")
        if set(data) != FIELDS:
            missing, extra = sorted(FIELDS - set(data)), sorted(set(data) - FIELDS)
            raise TreeHeadError(
                f"a tree head has exactly {', '.join(sorted(FIELDS))}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(map(repr, extra))[:200]}" if extra else "")
            )
        key = data["key"]
        if not isinstance(key, str) or not key.startswith("did:key:") or len(key) > 512:
            raise TreeHeadError("the tree head's key must be a did:key")
        return cls(
            tree_size=_int(data["tree_size"], "tree_size", MAX_TREE_SIZE),
            root_hash=unb64(
                data["root_hash"], "the tree head's root_hash", size=HASH_SIZE, error=TreeHeadError
            ),
            timestamp=_int(data["timestamp"], "timestamp", MAX_TIMESTAMP),
            signature=unb64(data["signature"], "the tree head's signature", error=TreeHeadError),
            key=key,
        )

    def same_head(self, other: TreeHead) -> bool:
        return (self.tree_size, self.root_hash) == (other.tree_size, other.root_hash)


def sign_tree_head(key: KeyHandle, tree_size: int, root_hash: bytes, timestamp: int) -> TreeHead:
    """Sign a head with the directory's key (in its token: the key never leaves it)."""
    _int(tree_size, "tree_size", MAX_TREE_SIZE)
    _int(timestamp, "timestamp", MAX_TIMESTAMP)
    if len(root_hash) != HASH_SIZE:
        raise TreeHeadError(f"a root hash has {HASH_SIZE} bytes")
    signature = key.sign(tree_head_tbs(tree_size, root_hash, timestamp))
    return TreeHead(tree_size, root_hash, timestamp, signature, key.did)


def verify_tree_head_signature(head: TreeHead) -> None:
    """The head was signed by the key it names; TreeHeadError otherwise."""
    try:
        public_key = from_did_key(head.key)
        alg = algorithm_of(public_key)
    except PublicKeyFormatError as exc:
        raise TreeHeadError(f"the tree head's key: {exc}") from None
    # One verifier for all Janus signatures (algorithm bound to the key type, low-S,
    # libsodium for Ed25519): fed the head's bytes as its signing input.
    signed = ParsedJws(
        compact="",
        header={"alg": alg.value},
        payload={},
        signing_input=tree_head_tbs(head.tree_size, head.root_hash, head.timestamp),
        signature=head.signature,
    )
    try:
        verify_signature(signed, public_key, what="the tree head")
    except PolicyError as exc:
        raise TreeHeadError(str(exc)) from None


def verify_tree_head(
    head: TreeHead,
    *,
    expected_key: str | None,
    now_ms: int | None = None,
    max_age_ms: int,
    max_future_ms: int,
) -> None:
    """A head is usable: signed by ``expected_key`` (if given), neither stale nor future.

    Staleness bounds how long a directory can keep a client on an old view (hiding a
    newer binding); the future bound refuses a head that would outlive that check.
    """
    if expected_key is not None and head.key != expected_key:
        raise TreeHeadError("the tree head is signed by another key than the directory's")
    verify_tree_head_signature(head)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if head.timestamp > now + max_future_ms:
        raise TreeHeadError(
            f"the tree head is dated {head.timestamp - now} ms in the future "
            f"(at most {max_future_ms} ms allowed)"
        )
    if head.timestamp < now - max_age_ms:
        raise TreeHeadError(
            f"the tree head is stale: {now - head.timestamp} ms old "
            f"(at most {max_age_ms} ms allowed)"
        )


FetchConsistency = Callable[[int, int], list[bytes]]


class SeenHeads:
    """The client's memory: the largest head seen per directory, and equivocations.

    A file (atomic, 0600) so that every command run by the owner's agent shares one
    view: a directory must then keep every later answer consistent with the first
    one it gave.  A directory caught equivocating stays refused, with both signed
    heads kept as evidence.
    """

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    # -- the file

    def _lock_path(self) -> Path:
        return self._path.with_name(self._path.name + ".lock")

    def _load(self) -> dict[str, Any]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {"version": self.VERSION, "directories": {}}
        try:
            data = loads_object(raw, str(self._path))
        except StrictJSONError as exc:
            raise TreeHeadError(f"the record of seen tree heads is damaged: {exc}") from None
        if data.get("version") != self.VERSION or not isinstance(data.get("directories"), dict):
            raise TreeHeadError(f"{self._path} is not a record of seen tree heads")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        replace_file(self._path, canonical_text(data).encode("utf-8") + b"\n")

    # -- reading

    def head(self, directory_key: str) -> TreeHead | None:
        """The largest head accepted from this directory, if any."""
        entry = self._load()["directories"].get(directory_key)
        if entry is None or entry.get("head") is None:
            return None
        return TreeHead.from_dict(entry["head"])

    def evidence(self, directory_key: str) -> list[dict[str, Any]] | None:
        """The two signed heads proving this directory equivocated, if it did."""
        entry = self._load()["directories"].get(directory_key)
        if entry is None:
            return None
        found = entry.get("equivocation")
        return None if found is None else list(found["heads"])

    # -- accepting

    def accept(
        self, directory_key: str, head: TreeHead, fetch_consistency: FetchConsistency
    ) -> None:
        """Remember ``head`` if it is consistent with everything seen before.

        ``fetch_consistency(m, n)`` asks the directory for PROOF(m, D[n]).  Raises
        EquivocationError (and records it) when the directory cannot show that the two
        heads are one history; TreeHeadError for a head not signed by the key this
        directory used before.  An error of ``fetch_consistency`` itself (the directory
        unreachable) passes through and leaves the record unchanged.
        """
        verify_tree_head_signature(head)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with locked_file(self._lock_path()):
            data = self._load()
            directories: dict[str, Any] = data["directories"]
            entry = directories.get(directory_key)
            if entry is not None and entry.get("equivocation") is not None:
                raise EquivocationError(
                    "this directory was caught showing two histories and is not trusted",
                    evidence=list(entry["equivocation"]["heads"]),
                )
            old = None if entry is None else TreeHead.from_dict(entry["head"])
            if old is None:
                directories[directory_key] = {"head": head.to_dict()}
                self._save(data)
                return
            assert entry is not None
            if old.key != head.key:
                raise TreeHeadError(
                    "the tree head is signed by another key than this directory used before"
                )
            try:
                if head.tree_size == old.tree_size:
                    if head.root_hash != old.root_hash:
                        raise ProofError("two tree heads of one size have different roots")
                elif head.tree_size > old.tree_size:
                    proof = fetch_consistency(old.tree_size, head.tree_size)
                    verify_consistency(
                        old.tree_size, head.tree_size, old.root_hash, head.root_hash, proof
                    )
                else:
                    proof = fetch_consistency(head.tree_size, old.tree_size)
                    verify_consistency(
                        head.tree_size, old.tree_size, head.root_hash, old.root_hash, proof
                    )
            except ProofError as exc:
                heads = [old.to_dict(), head.to_dict()]
                entry["equivocation"] = {
                    "heads": heads,
                    "reason": str(exc),
                    "detected": int(time.time() * 1000),
                }
                self._save(data)
                raise EquivocationError(
                    f"the directory showed two histories ({exc}); it is no longer trusted",
                    evidence=heads,
                ) from None
            if head.tree_size > old.tree_size or (
                head.tree_size == old.tree_size and head.timestamp > old.timestamp
            ):
                entry["head"] = head.to_dict()
                self._save(data)


def evidence_json(error: EquivocationError) -> str:
    """The evidence of an equivocation as one JSON text (for reports and ``--json``)."""
    return json.dumps({"error": error.code, "message": str(error), "heads": error.evidence})
