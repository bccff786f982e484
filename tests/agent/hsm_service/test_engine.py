"""The engine against a real SoftHSM token: what it does, every refusal, the quorum,
forced audit, exact limits under concurrency, and a lost token session."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import Mechanism

from agent.hsm_service.engine import HsmEngine, OperationRequest
from agent.hsm_service.errors import AuditUnavailable, InvalidRequest, Refused, TokenUnavailable
from hardware.softhsm import SoftHSMToken
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import raw_to_der
from policies.errors import FormatError
from policies.ledger.sqlite import SqliteLedger
from tests.agent.hsm_service.conftest import PIN_ENV, Operator, sign_request

Engine = Callable[..., HsmEngine]


def entries(engine: HsmEngine) -> list[Any]:
    return list(engine._log.ledger.audit_entries())


def decisions(engine: HsmEngine) -> list[dict[str, Any]]:
    return [
        e.data for e in entries(engine) if e.kind == "decision" and e.data["event"] == "decision"
    ]


def refused(reason: str) -> Any:
    return pytest.raises(Refused, check=lambda exc: exc.reason == reason)


# --------------------------------------------------------------------------- operations


def test_sign_verifies_with_the_public_key_the_client_sees(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    engine = open_engine({"hsm-sign": {}, "hsm-ed": {}})
    alice = clients["alice-app"]
    assert [v.label for v in engine.keys(alice)] == ["hsm-ed", "hsm-sign"]
    assert engine.keys(clients["bob-app"]) == []
    view = engine.key(alice, "hsm-sign")
    assert view.state == "active" and view.quorum == 0 and "pin" not in view.uri
    signature = engine.perform(sign_request(alice, "hsm-sign", b"pay 10 EUR"))
    public = load_der_public_key(view.public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(raw_to_der(signature, 32), b"pay 10 EUR", ec.ECDSA(hashes.SHA256()))
    ed = engine.key(alice, "hsm-ed")
    ed_public = load_der_public_key(ed.public_key_der)
    assert isinstance(ed_public, ed25519.Ed25519PublicKey)
    ed_public.verify(engine.perform(sign_request(alice, "hsm-ed", b"x")), b"x")
    logged = decisions(engine)
    assert [d["outcome"] for d in logged] == ["allowed", "allowed"]
    assert logged[0]["payload_sha256"] == hashlib.sha256(b"pay 10 EUR").hexdigest()


def test_raw_mechanism_signs_a_digest_and_others_are_not_offered(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    engine = open_engine({"hsm-sign": {}})
    alice = clients["alice-app"]
    digest = hashlib.sha256(b"raw").digest()
    raw = engine.perform(sign_request(alice, "hsm-sign", digest, mechanism=int(Mechanism.ECDSA)))
    public = load_der_public_key(engine.key(alice, "hsm-sign").public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    public.verify(raw_to_der(raw, 32), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    before = len(entries(engine))
    for mechanism in (Mechanism.RSA_PKCS, Mechanism.EDDSA, Mechanism.SHA256_HMAC):
        with pytest.raises(InvalidRequest, match="not offered"):
            engine.perform(sign_request(alice, "hsm-sign", mechanism=int(mechanism)))
    # Refused before anything was decided: nothing counted, nothing audited.
    assert len(entries(engine)) == before and engine._log.uses("hsm-sign") == 1


def test_ecdh_gives_the_shared_secret(open_engine: Engine, clients: dict[str, str]) -> None:
    engine = open_engine({"hsm-x25519": {"operations": ["ecdh"]}})
    alice = clients["alice-app"]
    peer = x25519.X25519PrivateKey.generate()
    spki = peer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    shared = engine.perform(OperationRequest(alice, "ecdh", "hsm-x25519", spki))
    ours = load_der_public_key(engine.key(alice, "hsm-x25519").public_key_der)
    assert isinstance(ours, x25519.X25519PublicKey)
    assert shared == peer.exchange(ours)
    with pytest.raises(InvalidRequest, match="SubjectPublicKeyInfo"):
        engine.perform(OperationRequest(alice, "ecdh", "hsm-x25519", b"not a key"))
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_curve = p256.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InvalidRequest, match="not a X25519 key"):
        engine.perform(OperationRequest(alice, "ecdh", "hsm-x25519", other_curve))
    assert engine._log.uses("hsm-x25519") == 1


def test_generate_then_destroy_follows_the_kmip_states(
    open_engine: Engine, clients: dict[str, str], key_name: str, hsm_provider: Pkcs11Provider
) -> None:
    alice = clients["alice-app"]
    spec = {"operations": ["generate", "sign", "destroy"], "algorithm": "ES256"}
    engine = open_engine({key_name: spec})
    assert engine.key(alice, key_name).public_key_der == b""
    spki = engine.perform(OperationRequest(alice, "generate", key_name))
    assert engine.key(alice, key_name).public_key_der == spki
    with refused("key_state"):  # KMIP: an active key is deactivated before it is destroyed
        engine.perform(OperationRequest(alice, "destroy", key_name))
    assert hsm_provider.lookup(f"pkcs11:object={key_name}").label == key_name
    with pytest.raises(InvalidRequest, match="already exists"):
        engine.perform(OperationRequest(alice, "generate", key_name))
    engine.close()
    done = open_engine({key_name: {**spec, "state": "deactivated"}})
    assert done.perform(OperationRequest(alice, "destroy", key_name)) == b""
    with pytest.raises(KeyNotFoundError):
        hsm_provider.lookup(f"pkcs11:object={key_name}")
    assert done.key(alice, key_name).state == "destroyed"
    with refused("key_state"):
        done.perform(OperationRequest(alice, "generate", key_name))


# --------------------------------------------------------------------------- refusals


def test_every_policy_refusal_is_typed_and_audited(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    alice, bob = clients["alice-app"], clients["bob-app"]
    engine = open_engine(
        {
            "hsm-sign": {"max-uses": 1},
            "hsm-ed": {"state": "pre-active"},
            "hsm-ecdh": {"operations": ["ecdh"], "rate": {"count": 1, "per-seconds": 3600}},
        }
    )
    cases: list[tuple[str, OperationRequest]] = [
        ("unknown_key", sign_request(alice, "no-such-key")),
        ("client_not_allowed", sign_request(bob, "hsm-sign")),
        ("operation_not_allowed", sign_request(alice, "hsm-ecdh")),
        ("key_state", sign_request(alice, "hsm-ed")),
    ]
    for reason, request in cases:
        with refused(reason) as caught:
            engine.perform(request)
        assert caught.value.code == "hsm_refused"
    engine.perform(sign_request(alice, "hsm-sign"))
    with refused("max_uses"):
        engine.perform(sign_request(alice, "hsm-sign"))
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = peer.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    engine.perform(OperationRequest(alice, "ecdh", "hsm-ecdh", spki))
    with refused("rate_limited") as limited:
        engine.perform(OperationRequest(alice, "ecdh", "hsm-ecdh", spki))
    assert limited.value.status == 429
    logged = decisions(engine)
    reasons = [d.get("reason") for d in logged if d["outcome"] == "refused"]
    assert reasons == [
        "unknown_key",
        "client_not_allowed",
        "operation_not_allowed",
        "key_state",
        "max_uses",
        "rate_limited",
    ]
    assert engine._log.uses("hsm-sign") == 1  # refusals count nothing


def test_dated_transitions_activate_and_deactivate(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    alice = clients["alice-app"]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    engine = open_engine(
        {
            "hsm-sign": {"state": "pre-active", "activation-date": past},
            "hsm-ed": {"activation-date": past - dt.timedelta(days=2), "deactivation-date": past},
            "hsm-ecdh": {"state": "pre-active", "activation-date": future},
        }
    )
    engine.perform(sign_request(alice, "hsm-sign"))
    with refused("key_state"):
        engine.perform(sign_request(alice, "hsm-ed"))
    with refused("key_state"):
        engine.perform(sign_request(alice, "hsm-ecdh"))
    states = {e.data["key"]: e.data for e in entries(engine) if e.data.get("event") == "state"}
    assert states["hsm-sign"]["to"] == "active"
    assert states["hsm-sign"]["effective"] == int(past.timestamp())
    assert states["hsm-ed"]["to"] == "deactivated"
    assert "hsm-ecdh" not in states
    assert engine.key(alice, "hsm-ed").state == "deactivated"


def test_malformed_requests_are_refused_before_any_decision(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    engine = open_engine({"hsm-sign": {}})
    alice = clients["alice-app"]
    before = len(entries(engine))
    for request in (
        OperationRequest(alice, "export", "hsm-sign"),
        sign_request(alice, "hsm-sign", b"x" * (1 << 20 + 1)),
        sign_request(alice, "hsm-sign", nonce="\x00"),
        sign_request(alice, "hsm\nsign"),
        sign_request(alice + "\x1b", "hsm-sign"),
        sign_request("", "hsm-sign"),
    ):
        with pytest.raises(InvalidRequest):
            engine.perform(request)
    assert len(entries(engine)) == before


# --------------------------------------------------------------------------- quorum


@pytest.fixture
def quorum_engine(open_engine: Engine, clients: dict[str, str]) -> HsmEngine:
    return open_engine(
        {
            "hsm-sign": {
                "clients": [clients["alice-app"], clients["bob-app"]],
                "quorum": {"m": 2, "approvers": ["alice", "bob"]},
            },
            "hsm-ed": {
                "operations": ["sign", "destroy"],
                "quorum": {"m": 1, "approvers": ["carol"], "operations": ["destroy"]},
            },
        }
    )


def approve(
    engine: HsmEngine, request: OperationRequest, *who: Operator, expires: int | None = None
) -> OperationRequest:
    expiry = int(time.time()) + 600 if expires is None else expires
    claims = engine.approval_claims(request, expires=expiry)
    approvals = tuple(o.approve(claims) for o in who)
    return OperationRequest(
        request.client,
        request.operation,
        request.key,
        request.payload,
        request.mechanism,
        approvals,
        request.nonce,
        expiry,
    )


def test_quorum_m_of_n_signs_and_is_recorded(
    quorum_engine: HsmEngine, clients: dict[str, str], operators: dict[str, Operator]
) -> None:
    alice = clients["alice-app"]
    request = sign_request(alice, "hsm-sign", b"wire 1M", nonce="n-1")
    claims = quorum_engine.approval_claims(request, expires=2_000_000_000)
    assert claims["payload_sha256"] == hashlib.sha256(b"wire 1M").hexdigest()
    assert {claims["requester"], claims["nonce"], claims["key"]} == {alice, "n-1", "hsm-sign"}
    approved = approve(quorum_engine, request, operators["alice"], operators["bob"])
    assert len(quorum_engine.perform(approved)) == 64
    (logged,) = decisions(quorum_engine)
    assert logged["counted"] == ["alice", "bob"] and len(logged["approvals"]) == 2
    # Operations the quorum does not name need none.
    quorum_engine.perform(sign_request(alice, "hsm-ed"))


def test_quorum_refusals(
    quorum_engine: HsmEngine, clients: dict[str, str], operators: dict[str, Operator]
) -> None:
    alice = clients["alice-app"]
    a, b, c = operators["alice"], operators["bob"], operators["carol"]
    request = sign_request(alice, "hsm-sign", b"wire", nonce="n-2")
    with refused("quorum_required"):  # none at all
        quorum_engine.perform(request)
    with refused("quorum_required"):  # M-1
        quorum_engine.perform(approve(quorum_engine, request, a))
    with refused("quorum_required"):  # the same approver twice counts once
        quorum_engine.perform(approve(quorum_engine, request, a, a))
    with refused("quorum_invalid"):  # carol is not one of this key's approvers
        quorum_engine.perform(approve(quorum_engine, request, a, c))
    # Approvals for another request: another payload, nonce, requester, key.
    good = approve(quorum_engine, request, a, b)
    for other in (
        sign_request(alice, "hsm-sign", b"wire 2", nonce="n-2"),
        sign_request(alice, "hsm-sign", b"wire", nonce="n-3"),
        sign_request(clients["bob-app"], "hsm-sign", b"wire", nonce="n-2"),
    ):
        moved = OperationRequest(
            other.client,
            "sign",
            "hsm-sign",
            other.payload,
            None,
            good.approvals,
            other.nonce,
            good.expires,
        )
        with refused("quorum_invalid"):
            quorum_engine.perform(moved)
    with refused("quorum_invalid"):  # the expiry they signed is not the one claimed
        quorum_engine.perform(
            OperationRequest(
                alice, "sign", "hsm-sign", b"wire", None, good.approvals, "n-2", good.expires + 1
            )
        )
    expired = approve(quorum_engine, request, a, b, expires=int(time.time()) - 1)
    with refused("quorum_invalid"):
        quorum_engine.perform(expired)
    too_long = approve(quorum_engine, request, a, b, expires=int(time.time()) + 86_400)
    with refused("quorum_invalid"):
        quorum_engine.perform(too_long)
    quorum_engine.perform(good)
    with refused("approval_reused"):
        quorum_engine.perform(good)
    outcomes = [(d["outcome"], d.get("reason")) for d in decisions(quorum_engine)]
    assert outcomes[-2:] == [("allowed", None), ("refused", "approval_reused")]
    assert sum(o == "allowed" for o, _ in outcomes) == 1


def test_a_used_approval_stays_used_after_a_restart(
    open_engine: Engine, clients: dict[str, str], operators: dict[str, Operator], tmp_path: Path
) -> None:
    keys = {"hsm-sign": {"quorum": {"m": 1, "approvers": ["alice"]}}}
    first = open_engine(keys, state_dir=tmp_path / "state")
    good = approve(
        first, sign_request(clients["alice-app"], "hsm-sign", nonce="r"), operators["alice"]
    )
    first.perform(good)
    first.close()
    second = open_engine(keys, state_dir=tmp_path / "state")
    with refused("approval_reused"):
        second.perform(good)


# --------------------------------------------------------------------------- audit


@contextlib.contextmanager
def log_locked(engine: HsmEngine) -> Iterator[None]:
    """Another process holds the log's write lock: nothing can be appended."""
    other = sqlite3.connect(engine._log.path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_no_audit_no_operation(
    open_engine: Engine, clients: dict[str, str], key_name: str, hsm_provider: Pkcs11Provider
) -> None:
    alice = clients["alice-app"]
    engine = open_engine(
        {
            key_name: {"operations": ["generate", "sign"], "algorithm": "ES256", "max-uses": 5},
            "hsm-ed": {"operations": ["destroy"], "state": "deactivated"},
        },
        service={"audit-timeout": 0.2},
    )
    before = len(entries(engine))
    with log_locked(engine):
        with pytest.raises(AuditUnavailable):
            engine.perform(OperationRequest(alice, "generate", key_name))
        with pytest.raises(AuditUnavailable):
            engine.perform(OperationRequest(alice, "destroy", "hsm-ed"))
        with pytest.raises(AuditUnavailable):  # a refusal that cannot be recorded
            engine.perform(sign_request(alice, "no-such-key"))
    with pytest.raises(KeyNotFoundError):  # the token is untouched: nothing generated…
        hsm_provider.lookup(f"pkcs11:object={key_name}")
    assert hsm_provider.lookup("pkcs11:object=hsm-ed").label == "hsm-ed"  # …nor destroyed
    assert len(entries(engine)) == before
    # and once the log can be written again, the service works.
    engine.perform(OperationRequest(alice, "generate", key_name))
    engine.perform(sign_request(alice, key_name))
    with log_locked(engine), pytest.raises(AuditUnavailable):
        engine.perform(sign_request(alice, key_name))
    assert engine._log.uses(key_name) == 1  # the unaudited signature was neither made nor counted


def test_concurrent_clients_get_exactly_max_uses(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    engine = open_engine({"hsm-sign": {"max-uses": 7}})
    alice = clients["alice-app"]
    signatures: list[bytes] = []
    reasons: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client() -> None:
        start.wait()
        for _ in range(3):
            try:
                sig = engine.perform(sign_request(alice, "hsm-sign"))
            except Refused as exc:
                with lock:
                    reasons.append(exc.reason)
            else:
                with lock:
                    signatures.append(sig)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(signatures) == 7
    assert reasons == ["max_uses"] * 17
    assert [d["outcome"] for d in decisions(engine)].count("allowed") == 7
    assert engine._log.ledger.verify_audit() == len(entries(engine))


@contextlib.contextmanager
def commit_held(engine: HsmEngine) -> Iterator[threading.Event]:
    """Another write of this process is being committed, slowly, until the event is
    set: the decisions that come in meanwhile queue behind it."""
    release, held = threading.Event(), threading.Event()

    def hold(_c: sqlite3.Connection) -> None:
        held.set()
        release.wait(10)

    blocker = threading.Thread(target=engine._log.ledger.transaction, args=(hold,))
    blocker.start()
    try:
        assert held.wait(10)
        yield release
    finally:
        release.set()
        blocker.join()


def perform_at_once(
    engine: HsmEngine, requests: list[OperationRequest]
) -> tuple[list[bytes | str], int]:
    """Run ``requests`` from one thread each while a commit is held: the first one's
    decision is committed behind it, the others all wait for the next group.  Returns
    the results in completion order (a signature or a refusal's reason) and the
    number of commits made after the release."""
    results: list[bytes | str] = []
    lock = threading.Lock()
    log = engine._log

    def client(request: OperationRequest) -> None:
        try:
            result: bytes | str = engine.perform(request)
        except Refused as exc:
            result = exc.reason
        with lock:
            results.append(result)

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert condition()

    threads = [threading.Thread(target=client, args=(r,)) for r in requests]
    with commit_held(engine) as release:
        threads[0].start()
        until(lambda: log._leading and not log._queue)  # its group is being committed
        for t in threads[1:]:
            t.start()
        until(lambda: len(log._queue) == len(requests) - 1)
        commits = log.ledger.commits
        release.set()
        for t in threads:
            t.join()
    return results, log.ledger.commits - commits


def test_decisions_pending_together_share_one_commit(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    """Group commit: the decisions that queue while a transaction is being committed
    are decided (in order, exactly: max-uses 4 of 6) and committed together."""
    engine = open_engine({"hsm-sign": {"max-uses": 4}})
    alice = clients["alice-app"]
    # One decision is being committed (behind the held write); five wait for it.
    requests = [sign_request(alice, "hsm-sign") for _ in range(6)]
    results, commits = perform_at_once(engine, requests)
    assert commits == 3  # the held write, the first decision, the five together
    assert sorted(r for r in results if isinstance(r, str)) == ["max_uses"] * 2
    assert sum(isinstance(r, bytes) for r in results) == 4
    assert engine._log.uses("hsm-sign") == 4
    outcomes = [d["outcome"] for d in decisions(engine)]
    assert outcomes == ["allowed"] * 4 + ["refused"] * 2  # in order of arrival
    assert engine._log.ledger.verify_audit() == len(entries(engine))


def test_approvals_used_twice_in_one_group_count_once(
    quorum_engine: HsmEngine, clients: dict[str, str], operators: dict[str, Operator]
) -> None:
    request = sign_request(clients["alice-app"], "hsm-sign", b"wire", nonce="n-g")
    approved = approve(quorum_engine, request, operators["alice"], operators["bob"])
    results, _ = perform_at_once(quorum_engine, [approved] * 3)
    assert sorted(r for r in results if isinstance(r, str)) == ["approval_reused"] * 2
    assert sum(isinstance(r, bytes) for r in results) == 1


def test_a_failed_group_commit_fails_every_decision_in_it(
    open_engine: Engine, clients: dict[str, str]
) -> None:
    engine = open_engine({"hsm-sign": {"max-uses": 9}}, service={"audit-timeout": 0.2})
    alice = clients["alice-app"]
    before = len(entries(engine))
    errors: list[Exception] = []

    def client() -> None:
        try:
            engine.perform(sign_request(alice, "hsm-sign"))
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    with log_locked(engine):
        threads = [threading.Thread(target=client) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(errors) == 5 and all(isinstance(e, AuditUnavailable) for e in errors)
    assert engine._log.uses("hsm-sign") == 0 and len(entries(engine)) == before
    engine.perform(sign_request(alice, "hsm-sign"))  # and the log works again after
    assert engine._log.uses("hsm-sign") == 1


@pytest.mark.parametrize(("setting", "pragma"), [(None, 2), ("full", 2), ("os", 1)])
def test_audit_sync_sets_how_far_a_decision_is_written(
    open_engine: Engine, clients: dict[str, str], setting: str | None, pragma: int
) -> None:
    """full (the default): every commit fsynced (SQLite synchronous=FULL); os: written
    to the OS only (synchronous=NORMAL in WAL mode), an explicit opt-in."""
    service = {} if setting is None else {"audit-sync": setting}
    engine = open_engine({"hsm-sign": {}}, service=service)
    writer = engine._log.ledger._writer
    assert writer.execute("PRAGMA synchronous").fetchone()[0] == pragma
    (start,) = [e.data for e in entries(engine) if e.data["event"] == "start"]
    assert start["audit_sync"] == (setting or "full")  # the log says how it was written
    engine.perform(sign_request(clients["alice-app"], "hsm-sign"))
    assert [d["outcome"] for d in decisions(engine)] == ["allowed"]


def test_the_ledger_takes_only_the_two_sync_modes(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="sync must be"):
        SqliteLedger(tmp_path / "l.db", sync="normal")  # type: ignore[arg-type]
    assert not (tmp_path / "l.db").exists()  # refused before anything was created


# --------------------------------------------------------------------------- tokens


def _drop_session(provider: Pkcs11Provider) -> None:
    ts = provider.token_session
    with ts.module.lock:
        if ts._session is not None:
            ts._session.close()  # the token dropped every session (HSM idle timeout…)


def test_a_lost_session_is_reopened_and_the_request_served(
    open_engine: Engine, clients: dict[str, str], hsm_provider: Pkcs11Provider
) -> None:
    engine = open_engine({"hsm-sign": {}})
    alice = clients["alice-app"]
    engine.perform(sign_request(alice, "hsm-sign"))
    _drop_session(hsm_provider)
    assert len(engine.perform(sign_request(alice, "hsm-sign"))) == 64


def test_a_token_that_cannot_be_reopened_is_token_unavailable_quickly(
    open_engine: Engine,
    clients: dict[str, str],
    hsm_provider: Pkcs11Provider,
    hsm_token: SoftHSMToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = open_engine({"hsm-sign": {}})
    alice = clients["alice-app"]
    engine.perform(sign_request(alice, "hsm-sign"))
    hidden = hsm_token.pin_file.with_suffix(".hidden")
    monkeypatch.delenv(PIN_ENV)
    hsm_token.pin_file.rename(hidden)  # no PIN can be read: logging in again fails
    try:
        _drop_session(hsm_provider)
        started = time.monotonic()
        with pytest.raises(TokenUnavailable):
            engine.perform(sign_request(alice, "hsm-sign"))
        assert time.monotonic() - started < 10
    finally:
        hidden.rename(hsm_token.pin_file)
    results = [e.data for e in entries(engine) if e.data.get("event") == "result"]
    assert results[-1]["outcome"] == "failed"  # the allowed decision, then its failure


def test_the_service_log_is_a_janus_ledger(open_engine: Engine, clients: dict[str, str]) -> None:
    engine = open_engine({"hsm-sign": {}})
    engine.perform(sign_request(clients["alice-app"], "hsm-sign"))
    ledger = SqliteLedger(engine._log.path, create=False)
    try:
        assert ledger.verify_audit() == len(entries(engine))
    finally:
        ledger.close()
