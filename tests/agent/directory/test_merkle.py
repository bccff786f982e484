"""RFC 9162 §2.1 trees and proofs: by hand for small trees, against the RFC's recursive
definitions (written naively here as the oracle) up to 64 leaves, against pymerkle's
roots, and for random sizes with hypothesis; every tampered proof is refused."""

from __future__ import annotations

import hashlib

import pymerkle  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.directory.errors import ProofError
from agent.directory.merkle import (
    EMPTY_ROOT,
    MemoryNodeStore,
    MerkleLog,
    audit_path,
    consistency_proof,
    hashes_from_json,
    hashes_to_json,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def L(i: int) -> bytes:
    return H(b"\x00" + DATA[i])


def N(a: bytes, b: bytes) -> bytes:
    return H(b"\x01" + a + b)


DATA = [f"entry {i}".encode() for i in range(200)]


# --- the oracle: RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1 on slices, as literally as possible


def mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return H(b"")
    if n == 1:
        return H(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return H(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def proof(m: int, d: list[bytes]) -> list[bytes]:
    return subproof(m, d, True)


def hashes(n: int) -> list[bytes]:
    return [leaf_hash(x) for x in DATA[:n]]


# --- by hand


def test_hashing_is_rfc_9162() -> None:
    assert leaf_hash(b"abc") == H(b"\x00abc")
    assert node_hash(b"l" * 32, b"r" * 32) == H(b"\x01" + b"l" * 32 + b"r" * 32)
    assert root_from_leaf_hashes([]) == EMPTY_ROOT == H(b"")
    # The well-known empty-tree root of RFC 6962/9162 logs.
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_roots_of_trees_of_one_to_eight_leaves_by_hand() -> None:
    h01, h23, h45, h67 = N(L(0), L(1)), N(L(2), L(3)), N(L(4), L(5)), N(L(6), L(7))
    expected = {
        1: L(0),
        2: h01,
        3: N(h01, L(2)),
        4: N(h01, h23),
        5: N(N(h01, h23), L(4)),
        6: N(N(h01, h23), h45),
        7: N(N(h01, h23), N(h45, L(6))),
        8: N(N(h01, h23), N(h45, h67)),
    }
    for n, root in expected.items():
        assert root_from_leaf_hashes(hashes(n)) == root, n
        log = MerkleLog(MemoryNodeStore())
        for x in DATA[:n]:
            log.append(x)
        assert log.root() == root


# RFC 9162 §2.1.5's example tree of seven leaves: a..f and j are leaf hashes.
a, b, c, d, e, f, j = (L(i) for i in range(7))
g, h, i_ = N(a, b), N(c, d), N(e, f)
k, l_ = N(g, h), N(i_, j)


@pytest.mark.parametrize(
    ("index", "expected"),
    [(0, [b, h, l_]), (3, [c, g, l_]), (4, [f, j, k]), (6, [i_, k])],
)
def test_audit_paths_of_the_rfc_example(index: int, expected: list[bytes]) -> None:
    assert audit_path(index, hashes(7)) == expected
    log = MerkleLog(MemoryNodeStore())
    for x in DATA[:7]:
        log.append(x)
    assert log.inclusion(index, 7) == expected
    verify_inclusion(DATA[index], index, 7, expected, N(k, l_))


@pytest.mark.parametrize(("m", "expected"), [(3, [c, d, g, l_]), (4, [l_]), (6, [i_, j, k])])
def test_consistency_proofs_of_the_rfc_example(m: int, expected: list[bytes]) -> None:
    assert consistency_proof(m, hashes(7)) == expected
    log = MerkleLog(MemoryNodeStore())
    for x in DATA[:7]:
        log.append(x)
    assert log.consistency(m, 7) == expected
    verify_consistency(m, 7, root_from_leaf_hashes(hashes(m)), N(k, l_), expected)


# --- against the oracle


def test_every_proof_up_to_64_leaves_matches_the_rfc_definitions() -> None:
    log = MerkleLog(MemoryNodeStore())
    for n in range(1, 65):
        log.append(DATA[n - 1])
        d = DATA[:n]
        root = mth(d)
        assert log.root(n) == root_from_leaf_hashes(hashes(n)) == root
        for m in range(n):
            expected = path(m, d)
            assert log.inclusion(m, n) == audit_path(m, hashes(n)) == expected
            verify_inclusion(DATA[m], m, n, expected, root)
        for m in range(1, n):
            expected = proof(m, d)
            assert log.consistency(m, n) == consistency_proof(m, hashes(n)) == expected
            verify_consistency(m, n, mth(d[:m]), root, expected)


def test_roots_agree_with_pymerkle() -> None:
    peer = pymerkle.InmemoryTree(algorithm="sha256")
    log = MerkleLog(MemoryNodeStore())
    for n in range(1, 130):
        peer.append_entry(DATA[n - 1])
        log.append(DATA[n - 1])
        assert peer.get_root() == log.root()
    for n in (1, 5, 64, 100, 129):
        assert peer.get_root(n) == log.root(n)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.data())
def test_random_sizes(n: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, n - 1))
    m = data.draw(st.integers(1, n))
    d = DATA[:n]
    verify_inclusion(d[index], index, n, audit_path(index, hashes(n)), mth(d))
    verify_consistency(m, n, mth(d[:m]), mth(d), consistency_proof(m, hashes(n)))
    assert audit_path(index, hashes(n)) == path(index, d)
    assert consistency_proof(m, hashes(n)) == (proof(m, d) if m < n else [])


# --- refusals


def _flip(value: bytes, bit: int = 0) -> bytes:
    return bytes([value[0] ^ (1 << bit)]) + value[1:]


def test_every_tampered_inclusion_proof_is_refused() -> None:
    for n in range(1, 20):
        d = DATA[:n]
        root = mth(d)
        for m in range(n):
            good = path(m, d)
            for pos in range(len(good)):
                bad = list(good)
                bad[pos] = _flip(bad[pos])
                with pytest.raises(ProofError):
                    verify_inclusion(d[m], m, n, bad, root)
            if good:
                with pytest.raises(ProofError):  # a hash left out
                    verify_inclusion(d[m], m, n, good[:-1], root)
            with pytest.raises(ProofError):  # one too many
                verify_inclusion(d[m], m, n, [*good, root], root)
            with pytest.raises(ProofError):  # another leaf
                verify_inclusion(b"not in the log", m, n, good, root)
            with pytest.raises(ProofError):  # another root
                verify_inclusion(d[m], m, n, good, _flip(root))
            for other in range(n + 2):  # another index
                if other != m:
                    with pytest.raises(ProofError):
                        verify_inclusion(d[m], other, n, good, root)
            for size in range(1, n + 3):  # another tree of the same log
                if size != n and m < size:
                    with pytest.raises(ProofError):
                        verify_inclusion(d[m], m, size, good, mth(DATA[:size]))


def test_every_tampered_consistency_proof_is_refused() -> None:
    for n in range(2, 20):
        d = DATA[:n]
        second = mth(d)
        for m in range(1, n):
            first = mth(d[:m])
            good = proof(m, d)
            for pos in range(len(good)):
                bad = list(good)
                bad[pos] = _flip(bad[pos], 7)
                with pytest.raises(ProofError):
                    verify_consistency(m, n, first, second, bad)
            with pytest.raises(ProofError):
                verify_consistency(m, n, first, second, good[:-1])
            with pytest.raises(ProofError):
                verify_consistency(m, n, first, second, [*good, second])
            with pytest.raises(ProofError):
                verify_consistency(m, n, _flip(first), second, good)
            with pytest.raises(ProofError):
                verify_consistency(m, n, first, _flip(second), good)
            # The same first tree against a forked second one (one entry rewritten).
            forked = [*d[: m - 1], b"rewritten", *d[m:]]
            with pytest.raises(ProofError):
                verify_consistency(m, n, first, mth(forked), proof(m, forked))
            for other in range(1, n + 2):
                if other not in (m, n) and other < n:
                    with pytest.raises(ProofError):
                        verify_consistency(other, n, first, second, good)


def test_degenerate_sizes() -> None:
    root = mth(DATA[:5])
    verify_consistency(5, 5, root, root, [])
    verify_consistency(0, 5, EMPTY_ROOT, root, [])
    with pytest.raises(ProofError):
        verify_consistency(5, 5, root, _flip(root), [])
    with pytest.raises(ProofError):
        verify_consistency(5, 5, root, root, [root])
    with pytest.raises(ProofError):
        verify_consistency(6, 5, root, root, [root])
    with pytest.raises(ProofError):
        verify_consistency(3, 5, mth(DATA[:3]), root, [])
    with pytest.raises(ProofError):
        verify_inclusion(DATA[0], 0, 0, [], EMPTY_ROOT)
    with pytest.raises(ProofError):
        verify_inclusion(DATA[0], -1, 5, [], root)
    with pytest.raises(ProofError):
        verify_inclusion(DATA[0], 0, 5, [b"short"], root)
    with pytest.raises(ProofError):
        verify_inclusion(DATA[0], 0, 2**70, [], root)
    with pytest.raises(ProofError):
        verify_consistency(True, 5, root, root, [])
    with pytest.raises(ProofError):
        audit_path(5, hashes(5))
    with pytest.raises(ProofError):
        consistency_proof(6, hashes(5))


def test_log_refuses_sizes_it_does_not_have() -> None:
    log = MerkleLog(MemoryNodeStore())
    for x in DATA[:4]:
        log.append(x)
    assert log.root(0) == EMPTY_ROOT
    assert log.consistency(0, 4) == log.consistency(4, 4) == []
    assert log.leaves(1, 3) == DATA[1:3]
    assert log.leaf(3) == DATA[3]
    for call in (
        lambda: log.root(5),
        lambda: log.inclusion(4, 4),
        lambda: log.inclusion(0, 5),
        lambda: log.consistency(3, 5),
        lambda: log.consistency(4, 3),
    ):
        with pytest.raises(ProofError):
            call()


def test_proof_json_form_is_strict() -> None:
    good = audit_path(2, hashes(7))
    assert hashes_from_json(hashes_to_json(good), "p") == good
    for bad in (
        "not a list",
        [1],
        ["AAAA"],  # 3 bytes, not a hash
        [hashes_to_json(good)[0].rstrip("=")],  # not canonical (padding gone)
        [hashes_to_json(good)[0].replace("+", "-")[:-1] + "!"],
        [hashes_to_json(good)[0]] * 65,
    ):
        with pytest.raises(ProofError):
            hashes_from_json(bad, "p")
