"""The vault: sealed under a storage key only the token's agreement key unwraps."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.relationships.vault import Vault, VaultCorruptError, VaultError, VaultLockedError
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle, KeyProperties
from janus_hsm.public_keys import PublicKey


class CountingHandle(KeyHandle):
    """A real token key whose ECDH operations are counted (delegates everything)."""

    def __init__(self, inner: KeyHandle) -> None:
        self.inner = inner
        self.exchanges = 0

    @property
    def uri(self) -> str:
        return self.inner.uri

    @property
    def properties(self) -> KeyProperties:
        return self.inner.properties

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        self.exchanges += 1
        return self.inner.exchange(peer_public_key)


@pytest.fixture
def agreement(pkcs11_provider: Any, key_name: str) -> CountingHandle:
    uri = f"pkcs11:token=janus-test;object={key_name}-agree"
    try:
        handle = pkcs11_provider.find(uri)
    except Exception:
        handle = pkcs11_provider.generate(uri, Algorithm.X25519)
    return CountingHandle(handle)


def test_records_round_trip_with_one_token_ecdh_per_open(
    agreement: CountingHandle, tmp_path: Path
) -> None:
    vault = Vault.open(tmp_path / "v", agreement)
    with vault.transaction() as tx:
        tx.put("relationship", "r1", b"secret ratchet state")
        seq = tx.add_message("r1", b'{"text": "a private note"}')
        tx.mark_seen(b"ciphertext")
    for _ in range(20):
        assert vault.get("relationship", "r1") == b"secret ratchet state"
    vault.close()
    assert agreement.exchanges == 1
    again = Vault.open(tmp_path / "v", agreement)
    assert agreement.exchanges == 2
    assert [m.data for m in again.messages("r1")] == [b'{"text": "a private note"}']
    assert again.messages()[0].seq == seq
    assert again.seen(b"ciphertext") and not again.seen(b"other")
    again.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "v").iterdir())
    assert b"secret ratchet state" not in raw and b"private note" not in raw
    assert b"ciphertext" not in raw
    assert (tmp_path / "v" / "vault.db").stat().st_mode & 0o777 == 0o600


def test_another_key_cannot_open_it(
    agreement: CountingHandle, pkcs11_provider: Any, key_name: str, tmp_path: Path
) -> None:
    Vault.open(tmp_path / "v", agreement).close()
    other_uri = f"pkcs11:token=janus-test;object={key_name}-other"
    try:
        other = pkcs11_provider.find(other_uri)
    except Exception:
        other = pkcs11_provider.generate(other_uri, Algorithm.X25519)
    with pytest.raises(VaultLockedError):
        Vault.open(tmp_path / "v", other)


def test_a_changed_or_moved_record_is_refused(agreement: CountingHandle, tmp_path: Path) -> None:
    vault = Vault.open(tmp_path / "v", agreement)
    with vault.transaction() as tx:
        tx.put("relationship", "a", b"state of a")
        tx.put("relationship", "b", b"state of b")
    vault.close()
    with sqlite3.connect(tmp_path / "v" / "vault.db") as db:
        (blob,) = db.execute("SELECT blob FROM records WHERE id = 'a'").fetchone()
        db.execute("UPDATE records SET blob = ? WHERE id = 'b'", (blob,))
    vault = Vault.open(tmp_path / "v", agreement)
    assert vault.get("relationship", "a") == b"state of a"
    with pytest.raises(VaultCorruptError):
        vault.get("relationship", "b")
    vault.close()


def test_a_failed_transaction_writes_nothing(agreement: CountingHandle, tmp_path: Path) -> None:
    vault = Vault.open(tmp_path / "v", agreement)
    with pytest.raises(RuntimeError), vault.transaction() as tx:
        tx.put("relationship", "r", b"half")
        tx.add_message("r", b"m")
        raise RuntimeError("crash in the middle")
    assert vault.get("relationship", "r") is None and vault.messages() == []
    with pytest.raises(VaultError), vault.transaction(), vault.transaction():
        pass
    vault.close()


def test_not_a_vault_is_a_typed_error(agreement: CountingHandle, tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "vault.db").write_bytes(b"this is no database at all" * 100)
    with pytest.raises(VaultCorruptError):
        Vault.open(tmp_path / "v", agreement)
