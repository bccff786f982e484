"""A wedged session (one side restored an old state) is detected and re-established
without a new invitation, from the same identities."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from hardware.softhsm import SoftHSMToken
from tests.agent.relationships.owners import Owner, connect, owner, texts


def snapshot(who: Owner, target: Path) -> None:
    source = who.state / "relationships" / "vault.db"
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def restore(who: Owner, snap: Path) -> None:
    vault = who.state / "relationships" / "vault.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{vault}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(snap, vault)


def round_trip(alex: Owner, blair: Owner, n: int) -> None:
    with alex.rels() as rels:
        rels.send("blair", text=f"a{n}")
    with blair.rels() as rels:
        assert texts(rels.receive()) == [f"a{n}"]
        rels.send("alex", text=f"b{n}")
    with alex.rels() as rels:
        assert texts(rels.receive()) == [f"b{n}"]


def test_restored_old_state_is_detected_and_reestablished(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        round_trip(alex, blair, 0)
        snapshot(blair, tmp_path / "blair-old.db")
        for n in range(1, 4):
            round_trip(alex, blair, n)
        restore(blair, tmp_path / "blair-old.db")  # Blair's vault goes back in time

        with alex.rels() as rels:
            for n in range(3):
                rels.send("blair", text=f"lost {n}")
        with blair.rels() as rels:
            report = rels.receive()
            events = [e["event"] for e in report.events]
            assert texts(report) == []
            assert "wedged" in events and "reestablished" in events, report.to_dict()
            assert rels._find("alex").epoch == 1
        with alex.rels() as rels:
            report = rels.receive()
            assert {"event": "reestablished", "name": "blair", "epoch": 1, "by": "peer"} in (
                report.events
            ), report.to_dict()
        with blair.rels() as rels:
            rels.receive()  # Alex's answer in the new session
            rels.send("alex", text="back again")
        with alex.rels() as rels:
            assert texts(rels.receive()) == ["back again"]
            rels.send("blair", text="welcome back")
            assert len(rels.list()) == 1  # the same relationship, no new invitation
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["welcome back"]


def test_manual_reestablish(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair", sending=False) as blair,
    ):
        connect(alex, blair)
        with alex.rels() as rels:
            assert rels.rotate("blair", reestablish=True)["reestablished"] is True
        with blair.rels() as rels:
            report = rels.receive()
            assert [e["event"] for e in report.events] == ["reestablished"]
            rels.send("alex", text="new session")
        with alex.rels() as rels:
            assert texts(rels.receive()) == ["new session"]
