"""Relationship state and received plaintext at rest, under a key only the token can unlock.

Why not a key in a file: whoever copies the state directory would read every
conversation.  Why not the token per record: a token ECDH per message is what the
relationship layer promises never to do.  So the vault has one random 256-bit storage
key, kept only *wrapped*: a software key pair of the agreement key's curve is made once,
its public half stored and its private half thrown away; ECDH between the agreement
key (in the token) and that public key, through HKDF, gives the key that wraps the
storage key (AES-256-GCM).  Opening the vault costs exactly one token ECDH per process;
every record after that is sealed and opened in software with the storage key.

The store is one SQLite file (mode 0600, WAL, ``synchronous=FULL``): a received
message's new ratchet state, its encrypted plaintext and the keyed hash of its
ciphertext are committed in one transaction, before the receiving service is told to
drop it.  A process killed at any instant leaves either all three or none, so a
message is never lost (not yet acknowledged: picked up again), never taken twice (its
hash is known: acknowledged, not decrypted again), and the ratchet never moves without
the message that moved it.

Every record is sealed with AES-256-GCM under the storage key with its table and row
id as associated data, so rows cannot be swapped or moved between tables unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.relationships.errors import RelationshipError
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle

VAULT_FILE = "vault.db"
SCHEMA_VERSION = b"1"
_WRAP_INFO = b"janus relationship vault v1 key wrap"
_NONCE = 12

#: The environment variable that makes a process kill itself (SIGKILL) at a named step,
#: so tests can check what a crash at that exact point leaves behind.
CRASH_ENV = "JANUS_REL_CRASH_AT"


class VaultError(RelationshipError):
    """The vault cannot be opened or read: missing, damaged, or not this token's."""

    code = "vault_error"
    status = 500


class VaultLockedError(VaultError):
    """The storage key does not unwrap with this agreement key: another token's vault."""

    code = "vault_locked"
    status = 403


class VaultCorruptError(VaultError):
    """A record does not authenticate under the storage key: changed or moved on disk."""

    code = "vault_corrupt"


def crash_point(step: str) -> None:
    """Die at once, as ``kill -9`` would, if the environment names this step."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    relationship: str
    data: bytes
    received_at: int


def _software_pair(
    algorithm: Algorithm,
) -> tuple[bytes, x25519.X25519PublicKey | ec.EllipticCurvePublicKey]:
    """A throwaway key pair on the agreement key's curve: only its public half is kept."""
    if algorithm is Algorithm.X25519:
        x_private = x25519.X25519PrivateKey.generate()
        public_x = x_private.public_key()
        return public_x.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ), public_x
    if algorithm is Algorithm.ES256:
        e_private = ec.generate_private_key(ec.SECP256R1())
        public_e = e_private.public_key()
        return public_e.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ), public_e
    raise VaultError(f"a {algorithm.value} key cannot unlock a vault (X25519 or P-256 ECDH)")


def _load_public(
    algorithm: Algorithm, raw: bytes
) -> x25519.X25519PublicKey | ec.EllipticCurvePublicKey:
    try:
        if algorithm is Algorithm.X25519:
            return x25519.X25519PublicKey.from_public_bytes(raw)
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise VaultCorruptError("the vault's wrapping key is damaged") from None


def _kek(
    agreement: KeyHandle, public: x25519.X25519PublicKey | ec.EllipticCurvePublicKey, salt: bytes
) -> bytes:
    shared = agreement.exchange(public)  # the one token operation of a process
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=salt,
        info=_WRAP_INFO + b"|" + agreement.did.encode(),
    ).derive(shared)


class Vault:
    """The open vault of one edge agent's relationships (see the module's docstring)."""

    def __init__(self, path: Path, storage_key: bytes, db: sqlite3.Connection) -> None:
        self.path = path
        self._aead = AESGCM(storage_key)
        self._hash_key = hashlib.sha256(b"janus vault seen|" + storage_key).digest()
        self._storage_key = storage_key
        self._db = db
        self._in_transaction = False

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, agreement: KeyHandle) -> Vault:
        """Open (creating on first use) the vault in ``directory`` with the token's key."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / VAULT_FILE
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.chmod(path, 0o600)
        try:
            db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise VaultCorruptError(f"{path} is not a relationship vault: {exc}") from None
        try:
            key = cls._unlock(db, agreement)
        except BaseException:
            db.close()
            raise
        return cls(path, key, db)

    @staticmethod
    def _unlock(db: sqlite3.Connection, agreement: KeyHandle) -> bytes:
        algorithm = agreement.algorithm
        db.execute("BEGIN IMMEDIATE")
        try:
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
            if "wrapped" not in meta:
                raw, public = _software_pair(algorithm)
                salt = os.urandom(32)
                storage_key = AESGCM.generate_key(256)
                nonce = os.urandom(_NONCE)
                aad = b"janus-vault-key|" + agreement.did.encode()
                wrapped = nonce + AESGCM(_kek(agreement, public, salt)).encrypt(
                    nonce, storage_key, aad
                )
                for name, value in (
                    ("version", SCHEMA_VERSION),
                    ("algorithm", algorithm.value.encode()),
                    ("public", raw),
                    ("salt", salt),
                    ("wrapped", wrapped),
                    ("owner", agreement.did.encode()),
                ):
                    db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (name, value))
                db.execute("COMMIT")
                return storage_key
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        if bytes(meta.get("version", b"")) != SCHEMA_VERSION:
            raise VaultCorruptError("the vault is of an unknown version")
        if bytes(meta["algorithm"]).decode() != algorithm.value:
            raise VaultLockedError(
                "this vault was made for another agreement key: open it with the token "
                "it was made with"
            )
        public = _load_public(algorithm, bytes(meta["public"]))
        wrapped = bytes(meta["wrapped"])
        aad = b"janus-vault-key|" + agreement.did.encode()
        try:
            return AESGCM(_kek(agreement, public, bytes(meta["salt"]))).decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], aad
            )
        except InvalidTag:
            raise VaultLockedError(
                "the vault does not open with this token's agreement key: open it with "
                "the token it was made with"
            ) from None

    def close(self) -> None:
        self._db.close()

    def derived_key(self, purpose: str) -> bytes:
        """A 256-bit key for another store of this owner's state (the sync stores), as
        locked as the vault itself: derived from the storage key, one per purpose."""
        return HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"janus vault derived key|" + purpose.encode(),
        ).derive(self._storage_key)

    # --- sealing ---------------------------------------------------------------------

    def _seal(self, table: str, row: str, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, data, f"{table}\x00{row}".encode())

    def _open(self, table: str, row: str, blob: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], f"{table}\x00{row}".encode())
        except (InvalidTag, ValueError):
            raise VaultCorruptError(
                f"a {table} record of the vault does not authenticate"
            ) from None

    def ciphertext_tag(self, ciphertext: bytes) -> bytes:
        """A keyed hash of a received ciphertext: recognises it again, reveals nothing."""
        return hmac.new(self._hash_key, ciphertext, hashlib.sha256).digest()

    # --- reading ---------------------------------------------------------------------

    def get(self, kind: str, key: str) -> bytes | None:
        row = self._db.execute(
            "SELECT blob FROM records WHERE kind = ? AND id = ?", (kind, key)
        ).fetchone()
        return None if row is None else self._open(f"records/{kind}", key, bytes(row[0]))

    def all(self, kind: str) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT id, blob FROM records WHERE kind = ? ORDER BY id", (kind,)
        ).fetchall()
        return [(str(i), self._open(f"records/{kind}", str(i), bytes(b))) for i, b in rows]

    def seen(self, ciphertext: bytes) -> bool:
        tag = self.ciphertext_tag(ciphertext)
        return self._db.execute("SELECT 1 FROM seen WHERE tag = ?", (tag,)).fetchone() is not None

    def messages(self, relationship: str | None = None, *, after: int = 0) -> list[StoredMessage]:
        if relationship is None:
            rows = self._db.execute(
                "SELECT seq, rel, blob, at FROM messages WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT seq, rel, blob, at FROM messages WHERE rel = ? AND seq > ? ORDER BY seq",
                (relationship, after),
            ).fetchall()
        return [
            StoredMessage(int(s), str(r), self._open("messages", f"{r}/{s}", bytes(b)), int(a))
            for s, r, b, a in rows
        ]

    def outbox(self, relationship: str | None = None) -> list[tuple[str, str, bytes]]:
        """Messages encrypted and committed but not yet handed to a service, oldest first."""
        rows = self._db.execute("SELECT id, rel, blob FROM outbox ORDER BY created, id").fetchall()
        return [
            (str(i), str(r), self._open("outbox", f"{r}/{i}", bytes(b)))
            for i, r, b in rows
            if relationship is None or r == relationship
        ]

    # --- writing: only inside a transaction -------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic, durable change: all of its writes are committed, or none."""
        if self._in_transaction:
            raise VaultError("vault transactions do not nest")
        self._in_transaction = True
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield Transaction(self)
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False


class Transaction:
    """The writes of one :meth:`Vault.transaction`."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._db = vault._db

    def put(self, kind: str, key: str, data: bytes) -> None:
        blob = self._vault._seal(f"records/{kind}", key, data)
        self._db.execute(
            "INSERT INTO records (kind, id, blob) VALUES (?, ?, ?) "
            "ON CONFLICT (kind, id) DO UPDATE SET blob = excluded.blob",
            (kind, key, blob),
        )

    def delete(self, kind: str, key: str) -> None:
        self._db.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, key))

    def mark_seen(self, ciphertext: bytes) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO seen (tag, at) VALUES (?, ?)",
            (self._vault.ciphertext_tag(ciphertext), int(time.time())),
        )

    def add_message(self, relationship: str, data: bytes) -> int:
        now = int(time.time())
        # The row id is part of the associated data, so it is chosen before sealing.
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM messages").fetchone()
        seq = int(row[0])
        blob = self._vault._seal("messages", f"{relationship}/{seq}", data)
        self._db.execute(
            "INSERT INTO messages (seq, rel, blob, at) VALUES (?, ?, ?, ?)",
            (seq, relationship, blob, now),
        )
        return seq

    def queue(
        self, item_id: str, relationship: str, data: bytes, *, created: float | None = None
    ) -> None:
        """Add (or, with its original ``created``, put back) a message to send."""
        blob = self._vault._seal("outbox", f"{relationship}/{item_id}", data)
        self._db.execute(
            "INSERT INTO outbox (id, rel, blob, created) VALUES (?, ?, ?, ?)",
            (item_id, relationship, blob, time.time() if created is None else created),
        )

    def unqueue(self, item_id: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def drop_relationship(self, relationship: str) -> None:
        """Forget a relationship's queued messages (its record is deleted separately)."""
        self._db.execute("DELETE FROM outbox WHERE rel = ?", (relationship,))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, id TEXT NOT NULL, blob BLOB NOT NULL, PRIMARY KEY (kind, id)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY, rel TEXT NOT NULL, blob BLOB NOT NULL, at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_rel ON messages (rel, seq);
CREATE TABLE IF NOT EXISTS seen (tag BLOB PRIMARY KEY, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY, rel TEXT NOT NULL, blob BLOB NOT NULL, created REAL NOT NULL
);
"""
