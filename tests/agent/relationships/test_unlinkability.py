"""What a receiving service holds of one relationship links none of its messages.

Messages of one relationship travel through Alex's sending service into Blair's
receiving service; the ciphertexts are read out of that service's own database, as an
operator (or a thief of its disk) would see them, across two turns of the DH ratchet.
Apart from the two bytes every Janus message starts with (suite and kind, the same for
every user), no two of them share any 8-byte run, and every size on the wire is one of a
few buckets, the same for all messages whatever their text's length within one bucket.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from pathlib import Path

from agent.relationships.padding import BUCKETS
from hardware.softhsm import SoftHSMToken
from tests.agent.relationships.owners import connect, owner, texts

GLOBAL_PREFIX = 2  # suite id and message kind: identical for every Janus user
RUN = 8


def held_ciphertexts(cloud_state: Path, expected: int, timeout: float = 30.0) -> list[bytes]:
    """The ciphertexts Blair's receiving service holds, once ``expected`` have arrived."""
    deadline = time.monotonic() + timeout
    while True:
        db = sqlite3.connect(f"file:{cloud_state / 'receiving.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT ciphertext FROM deliveries ORDER BY received_at").fetchall()
        finally:
            db.close()
        if len(rows) >= expected or time.monotonic() > deadline:
            assert len(rows) == expected, f"{len(rows)} of {expected} messages arrived"
            return [bytes(row[0]) for row in rows]
        time.sleep(0.1)


def runs(data: bytes) -> set[bytes]:
    body = data[GLOBAL_PREFIX:]
    return {body[i : i + RUN] for i in range(len(body) - RUN + 1)}


def test_messages_of_one_relationship_share_no_bytes_at_the_receiving_service(
    cli_token: SoftHSMToken, tmp_path: Path
) -> None:
    captured: list[bytes] = []
    sent: list[str] = []
    with owner(cli_token, tmp_path, "alex") as alex, owner(cli_token, tmp_path, "blair") as blair:
        connect(alex, blair)
        for turn in range(2):  # Blair's answer between the turns moves the DH ratchet on
            batch = [f"turn {turn} message {n} " + "x" * (n * 4) for n in range(6)]
            with alex.rels() as rels:
                for text in batch:
                    rels.send("blair", text=text)
            captured += held_ciphertexts(blair.cloud.state_dir, len(batch))
            sent += batch
            with blair.rels() as rels:
                assert texts(rels.receive()) == batch
                rels.send("alex", text=f"answer {turn}")
            with alex.rels() as rels:
                assert texts(rels.receive()) == [f"answer {turn}"]

    assert len(captured) == len(sent) == 12
    overhead = min(len(c) for c in captured) - BUCKETS[0]  # fixed header and framing
    assert {len(c) - overhead for c in captured} <= set(BUCKETS), "a size outside the buckets"
    plain = [c for c, t in zip(captured, sent, strict=True) if "turn 1" in t]
    assert len({len(c) for c in plain}) == 1, "short texts of different lengths differ in size"
    assert len({c[:GLOBAL_PREFIX] for c in captured}) == 1
    grams = [runs(c) for c in captured]
    for (i, a), (j, b) in itertools.combinations(enumerate(grams), 2):
        shared = a & b
        assert not shared, f"messages {i} and {j} share {len(shared)} runs of {RUN} bytes"
    for text in sent:  # nothing of the plaintext shows either
        assert all(text[:RUN].encode() not in c for c in captured)
