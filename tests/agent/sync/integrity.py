"""Invariants of a sync store, checked straight from its SQLite tables."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

from agent.sync.ids import id_text
from agent.sync.messages import parse_message


def check_store(path: str | Path | sqlite3.Connection) -> dict[str, set[str]]:
    """Assert the store is consistent; return each conversation's delivered ids."""
    db = path if isinstance(path, sqlite3.Connection) else sqlite3.connect(str(path))
    delivered: dict[str, set[str]] = {}
    rows = db.execute("SELECT conv, id, encoded, ts, depth, seq FROM messages").fetchall()
    info = {(c, i): (d, s) for c, i, _, _, d, s in rows}
    edges = {(c, p, ch) for c, p, ch in db.execute("SELECT conv, parent, child FROM edges")}
    children: dict[tuple[bytes, bytes], set[bytes]] = {}
    for conv, mid, encoded, ts, depth, seq in rows:
        message = parse_message(encoded)
        assert message.id == id_text(mid) and message.conversation == id_text(conv)
        assert message.timestamp == ts
        assert (depth is None) == (seq is None)
        parents = [_raw(p) for p in message.parents]
        for p in parents:
            assert (conv, p, mid) in edges
            children.setdefault((conv, p), set()).add(mid)
        parent_info = [info.get((conv, p)) for p in parents]
        all_delivered = all(pi is not None and pi[1] is not None for pi in parent_info)
        if seq is None:
            assert not all_delivered, "a waiting message whose parents are all delivered"
            continue
        assert all_delivered, "a delivered message with a parent not delivered"
        assert all(pi is not None and pi[1] < seq for pi in parent_info), "parent shown after"
        assert depth == (1 + max(pi[0] for pi in parent_info if pi) if parents else 0)
        delivered.setdefault(id_text(conv), set()).add(id_text(mid))
    assert len(edges) == sum(len(v) for v in children.values())
    heads = {(c, i) for c, i in db.execute("SELECT conv, id FROM heads")}
    expected = {
        (c, i)
        for (c, i), (_, s) in info.items()
        if s is not None
        and not any(info[(c, ch)][1] is not None for ch in children.get((c, i), ()))
    }
    assert heads == expected
    seqs = [(c, s) for (c, _), (_, s) in info.items() if s is not None]
    assert len(seqs) == len(set(seqs))
    if not isinstance(path, sqlite3.Connection):
        db.close()
    return delivered


def _raw(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=")
