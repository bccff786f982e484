"""An owner with several sending services spreads its messages and survives one down."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken
from tests.agent.relationships.owners import connect, owner, texts

SENDING_ONLY = ["--sending", "--sending-allow-host", "127.0.0.1"]


def submissions(cloud: CloudProcess) -> int:
    db = sqlite3.connect(f"file:{cloud.state_dir / 'sending.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM submissions").fetchone()[0])
    finally:
        db.close()


def test_messages_go_through_either_sending_service_and_around_one_that_is_down(
    cli_token: SoftHSMToken, tmp_path: Path
) -> None:
    with owner(cli_token, tmp_path, "alex") as alex, owner(cli_token, tmp_path, "blair") as blair:
        connect(alex, blair)
        second = CloudProcess(tmp_path / "alex-second", owner=alex.did, extra_args=SENDING_ONLY)
        try:
            with alex.rels() as rels:
                rels.add_service(second.url, "sending")
            first_before = submissions(alex.cloud)
            batch = [f"spread {n}" for n in range(20)]
            with alex.rels() as rels:
                for text in batch:
                    rels.send("blair", text=text)
            with blair.rels() as rels:
                assert texts(rels.receive()) == batch
            # Random choice: both carried some (all 20 on one: 2 in a million).
            assert submissions(alex.cloud) > first_before
            assert submissions(second) > 0

            second.stop()
            survived = [f"one down {n}" for n in range(6)]
            with alex.rels() as rels:
                for text in survived:
                    rels.send("blair", text=text)
            with blair.rels() as rels:
                assert texts(rels.receive()) == survived
        finally:
            second.stop()
