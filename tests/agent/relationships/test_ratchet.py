"""The header-encrypted Double Ratchet: delivery under reordering, loss, duplicates and
crashes; tampering; bounds; strict state; unlinkable wire bytes."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.relationships import padding, ratchet
from agent.relationships.errors import (
    BadStateError,
    CannotSendYetError,
    DecryptError,
    DuplicateMessageError,
    MalformedMessageError,
    PlaintextTooLargeError,
    RelationshipError,
    TooManySkippedError,
    UnsupportedSuiteError,
)
from agent.relationships.ratchet import RatchetState
from agent.relationships.suite import Suite, encode_public, generate
from agent.relationships.x3dh import InitialHeader, InitialKeys


def pair(suite: Suite = Suite.X25519) -> tuple[RatchetState, RatchetState]:
    """Two sides from one X3DH result (the ratchet does not care where SK came from)."""
    spk = generate(suite)
    sk, ad = os.urandom(32), os.urandom(40)
    header = InitialHeader(suite, b"", b"", b"")
    alex = RatchetState.initiator(
        InitialKeys(sk, ad, header, suite, ratchet_public=encode_public(spk.public_key()))
    )
    blair = RatchetState.responder(InitialKeys(sk, ad, header, suite, ratchet_private=spk))
    return alex, blair


def started(suite: Suite = Suite.X25519) -> tuple[RatchetState, RatchetState]:
    alex, blair = pair(suite)
    blair, _ = blair.decrypt(alex.encrypt(b"first"))
    return alex, blair


# -- the state machine ------------------------------------------------------------------


class TwoParties(RuleBasedStateMachine):
    """Alex and Blair talk over a network that reorders, loses and duplicates messages.

    Each side's state exists only as committed bytes (what a store would hold); every
    operation loads it, and a "crash" drops whatever it computed but did not commit.
    A sender commits before a message enters the network; a receiver removes a message
    from the network (acks it) only after committing the state that decrypted it.
    """

    def __init__(self) -> None:
        super().__init__()
        alex, blair = pair()
        self.committed = {"alex": alex.to_bytes(), "blair": blair.to_bytes()}
        self.network: list[tuple[str, int, bytes]] = []  # (recipient, id, wire)
        self.sent: dict[int, bytes] = {}
        self.received: dict[int, int] = {}
        self.next_id = 0
        self.blair_can_send = False

    def load(self, who: str) -> RatchetState:
        return RatchetState.from_bytes(self.committed[who])

    @rule(sender=st.sampled_from(["alex", "blair"]), size=st.integers(0, 300))
    def send(self, sender: str, size: int) -> None:
        if sender == "blair" and not self.blair_can_send:
            with pytest.raises(CannotSendYetError):
                self.load("blair").encrypt(b"x")
            return
        state = self.load(sender)
        message_id = self.next_id
        self.next_id += 1
        plaintext = message_id.to_bytes(4, "big") + os.urandom(size)
        wire = state.encrypt(plaintext)
        self.committed[sender] = state.to_bytes()  # commit, then send
        self.sent[message_id] = plaintext
        recipient = "blair" if sender == "alex" else "alex"
        self.network.append((recipient, message_id, wire))

    @rule(sender=st.sampled_from(["alex", "blair"]))
    def crash_while_sending(self, sender: str) -> None:
        """Encrypted, crashed before the commit: nothing was sent, nothing changes."""
        if sender == "blair" and not self.blair_can_send:
            return
        self.load(sender).encrypt(b"lost in a crash")

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 10**6), crash=st.booleans(), duplicate=st.booleans())
    def deliver(self, pick: int, crash: bool, duplicate: bool) -> None:
        recipient, message_id, wire = self.network[pick % len(self.network)]
        state = self.load(recipient)
        before = state.to_bytes()
        new, plaintext = state.decrypt(wire)
        assert state.to_bytes() == before  # decrypt is pure
        assert plaintext == self.sent[message_id]
        if crash:
            return  # not committed, not acked: the message stays in the network
        self.committed[recipient] = new.to_bytes()
        self.network.remove((recipient, message_id, wire))
        self.received[message_id] = self.received.get(message_id, 0) + 1
        if recipient == "blair":
            self.blair_can_send = True
        if duplicate:  # the service delivers it again after the ack was lost
            with pytest.raises(DuplicateMessageError):
                new.decrypt(wire)

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 10**6))
    def lose(self, pick: int) -> None:
        self.network.pop(pick % len(self.network))

    @rule(who=st.sampled_from(["alex", "blair"]))
    def restart(self, who: str) -> None:
        """Serialise and load again: the state survives a restart byte for byte."""
        state = self.load(who)
        assert RatchetState.from_bytes(state.to_bytes()).to_bytes() == self.committed[who]

    @invariant()
    def every_message_is_received_at_most_once(self) -> None:
        assert all(count == 1 for count in self.received.values())


TwoParties.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_parties = TwoParties.TestCase


def test_lost_state_messages_all_arrive_after_long_reordering() -> None:
    alex, blair = started()
    wires = [alex.encrypt(bytes([i])) for i in range(50)]
    for i in reversed(range(50)):
        blair, text = blair.decrypt(wires[i])
        assert text == bytes([i])
    for wire in wires:
        with pytest.raises(DuplicateMessageError):
            blair.decrypt(wire)


def test_duplicates_of_older_chains_are_refused_as_duplicates() -> None:
    alex, blair = started()
    old = alex.encrypt(b"old chain")
    blair, _ = blair.decrypt(old)
    for _ in range(3):  # several DH ratchet steps
        alex, _ = alex.decrypt(blair.encrypt(b"ping"))
        blair, _ = blair.decrypt(alex.encrypt(b"pong"))
    with pytest.raises(DuplicateMessageError):
        blair.decrypt(old)


# -- tampering, bounds, state -----------------------------------------------------------


@pytest.mark.parametrize("suite", list(Suite))
def test_every_flipped_byte_is_a_typed_error_and_changes_no_state(suite: Suite) -> None:
    alex, blair = started(suite)
    blair, _ = blair.decrypt(alex.encrypt(b"keep the chain going"))
    wire = alex.encrypt(b"a" * 100)
    before = blair.to_bytes()
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x80
        with pytest.raises(RelationshipError) as info:
            blair.decrypt(bytes(bad))
        assert type(info.value) in (DecryptError, MalformedMessageError, UnsupportedSuiteError)
        assert blair.to_bytes() == before
    for bad_length in (b"", wire[:1], wire[:-1], wire + b"\x00"):
        with pytest.raises(MalformedMessageError):
            blair.decrypt(bad_length)
    blair, text = blair.decrypt(wire)
    assert text == b"a" * 100


def test_skipping_more_than_max_skip_is_refused_and_changes_nothing() -> None:
    alex, blair = started()
    for _ in range(ratchet.MAX_SKIP + 1):
        alex.encrypt(b"")
    wire = alex.encrypt(b"far ahead")
    before = blair.to_bytes()
    with pytest.raises(TooManySkippedError):
        blair.decrypt(wire)
    assert blair.to_bytes() == before


def test_exactly_max_skip_is_accepted() -> None:
    alex, blair = started()
    first = alex.encrypt(b"0")
    for _ in range(ratchet.MAX_SKIP - 1):
        alex.encrypt(b"")
    blair, text = blair.decrypt(alex.encrypt(b"last"))
    assert text == b"last"
    assert sum(len(k) for k in blair.skipped.values()) == ratchet.MAX_SKIP
    blair, text = blair.decrypt(first)
    assert text == b"0"


def test_the_skipped_store_is_bounded_and_drops_the_oldest_keys() -> None:
    alex, blair = started()
    oldest: list[bytes] = []
    for round_ in range(3):  # three chains of MAX_SKIP - 1 lost messages each
        lost = [alex.encrypt(b"lost") for _ in range(ratchet.MAX_SKIP - 1)]
        if round_ == 0:
            oldest = lost
        blair, _ = blair.decrypt(alex.encrypt(b"arrives"))
        alex, _ = alex.decrypt(blair.encrypt(b"reply"))
        assert sum(len(k) for k in blair.skipped.values()) <= ratchet.MAX_STORED
    with pytest.raises(DuplicateMessageError):  # its key was dropped
        blair.decrypt(oldest[0])
    restored = RatchetState.from_bytes(blair.to_bytes())
    assert restored.to_bytes() == blair.to_bytes()


def test_state_serialisation_is_strict() -> None:
    alex, blair = started()
    blair, _ = blair.decrypt(alex.encrypt(b"x"))
    alex.encrypt(b"skipped")
    blair, _ = blair.decrypt(alex.encrypt(b"y"))
    data = blair.to_bytes()
    assert RatchetState.from_bytes(data).to_bytes() == data
    for bad in (
        b"",
        data[:-1],
        data + b"\x00",
        b"XRS" + data[3:],
        data[:3] + b"\x02" + data[4:],  # unknown version
        data[:4] + b"\x09" + data[5:],  # unknown suite
        data[:5] + b"\xff" + data[6:],  # unknown flags
    ):
        with pytest.raises(BadStateError):
            RatchetState.from_bytes(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_never_state_or_a_message(data: bytes) -> None:
    with pytest.raises(BadStateError):
        RatchetState.from_bytes(b"JRS\x01" + data)
    _, blair = started()
    with pytest.raises(RelationshipError):
        blair.decrypt(data)


def test_oversized_plaintext_is_refused_before_any_state_change() -> None:
    alex, _ = started()
    before = alex.to_bytes()
    with pytest.raises(PlaintextTooLargeError):
        alex.encrypt(b"x" * (padding.MAX_PLAINTEXT + 1))
    assert alex.to_bytes() == before
    assert (
        len(alex.encrypt(b"x" * padding.MAX_PLAINTEXT))
        == 2 + ratchet.header_len(Suite.X25519) + padding.BUCKETS[-1]
    )


# -- the wire ---------------------------------------------------------------------------


def test_messages_of_one_relationship_share_no_bytes_but_the_prefix() -> None:
    """No 8-byte substring (after the global 2-byte prefix) appears in two messages,
    across both directions, many ratchet steps and one-sided runs; sizes are buckets."""
    alex, blair = started()
    wires: list[bytes] = []
    for i in range(60):
        sender_is_alex = (i // 3) % 2 == 0  # runs of three, then the other side
        if sender_is_alex:
            wire = alex.encrypt(b"same text every time")
            blair, _ = blair.decrypt(wire)
        else:
            wire = blair.encrypt(b"same text every time")
            alex, _ = alex.decrypt(wire)
        wires.append(wire)
    assert {w[:2] for w in wires} == {bytes((1, 1))}
    assert {len(w) for w in wires} == {2 + ratchet.header_len(Suite.X25519) + 256}
    seen: dict[bytes, int] = {}
    for index, wire in enumerate(wires):
        for start in range(2, len(wire) - 7):
            chunk = wire[start : start + 8]
            assert seen.setdefault(chunk, index) == index, f"messages {seen[chunk]} and {index}"


def test_headers_have_one_size_per_suite() -> None:
    for suite in Suite:
        alex, _ = started(suite)
        lengths = {len(alex.encrypt(b"x" * n)) for n in range(0, 200, 7)}
        assert lengths == {2 + ratchet.header_len(suite) + 256}


# -- differential: the KDF chains against Syndace's doubleratchet -----------------------


def test_chain_and_root_steps_agree_with_syndace_doubleratchet() -> None:
    """Syndace's KDF chain with the Signal-recommended KDFs (HMAC-SHA-256 with constants
    0x02/0x01 for message chains; HKDF-SHA-256 with the root key as salt for the root
    chain) gives the same keys as ``kdf_ck`` and ``kdf_rk`` (first 64 bytes)."""
    from doubleratchet.kdf_chain import KDFChain
    from doubleratchet.recommended import HashFunction, kdf_hkdf, kdf_separate_hmacs

    class ChainKDF(kdf_separate_hmacs.KDF):
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

    class RootKDF(kdf_hkdf.KDF):
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return ratchet.INFO_ROOT

    async def run() -> None:
        ck = os.urandom(32)
        theirs = KDFChain.create(ChainKDF, ck)
        for _ in range(20):
            ck, mk = ratchet.kdf_ck(ck)
            assert await theirs.step(b"\x02\x01", 32) == mk
        rk = os.urandom(32)
        root = KDFChain.create(RootKDF, rk)
        for _ in range(10):
            dh_output = os.urandom(32)
            rk, chain_key, _ = ratchet.kdf_rk(rk, dh_output)
            assert await root.step(dh_output, 32) == chain_key
        assert root.model.key == rk

    asyncio.run(run())
