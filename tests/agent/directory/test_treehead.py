"""Signed tree heads with a SoftHSM key, and SeenHeads catching a directory that
rewrites history (a test double serving a forked log to a client that saw an earlier
head)."""

from __future__ import annotations

import contextlib
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.directory.errors import EquivocationError, TreeHeadError
from agent.directory.merkle import MemoryNodeStore, MerkleLog, b64
from agent.directory.treehead import (
    SeenHeads,
    TreeHead,
    sign_tree_head,
    tree_head_tbs,
    verify_tree_head,
)
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle, raw_to_der
from janus_hsm.public_keys import from_did_key

NOW = 1_800_000_000_000
HOUR = 3600 * 1000


@pytest.fixture(params=[Algorithm.ES256, Algorithm.EdDSA])
def directory_key(
    request: pytest.FixtureRequest, pkcs11_provider: Any, key_name: str
) -> Iterator[KeyHandle]:
    alg: Algorithm = request.param
    handle: KeyHandle = pkcs11_provider.generate(f"pkcs11:object={key_name}-{alg.value}", alg)
    yield handle
    with contextlib.suppress(KeyNotFoundError):
        pkcs11_provider.delete(handle.uri)


def _log(entries: list[bytes]) -> MerkleLog:
    log = MerkleLog(MemoryNodeStore())
    for entry in entries:
        log.append(entry)
    return log


def _head(key: KeyHandle, log: MerkleLog, ts: int = NOW) -> TreeHead:
    return sign_tree_head(key, log.size(), log.root(), ts)


def _verify(head: TreeHead, **kw: Any) -> None:
    args: dict[str, Any] = {
        "expected_key": head.key,
        "now_ms": NOW,
        "max_age_ms": HOUR,
        "max_future_ms": 60_000,
    }
    args.update(kw)
    verify_tree_head(head, **args)


def test_a_signed_head_verifies_and_round_trips(directory_key: KeyHandle) -> None:
    head = _head(directory_key, _log([b"a", b"b", b"c"]))
    _verify(head)
    again = TreeHead.from_dict(head.to_dict())
    assert again == head
    assert set(head.to_dict()) == {"tree_size", "root_hash", "timestamp", "signature", "key"}
    assert head.key == directory_key.did


def test_the_signed_bytes_are_the_documented_ones() -> None:
    root = bytes(range(32))
    tbs = tree_head_tbs(5, root, 0x0102030405060708)
    assert tbs == (
        b"janus-directory-tree-head-v1\x00"
        + bytes.fromhex("0102030405060708")  # timestamp, uint64 big-endian
        + bytes.fromhex("0000000000000005")  # tree_size
        + b"\x20"
        + root
        + b"\x00\x00"  # no extensions
    )


def test_an_es256_head_verifies_with_a_generic_ecdsa_verifier(
    pkcs11_provider: Any, key_name: str
) -> None:
    key = pkcs11_provider.generate(f"pkcs11:object={key_name}", Algorithm.ES256)
    try:
        head = _head(key, _log([b"x"]))
        public = from_did_key(head.key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(
            raw_to_der(head.signature, 32),
            tree_head_tbs(head.tree_size, head.root_hash, head.timestamp),
            ec.ECDSA(hashes.SHA256()),
        )
    finally:
        pkcs11_provider.delete(key.uri)


def test_tampered_stale_future_and_foreign_heads_are_refused(
    directory_key: KeyHandle, pkcs11_provider: Any, key_name: str
) -> None:
    log = _log([b"a", b"b", b"c"])
    head = _head(directory_key, log)
    for bad in (
        replace(head, tree_size=head.tree_size + 1),
        replace(head, root_hash=_log([b"a", b"b", b"x"]).root()),
        replace(head, timestamp=head.timestamp + 1),
        replace(head, signature=bytes([head.signature[0] ^ 1]) + head.signature[1:]),
        replace(head, signature=head.signature[:-1]),
    ):
        with pytest.raises(TreeHeadError):
            _verify(bad)
    with pytest.raises(TreeHeadError, match="stale"):
        _verify(_head(directory_key, log, NOW - HOUR - 1))
    with pytest.raises(TreeHeadError, match="future"):
        _verify(_head(directory_key, log, NOW + 60_001))
    _verify(_head(directory_key, log, NOW - HOUR))
    _verify(_head(directory_key, log, NOW + 60_000))
    other = pkcs11_provider.generate(f"pkcs11:object={key_name}-other", Algorithm.ES256)
    try:
        forged = _head(other, log)
        with pytest.raises(TreeHeadError, match="another key"):
            _verify(forged, expected_key=directory_key.did)
        # Claiming the directory's key with another key's signature fails too.
        with pytest.raises(TreeHeadError):
            _verify(replace(forged, key=directory_key.did))
    finally:
        pkcs11_provider.delete(other.uri)


def test_verify_defaults_to_the_clock(directory_key: KeyHandle) -> None:
    head = _head(directory_key, _log([b"a"]), int(time.time() * 1000))
    verify_tree_head(head, expected_key=None, max_age_ms=60_000, max_future_ms=60_000)


@pytest.mark.parametrize(
    "change",
    [
        {"tree_size": -1},
        {"tree_size": True},
        {"tree_size": "3"},
        {"timestamp": 1.5},
        {"root_hash": "AAAA"},
        {"root_hash": "not base64!"},
        {"signature": 7},
        {"key": "did:web:example.org"},
        {"extra": 1},
    ],
)
def test_malformed_heads_are_refused(change: dict[str, Any]) -> None:
    good = {
        "tree_size": 3,
        "root_hash": b64(bytes(32)),
        "timestamp": NOW,
        "signature": b64(b"s"),
        "key": "did:key:z6Mk",
    }
    with pytest.raises(TreeHeadError):
        TreeHead.from_dict({**good, **change})
    missing = dict(good)
    del missing["key"]
    with pytest.raises(TreeHeadError):
        TreeHead.from_dict(missing)
    with pytest.raises(TreeHeadError):
        TreeHead.from_dict([good])


# --- SeenHeads


class Directory:
    """A test double of a directory: it serves tree heads and consistency proofs from
    whichever log it is currently showing (an honest one, or a fork)."""

    def __init__(self, key: KeyHandle, log: MerkleLog) -> None:
        self.key, self.log = key, log
        self.proofs_asked: list[tuple[int, int]] = []

    def head(self) -> TreeHead:
        return _head(self.key, self.log)

    def consistency(self, m: int, n: int) -> list[bytes]:
        self.proofs_asked.append((m, n))
        return self.log.consistency(m, n)


def _entries(n: int, tag: str = "e") -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def test_seen_heads_require_consistency_and_catch_a_rewritten_history(
    directory_key: KeyHandle, tmp_path: Path
) -> None:
    seen = SeenHeads(tmp_path / "state" / "seen-heads.json")
    honest = Directory(directory_key, _log(_entries(5)))
    did = directory_key.did
    first = honest.head()
    seen.accept(did, first, honest.consistency)
    assert seen.head(did) == first
    assert stat.S_IMODE((tmp_path / "state" / "seen-heads.json").stat().st_mode) == 0o600
    for entry in _entries(4, "more"):
        honest.log.append(entry)
    seen.accept(did, honest.head(), honest.consistency)
    assert honest.proofs_asked == [(5, 9)]
    assert seen.head(did).tree_size == 9  # type: ignore[union-attr]
    # An older head of the same history is accepted (and proven consistent) but does
    # not replace the newer one.
    older = sign_tree_head(directory_key, 7, honest.log.root(7), NOW)
    seen.accept(did, older, honest.consistency)
    assert honest.proofs_asked[-1] == (7, 9)
    assert seen.head(did).tree_size == 9  # type: ignore[union-attr]
    # Now the directory rewrites entry 3 and shows a longer log built on the fork.
    forked = Directory(directory_key, _log([*_entries(3), b"rewritten", *_entries(8, "fork")]))
    earlier = seen.head(did)
    fork_head = forked.head()
    with pytest.raises(EquivocationError) as caught:
        seen.accept(did, fork_head, forked.consistency)
    assert caught.value.code == "equivocation"
    assert caught.value.evidence == [earlier.to_dict(), fork_head.to_dict()]  # type: ignore[union-attr]
    assert seen.evidence(did) == caught.value.evidence
    # Evidence is two heads signed by the directory: anyone can check them.
    for item in caught.value.evidence:
        _verify(TreeHead.from_dict(item))
    # The directory is not trusted again, even when it shows the honest log.
    with pytest.raises(EquivocationError):
        seen.accept(did, honest.head(), honest.consistency)
    with pytest.raises(EquivocationError):
        SeenHeads(tmp_path / "state" / "seen-heads.json").accept(
            did, honest.head(), honest.consistency
        )


def test_same_size_different_root_is_equivocation(directory_key: KeyHandle, tmp_path: Path) -> None:
    seen = SeenHeads(tmp_path / "seen.json")
    a = Directory(directory_key, _log(_entries(4)))
    b = Directory(directory_key, _log(_entries(4, "other")))
    seen.accept(directory_key.did, a.head(), a.consistency)
    with pytest.raises(EquivocationError):
        seen.accept(directory_key.did, b.head(), b.consistency)
    assert b.proofs_asked == []


def test_a_smaller_forked_head_is_equivocation(directory_key: KeyHandle, tmp_path: Path) -> None:
    seen = SeenHeads(tmp_path / "seen.json")
    big = Directory(directory_key, _log(_entries(9)))
    seen.accept(directory_key.did, big.head(), big.consistency)
    small = Directory(directory_key, _log([b"x", *_entries(4)[1:]]))
    with pytest.raises(EquivocationError):
        seen.accept(directory_key.did, small.head(), big.consistency)


def test_an_unreachable_directory_changes_nothing(directory_key: KeyHandle, tmp_path: Path) -> None:
    path = tmp_path / "seen.json"
    seen = SeenHeads(path)
    d = Directory(directory_key, _log(_entries(3)))
    seen.accept(directory_key.did, d.head(), d.consistency)
    before = path.read_bytes()
    d.log.append(b"new")

    def down(m: int, n: int) -> list[bytes]:
        raise ConnectionError("unreachable")

    with pytest.raises(ConnectionError):
        seen.accept(directory_key.did, d.head(), down)
    assert path.read_bytes() == before
    assert seen.evidence(directory_key.did) is None


def test_a_head_signed_by_another_key_is_refused(
    directory_key: KeyHandle, pkcs11_provider: Any, key_name: str, tmp_path: Path
) -> None:
    seen = SeenHeads(tmp_path / "seen.json")
    d = Directory(directory_key, _log(_entries(3)))
    seen.accept(directory_key.did, d.head(), d.consistency)
    other = pkcs11_provider.generate(f"pkcs11:object={key_name}-o", Algorithm.ES256)
    try:
        with pytest.raises(TreeHeadError):
            seen.accept(directory_key.did, _head(other, d.log), d.consistency)
        bad = replace(d.head(), signature=bytes(64))
        with pytest.raises(TreeHeadError):
            seen.accept(directory_key.did, bad, d.consistency)
    finally:
        pkcs11_provider.delete(other.uri)
