"""The durable store of sync messages: which are delivered, which wait, and the heads.

A message is *delivered* (shown to the application) once all its parents are; until
then it *waits*.  Each batch of messages is stored in one SQLite transaction, with the
deliveries it causes, so a crash leaves either the whole batch or none of it: never a
message whose delivery, heads or edges are half-written.

Per conversation the store keeps:

- ``messages``: the encoded message, its author timestamp, and once delivered its
  *depth* (0 without parents, else 1 + the deepest parent) and *seq* (this device's
  delivery order, which is a linear extension of the causal order by construction);
- ``edges``: parent → child, to find the waiting children a new message releases;
- ``heads``: the frontier, delivered messages no delivered message names as parent;
- ``peer_has``: which peers are known to hold which messages (what the protocol need
  not offer them again).

Opened with a :class:`~agent.sync.sealing.StoreSealer` (as every store of an owner's
state is), the encoded messages are sealed at rest, and the store remembers it: it then
opens only with the same key.  A store written before sealing existed is sealed when
first opened with a key, in one transaction, and vacuumed so no page keeps a plaintext
body.  Without a sealer (tests, benchmarks) bodies are stored as given.

The *history* is the delivered messages ordered by (depth, timestamp, id): a linear
extension of the causal order (a parent's depth is smaller than its child's) that
depends on the set of messages only, so two devices holding the same messages compute
the same history and the same :meth:`SyncStore.history_hash`, whatever order the
messages arrived in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.sync.errors import StoreError, SyncError
from agent.sync.ids import id_text
from agent.sync.messages import Message, parse_message
from agent.sync.sealing import StoreSealer
from janus_hsm import b64url

#: 2 added ``store_meta`` (sealing); a version 1 store is upgraded when opened.
SCHEMA_VERSION: Final = 2
MAX_WAITING: Final = 10_000  # per conversation: a peer cannot fill the disk with orphans
MAX_PEER_NAME: Final = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    conv BLOB NOT NULL, id BLOB NOT NULL, encoded BLOB NOT NULL, ts INTEGER NOT NULL,
    depth INTEGER, seq INTEGER,
    PRIMARY KEY (conv, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_history ON messages (conv, depth, ts, id)
    WHERE depth IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_seq ON messages (conv, seq);
CREATE TABLE IF NOT EXISTS edges (
    conv BLOB NOT NULL, parent BLOB NOT NULL, child BLOB NOT NULL,
    PRIMARY KEY (conv, parent, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_child ON edges (conv, child);
CREATE TABLE IF NOT EXISTS heads (
    conv BLOB NOT NULL, id BLOB NOT NULL, PRIMARY KEY (conv, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peer_has (
    conv BLOB NOT NULL, peer TEXT NOT NULL, id BLOB NOT NULL, PRIMARY KEY (conv, peer, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


@dataclass
class AddResult:
    """What one :meth:`SyncStore.add` did, in this device's delivery order."""

    stored: list[str] = field(default_factory=list)  # new messages (delivered or waiting)
    delivered: list[Message] = field(default_factory=list)  # newly shown, parents first
    waiting: list[str] = field(default_factory=list)  # new messages still waiting
    missing: list[str] = field(default_factory=list)  # parents of those that nobody stored
    full: list[str] = field(default_factory=list)  # refused: too many waiting already


def _raw(text: str) -> bytes:
    return b64url.decode(text, "an id", error=SyncError)


def _ids(rows: Iterable[tuple[bytes, ...]]) -> list[str]:
    return [id_text(row[0]) for row in rows]


class SyncStore:
    """Messages of any number of conversations in one SQLite database."""

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        max_waiting: int = MAX_WAITING,
        sealer: StoreSealer | None = None,
    ) -> None:
        """Open (creating) the store; ``durable=False`` skips fsync (tests, benchmarks);
        ``sealer`` seals bodies at rest (module docstring)."""
        self.path = str(path)
        self.max_waiting = max_waiting
        self._sealer: StoreSealer | None = None
        if self.path != ":memory:":
            # Owner-only from the first byte (ids and the causal graph are in the clear
            # even when bodies are sealed); SQLite gives -wal/-shm the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION) or (version == 0 and tables):
                raise StoreError(f"{self.path} is not a sync store of version {SCHEMA_VERSION}")
            self._db.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
            self._sealer = self._check_sealing(sealer)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"cannot open the sync store {self.path}: {exc}") from None
        except StoreError:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def _check_sealing(self, sealer: StoreSealer | None) -> StoreSealer | None:
        """The sealer the store is to use: the one it was sealed with, or none."""
        rows = []
        # One transaction for the check and the sealing: two processes opening an unsealed
        # store at once seal it once, and the second sees the first's mark.
        with self._transaction() as db:
            row = db.execute("SELECT value FROM store_meta WHERE name = 'sealed'").fetchone()
            if row is None and sealer is not None:
                rows = db.execute("SELECT conv, id, encoded FROM messages").fetchall()
                db.executemany(
                    "UPDATE messages SET encoded = ? WHERE conv = ? AND id = ?",
                    [(sealer.seal(conv, mid, encoded), conv, mid) for conv, mid, encoded in rows],
                )
                db.execute(
                    "INSERT INTO store_meta (name, value) VALUES ('sealed', ?)",
                    (sealer.check_value(),),
                )
        if row is not None:
            if sealer is None:
                raise StoreError(
                    f"{self.path} holds sealed messages: it opens only with its owner's "
                    "vault key (through the janus commands of that state directory)"
                )
            if not sealer.is_key_of(bytes(row[0])):
                raise StoreError(
                    f"{self.path} was sealed under another key: it belongs to another "
                    "device's state (its token)"
                )
            return sealer
        if rows and self.path != ":memory:":
            # The plaintext bodies were in pages that are free now: rebuild the file
            # and empty the WAL, so that no page still holds one.
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sealer

    def _stored(self, conv: bytes, mid: bytes, encoded: bytes) -> bytes:
        return encoded if self._sealer is None else self._sealer.seal(conv, mid, encoded)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def backup(self, path: str | Path) -> None:
        """A consistent copy of the whole store (SQLite's online backup)."""
        target = sqlite3.connect(str(path))
        try:
            self._db.backup(target)
        finally:
            target.close()

    # -- adding messages -------------------------------------------------------------

    def add(self, messages: Iterable[Message]) -> AddResult:
        """Store verified messages in one transaction and deliver what they complete."""
        result = AddResult()
        batch: dict[str, Message] = {}
        for message in messages:
            batch.setdefault(message.id, message)
        if not batch:
            return result
        with self._transaction() as db:
            waiting_count: dict[bytes, int] = {}
            next_seq: dict[bytes, int] = {}
            new: list[Message] = []
            for message in batch.values():
                conv, mid = _raw(message.conversation), _raw(message.id)
                if db.execute(
                    "SELECT 1 FROM messages WHERE conv = ? AND id = ?", (conv, mid)
                ).fetchone():
                    continue
                if conv not in waiting_count:
                    waiting_count[conv] = db.execute(
                        "SELECT count(*) FROM messages WHERE conv = ? AND seq IS NULL", (conv,)
                    ).fetchone()[0]
                if waiting_count[conv] >= self.max_waiting:
                    result.full.append(message.id)
                    continue
                waiting_count[conv] += 1
                db.execute(
                    "INSERT INTO messages (conv, id, encoded, ts) VALUES (?, ?, ?, ?)",
                    (conv, mid, self._stored(conv, mid, message.encoded), message.timestamp),
                )
                db.executemany(
                    "INSERT INTO edges (conv, parent, child) VALUES (?, ?, ?)",
                    [(conv, _raw(p), mid) for p in message.parents],
                )
                new.append(message)
                result.stored.append(message.id)
            work: deque[tuple[bytes, bytes]] = deque(
                (_raw(m.conversation), _raw(m.id)) for m in new
            )
            while work:
                conv, mid = work.popleft()
                row = db.execute(
                    "SELECT seq FROM messages WHERE conv = ? AND id = ?", (conv, mid)
                ).fetchone()
                if row is None or row[0] is not None:
                    continue  # refused above, or already delivered through another parent
                undelivered, deepest = db.execute(
                    "SELECT count(*) FILTER (WHERE p.seq IS NULL), max(p.depth) FROM edges e "
                    "LEFT JOIN messages p ON p.conv = e.conv AND p.id = e.parent "
                    "WHERE e.conv = ? AND e.child = ?",
                    (conv, mid),
                ).fetchone()
                if undelivered:
                    continue
                if conv not in next_seq:
                    next_seq[conv] = db.execute(
                        "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE conv = ?", (conv,)
                    ).fetchone()[0]
                seq = next_seq[conv]
                next_seq[conv] = seq + 1
                depth = 0 if deepest is None else deepest + 1
                db.execute(
                    "UPDATE messages SET depth = ?, seq = ? WHERE conv = ? AND id = ?",
                    (depth, seq, conv, mid),
                )
                db.execute(
                    "DELETE FROM heads WHERE conv = ? AND id IN "
                    "(SELECT parent FROM edges WHERE conv = ? AND child = ?)",
                    (conv, conv, mid),
                )
                db.execute("INSERT INTO heads (conv, id) VALUES (?, ?)", (conv, mid))
                known = batch.get(id_text(mid))
                if known is None:
                    blob = db.execute(
                        "SELECT encoded FROM messages WHERE conv = ? AND id = ?", (conv, mid)
                    ).fetchone()[0]
                    known = self._load(conv, mid, blob)
                result.delivered.append(known)
                work.extend(
                    (conv, child)
                    for (child,) in db.execute(
                        "SELECT child FROM edges WHERE conv = ? AND parent = ?", (conv, mid)
                    )
                )
            shown = {m.id for m in result.delivered}
            missing: dict[str, None] = {}
            for message in new:
                if message.id in shown:
                    continue
                result.waiting.append(message.id)
                conv = _raw(message.conversation)
                for parent in message.parents:
                    if not db.execute(
                        "SELECT 1 FROM messages WHERE conv = ? AND id = ?", (conv, _raw(parent))
                    ).fetchone():
                        missing[parent] = None
            result.missing = list(missing)
        return result

    # -- reading ---------------------------------------------------------------------

    def get(self, conversation: str, ids: Iterable[str]) -> list[Message]:
        """The stored messages among ``ids`` (delivered or waiting), in the order asked."""
        conv = _raw(conversation)
        out = []
        for mid in ids:
            row = self._db.execute(
                "SELECT encoded FROM messages WHERE conv = ? AND id = ?", (conv, _raw(mid))
            ).fetchone()
            if row is not None:
                out.append(self._load(conv, _raw(mid), row[0]))
        return out

    def _load(self, conv: bytes, mid: bytes, blob: bytes) -> Message:
        encoded = blob if self._sealer is None else self._sealer.open(conv, mid, blob)
        try:
            return parse_message(encoded, verify=False)
        except SyncError as exc:
            raise StoreError(f"the sync store holds a bad message: {exc}") from None

    def has(self, conversation: str, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are stored (delivered or waiting)."""
        conv = _raw(conversation)
        return {
            mid
            for mid in ids
            if self._db.execute(
                "SELECT 1 FROM messages WHERE conv = ? AND id = ?", (conv, _raw(mid))
            ).fetchone()
        }

    def is_delivered(self, conversation: str, message_id: str) -> bool:
        row = self._db.execute(
            "SELECT seq FROM messages WHERE conv = ? AND id = ?",
            (_raw(conversation), _raw(message_id)),
        ).fetchone()
        return row is not None and row[0] is not None

    def heads(self, conversation: str) -> list[str]:
        """The frontier: what a new message of this device names as its parents."""
        return _ids(
            self._db.execute(
                "SELECT id FROM heads WHERE conv = ? ORDER BY id", (_raw(conversation),)
            )
        )

    def waiting(self, conversation: str) -> list[str]:
        return _ids(
            self._db.execute(
                "SELECT id FROM messages WHERE conv = ? AND seq IS NULL ORDER BY id",
                (_raw(conversation),),
            )
        )

    def missing(self, conversation: str, limit: int = 1024) -> list[str]:
        """Parents that waiting messages name and this store has never held."""
        conv = _raw(conversation)
        return _ids(
            self._db.execute(
                "SELECT DISTINCT e.parent FROM edges e LEFT JOIN messages p "
                "ON p.conv = e.conv AND p.id = e.parent "
                "WHERE e.conv = ? AND p.id IS NULL ORDER BY e.parent LIMIT ?",
                (conv, limit),
            )
        )

    def delivered(self, conversation: str, after: int = 0) -> list[tuple[int, Message]]:
        """Delivered messages in this device's delivery order, after sequence ``after``."""
        conv = _raw(conversation)
        return [
            (seq, self._load(conv, mid, blob))
            for seq, mid, blob in self._db.execute(
                "SELECT seq, id, encoded FROM messages WHERE conv = ? AND seq > ? ORDER BY seq",
                (conv, after),
            )
        ]

    def delivered_ids(self, conversation: str) -> list[str]:
        """Delivered ids in this device's delivery order."""
        return _ids(
            self._db.execute(
                "SELECT id FROM messages WHERE conv = ? AND seq IS NOT NULL ORDER BY seq",
                (_raw(conversation),),
            )
        )

    def history(self, conversation: str) -> list[str]:
        """The delivered ids in the order every device computes alike (module docstring)."""
        return _ids(
            self._db.execute(
                "SELECT id FROM messages WHERE conv = ? AND depth IS NOT NULL "
                "ORDER BY depth, ts, id",
                (_raw(conversation),),
            )
        )

    def history_hash(self, conversation: str) -> str:
        """SHA-256 over the history's ids (32 bytes each, in order), base64url."""
        digest = hashlib.sha256()
        for (mid,) in self._db.execute(
            "SELECT id FROM messages WHERE conv = ? AND depth IS NOT NULL ORDER BY depth, ts, id",
            (_raw(conversation),),
        ):
            digest.update(mid)
        return id_text(digest.digest())

    def conversations(self) -> list[str]:
        return _ids(self._db.execute("SELECT DISTINCT conv FROM messages ORDER BY conv"))

    def ancestors(self, conversation: str, message_id: str) -> list[str]:
        """``message_id`` and every stored ancestor of it, nearest (deepest) first."""
        conv = _raw(conversation)
        return _ids(
            self._db.execute(
                "WITH RECURSIVE anc(id) AS (SELECT ? UNION "
                "SELECT e.parent FROM edges e JOIN anc ON e.conv = ? AND e.child = anc.id) "
                "SELECT anc.id FROM anc JOIN messages m ON m.conv = ? AND m.id = anc.id "
                "ORDER BY m.depth DESC, anc.id",
                (_raw(message_id), conv, conv),
            )
        )

    # -- what peers hold -------------------------------------------------------------

    def mark_peer_has(self, conversation: str, peer: str, ids: Iterable[str]) -> None:
        """Remember that ``peer`` holds these messages (it acked, offered or sent them)."""
        conv = _raw(conversation)
        rows = [(conv, _peer(peer), _raw(mid)) for mid in ids]
        if rows:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO peer_has VALUES (?, ?, ?)", rows)

    def forget_peer_has(self, conversation: str, peer: str, ids: Iterable[str]) -> None:
        """``peer`` lost these (it asked for one of them): offer them again."""
        conv = _raw(conversation)
        rows = [(conv, _peer(peer), _raw(mid)) for mid in ids]
        if rows:
            with self._transaction() as db:
                db.executemany("DELETE FROM peer_has WHERE conv = ? AND peer = ? AND id = ?", rows)

    def peer_has(self, conversation: str, peer: str, ids: Iterable[str]) -> set[str]:
        conv, name = _raw(conversation), _peer(peer)
        return {
            mid
            for mid in ids
            if self._db.execute(
                "SELECT 1 FROM peer_has WHERE conv = ? AND peer = ? AND id = ?",
                (conv, name, _raw(mid)),
            ).fetchone()
        }

    def unknown_to(self, conversation: str, peer: str) -> list[str]:
        """Delivered messages ``peer`` is not known to hold, in delivery order."""
        conv = _raw(conversation)
        return _ids(
            self._db.execute(
                "SELECT m.id FROM messages m WHERE m.conv = ? AND m.seq IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM peer_has h "
                "WHERE h.conv = m.conv AND h.peer = ? AND h.id = m.id) ORDER BY m.seq",
                (conv, _peer(peer)),
            )
        )


def _peer(peer: str) -> str:
    if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_NAME:
        raise SyncError(f"a peer name is 1 to {MAX_PEER_NAME} characters")
    return peer
