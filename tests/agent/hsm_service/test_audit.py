"""The service's audit log, checked offline by `janus audit verify`: the chain, the
approvals (WebAuthn assertions verified again) and the signed heads."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.hsm_service.config import load_config
from agent.hsm_service.engine import HsmEngine, policy_change_request
from agent.hsm_service.errors import Refused
from agent.hsm_service.verify import verify_service_entries
from janus_hsm.strictjson import canonical_text
from policies.errors import AuditError
from policies.ledger._common import audit_prefix, entry_hash
from policies.ledger.sqlite import SqliteLedger
from tests.agent.hsm_service.conftest import ConfigWriter, Operator, sign_request
from tests.agent.hsm_service.test_engine import approve

ROOT = Path(__file__).resolve().parents[3]
ADMIN_QUORUM = {"policy-changes": {"quorum": {"m": 2, "approvers": ["alice", "bob"]}}}


def janus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
def history(
    open_engine: Callable[..., HsmEngine],
    clients: dict[str, str],
    operators: dict[str, Operator],
) -> tuple[Path, str]:
    """A log with a quorum signature, a refusal, an approved policy change and a signed
    head; returns the log's path and the head key's did:key."""
    engine = open_engine(
        {"hsm-sign": {"quorum": {"m": 2, "approvers": ["alice", "bob"]}}, "hsm-ed": {}},
        extra=ADMIN_QUORUM,
    )
    alice = clients["alice-app"]
    request = sign_request(alice, "hsm-sign", b"approved payment", nonce="a-1")
    engine.perform(approve(engine, request, operators["alice"], operators["bob"]))
    with pytest.raises(Refused):
        engine.perform(sign_request(clients["bob-app"], "hsm-ed"))
    change = {"action": "add-client", "key": "hsm-ed", "client": clients["bob-app"]}
    expires = int(time.time()) + 300
    claims = engine.approval_claims(
        policy_change_request(change, requester=alice, nonce="p-1", expires=expires),
        expires=expires,
    )
    approvals = [operators["alice"].approve(claims), operators["bob"].approve(claims)]
    engine.change_policy(change, approvals, requester=alice, nonce="p-1", expires=expires)
    engine.perform(sign_request(clients["bob-app"], "hsm-ed"))
    head = engine.sign_audit_head()
    engine.perform(sign_request(alice, "hsm-ed"))  # after the head: the unsigned tail
    path = engine._log.path
    engine.close()
    return path, str(head["key"])


def test_janus_audit_verify_checks_approvals_and_heads(history: tuple[Path, str]) -> None:
    path, head_key = history
    done = janus("audit", "verify", "--ledger", str(path), "--head-key", head_key, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    service = result["service"]
    assert result["valid"] is True
    assert service["approvals_verified"] == 2  # the quorum signature and the change
    assert service["decisions"] == 4 and service["refusals"] == 1
    assert service["signed_heads"] == 1 and service["head_key"] == head_key
    assert service["unsigned_tail"] == 2  # the head's own entry and the last decision
    text = janus("audit", "verify", "--ledger", str(path))
    assert "2 quorum approvals re-verified, 1 signed heads" in text.stdout


def test_a_damaged_row_is_found(history: tuple[Path, str]) -> None:
    path, _ = history
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "UPDATE janus_audit SET data = replace(data, 'refused', 'allowed')"
            " WHERE kind = 'decision' AND data LIKE '%\"refused\"%'"
        )
    done = janus("audit", "verify", "--ledger", str(path), "--json")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "hash mismatch" in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "audit_broken" and error["entry"] == 3


def test_another_head_key_is_refused(history: tuple[Path, str], clients: dict[str, str]) -> None:
    path, _ = history
    done = janus("audit", "verify", "--ledger", str(path), "--head-key", clients["admin"])
    assert done.returncode == 1 and "not by" in done.stderr


# ------------------------------------------------------- rewritten logs (chain recomputed)


def rewrite(path: Path, edit: Callable[[int, str, dict[str, Any]], dict[str, Any] | None]) -> None:
    """Edit entries' data and recompute every hash after them, as someone with write
    access to the file could: the chain verifies again."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        rows = db.execute(
            "SELECT seq, at, kind, cap_id, data FROM janus_audit ORDER BY seq"
        ).fetchall()
        prev = "0" * 64
        for seq, at, kind, cap_id, text in rows:
            changed = edit(seq, kind, json.loads(text))
            if changed is not None:
                text = canonical_text(changed)
            digest = entry_hash(audit_prefix(at, kind, cap_id, text), prev, seq)
            db.execute(
                "UPDATE janus_audit SET data = ?, prev = ?, hash = ? WHERE seq = ?",
                (text, prev, digest, seq),
            )
            prev = digest
        db.execute("UPDATE janus_meta SET value = ? WHERE key = 'audit_head'", (f"{seq}:{prev}",))


def service_check(path: Path, head_key: str | None = None) -> None:
    ledger = SqliteLedger(path, create=False)
    try:
        ledger.verify_audit()  # the chain itself is fine again
        verify_service_entries(ledger.audit_entries(), head_key=head_key)
    finally:
        ledger.close()


def _edit_decision(
    field: str, value: Any
) -> Callable[[int, str, dict[str, Any]], dict[str, Any] | None]:
    def edit(seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        if data.get("event") == "decision" and data.get("claims"):
            return {**data, field: value}
        return None

    return edit


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_edit_decision("payload_sha256", "00" * 32), "claims' payload_sha256"),
        (_edit_decision("approvals", []), "do not verify"),
        (
            _edit_decision("client", "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"),
            "requester",
        ),
    ],
    ids=["other-payload", "approvals-removed", "other-requester"],
)
def test_a_forged_approved_decision_is_found(
    history: tuple[Path, str], edit: Callable[..., Any], words: str
) -> None:
    path, _ = history
    rewrite(path, edit)
    with pytest.raises(AuditError, match=words):
        service_check(path)


def test_claims_forged_to_match_fail_the_assertions(history: tuple[Path, str]) -> None:
    path, _ = history

    def edit(seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        if data.get("event") == "decision" and data.get("claims"):
            claims = {**data["claims"], "payload_sha256": "11" * 32}
            return {**data, "payload_sha256": "11" * 32, "claims": claims}
        return None

    rewrite(path, edit)
    with pytest.raises(AuditError, match="the approvals do not verify"):
        service_check(path)


def test_an_allowed_quorum_decision_without_approvals_is_found(history: tuple[Path, str]) -> None:
    path, _ = history

    def edit(seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        if data.get("event") == "decision" and data.get("claims"):
            return {k: v for k, v in data.items() if k not in ("claims", "approvals")}
        return None

    rewrite(path, edit)
    with pytest.raises(AuditError, match="without approvals"):
        service_check(path)


def test_an_entry_rewritten_before_a_signed_head_breaks_the_head(history: tuple[Path, str]) -> None:
    path, head_key = history

    def edit(seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        if data.get("outcome") == "refused":
            return {**data, "client": "someone else"}
        return None

    rewrite(path, edit)
    with pytest.raises(AuditError, match="signed head is not that of entry"):
        service_check(path, head_key)
    done = janus("audit", "verify", "--ledger", str(path), "--head-key", head_key)
    assert done.returncode == 1 and "signed head" in done.stderr


def test_heads_are_signed_periodically(write_config: ConfigWriter, clients: dict[str, str]) -> None:
    config = load_config(write_config({"hsm-sign": {}}, service={"audit-head-interval": 1}))
    with HsmEngine.open(config) as engine:
        engine.perform(sign_request(clients["alice-app"], "hsm-sign"))
        deadline = time.monotonic() + 10
        heads: list[Any] = []
        while not heads and time.monotonic() < deadline:
            time.sleep(0.2)
            heads = [e for e in engine._log.ledger.audit_entries() if e.kind == "head"]
        assert heads, "no head was signed"
        assert heads[0].data["seq"] == heads[0].seq - 1
        report = verify_service_entries(engine._log.ledger.audit_entries())
        assert report.heads >= 1
        engine.perform(sign_request(clients["alice-app"], "hsm-sign"))
        path = engine._log.path
    # Stopping signs a last head: the stopped service's log is covered to its end.
    ledger = SqliteLedger(path, create=False)
    try:
        last = list(ledger.audit_entries())[-1]
        assert last.kind == "head" and last.data["seq"] == last.seq - 1
    finally:
        ledger.close()
