"""Groups as real processes: three owners, each with its own SoftHSM token and cloud agent.

One module-scoped set-up (tokens, identities, services, three relationships, a group
of three), then the tests in order: convergence with an owner offline, removal, forged
records.  Every command is a ``janus`` subprocess, as an owner would run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken, ensure_token

pytestmark = pytest.mark.slow
SERVICE_ARGS = ["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"]


class Owner:
    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.token: SoftHSMToken = ensure_token(base / name / "softhsm", name)
        self.state = base / name / "edge"
        self.did = str(self.ok("edge", "init", "--token", self.token.uri(), "--name", name)["did"])
        self.cloud = CloudProcess(base / name / "cloud", owner=self.did, extra_args=SERVICE_ARGS)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m MODULE ARGS --state-dir …`` with this owner's token."""
        argv = [sys.executable, "-m", *args, "--state-dir", str(self.state)]
        done = subprocess.run(
            argv, env=self.token.environ(), capture_output=True, text=True, timeout=180,
            check=False,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def janus(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("agent", *args, "--json")

    def ok(self, *args: str) -> Any:
        done = self.janus(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def fails(self, *args: str) -> dict[str, Any]:
        done = self.janus(*args)
        assert done.returncode == 1, done.stdout
        assert done.stderr.startswith("janus: error: ") and done.stderr.count("\n") == 1
        error: dict[str, Any] = json.loads(done.stdout)["error"]
        return error

    def receive(self) -> dict[str, Any]:
        got: dict[str, Any] = self.ok("rel", "receive")
        return got

    def status(self) -> dict[str, Any]:
        groups = self.ok("sync", "status")["groups"]
        return {g["name"]: g for g in groups}


def connect(a: Owner, b: Owner, base: Path) -> None:
    invitation = base / f"{a.name}-{b.name}.invite"
    a.ok("rel", "invite", "--name", b.name, "--out", str(invitation))
    b.ok("rel", "accept", str(invitation), "--name", a.name)
    a.receive()
    b.receive()
    a.receive()


@pytest.fixture(scope="module")
def owners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Owner, Owner, Owner]]:
    base = tmp_path_factory.mktemp("groups")
    made: list[Owner] = []

    def one(name: str) -> Owner:
        who = Owner(name, base)
        made.append(who)
        for role in ("receiving", "sending"):
            who.ok("edge", "service", "add", who.cloud.url, "--role", role)
        return who

    try:
        # The owners share nothing until they connect, so they are set up at the same
        # time: one owner's set-up runs while another's waits on its subprocesses.
        with ThreadPoolExecutor(max_workers=3) as pool:
            started = [pool.submit(one, name) for name in ("alex", "blair", "casey")]
        alex, blair, casey = (future.result() for future in started)
        connect(alex, blair, base)
        connect(alex, casey, base)
        connect(blair, casey, base)
        yield alex, blair, casey
    finally:
        for who in made:
            who.cloud.stop()


def texts(received: dict[str, Any]) -> list[str]:
    return [m["text"] for m in received["group_messages"]]


def settle(*who: Owner, rounds: int = 1) -> None:
    for _ in range(rounds):
        for owner in who:
            owner.receive()


def assert_causal(history: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for item in history:
        assert set(item["parents"]) <= seen, item
        seen.add(item["id"])


def test_group_of_three_converges_with_one_offline(owners: tuple[Owner, Owner, Owner]) -> None:
    alex, blair, casey = owners
    made = alex.ok("group", "create", "friends", "--member", "blair", "--member", "casey")
    assert sorted(m["name"] for m in made["members"]) == ["blair", "casey", "me"]
    assert made["errors"] == []
    for who in (blair, casey):
        got = who.receive()
        assert {e["event"] for e in got["events"]} >= {"group_joined", "group_create"}
    assert set(blair.status()) == {"friends"} and set(casey.status()) == {"friends"}

    # Casey goes offline (runs nothing); Alex and Blair talk.
    alex.ok("group", "send", "friends", "--text", "a1")
    got = blair.receive()
    assert texts(got) == ["a1"] and got["messages"] == []  # not a 1:1 message
    assert got["group_messages"][0]["author"] == "alex"
    blair.ok("group", "send", "friends", "--text", "b1")
    assert texts(alex.receive()) == ["b1"]
    alex.ok("group", "send", "friends", "--text", "a2")
    blair.ok("group", "send", "friends", "--text", "b2")  # concurrent with a2
    assert texts(blair.receive()) == ["a2"]
    assert texts(alex.receive()) == ["b2"]

    # Casey is back: everything at once, each message after its parents.
    back = casey.receive()
    assert sorted(texts(back)) == ["a1", "a2", "b1", "b2"]
    order = [m["text"] for m in back["group_messages"]]
    assert order.index("a1") < order.index("b1") < order.index("a2")
    assert order.index("b1") < order.index("b2")
    assert all(m["member"] for m in back["group_messages"])
    casey.ok("group", "send", "friends", "--text", "c1")
    settle(alex, blair, casey)

    statuses = [who.status()["friends"] for who in owners]
    assert len({s["history_hash"] for s in statuses}) == 1, statuses
    assert {s["delivered"] for s in statuses} == {6} and {s["waiting"] for s in statuses} == {0}
    histories = [who.ok("group", "show", "friends")["history"] for who in owners]
    assert [[h["id"] for h in history] for history in histories].count(
        [h["id"] for h in histories[0]]
    ) == 3
    for history in histories:
        assert_causal(history)
    assert sorted(str(h.get("text")) for h in histories[0][1:]) == ["a1", "a2", "b1", "b2", "c1"]

    # Only the creator changes membership; unknown groups and members are typed errors.
    assert blair.fails("group", "add", "friends", "alex")["code"] == "not_group_creator"
    assert alex.fails("group", "send", "nope", "--text", "x")["code"] == "unknown_group"
    assert alex.fails("group", "add", "friends", "blair")["code"] == "group_member_error"
    assert alex.fails("group", "create", "friends")["code"] == "group_exists"


def test_removed_member_receives_nothing_new(owners: tuple[Owner, Owner, Owner]) -> None:
    alex, blair, casey = owners
    removed = alex.ok("group", "remove", "friends", "casey")
    assert sorted(m["name"] for m in removed["members"]) == ["blair", "me"]
    got = casey.receive()
    assert any(e["event"] == "group_remove" for e in got["events"])
    removed_view = casey.status()["friends"]
    assert removed_view["member"] is False
    assert removed_view["peers"] == []
    at_removal = removed_view["history_hash"]
    assert casey.fails("group", "send", "friends", "--text", "still here?")["code"] == (
        "not_a_group_member"
    )
    blair.receive()
    alex.ok("group", "send", "friends", "--text", "after removal")
    blair.ok("group", "send", "friends", "--text", "after removal too")
    settle(alex, blair, casey)
    assert texts(casey.receive()) == []
    assert casey.status()["friends"]["history_hash"] == at_removal
    a, b = alex.status()["friends"], blair.status()["friends"]
    assert a["history_hash"] == b["history_hash"] and a["delivered"] == 9
    assert [p["name"] for p in a["peers"]] == ["blair"]


def test_forged_records_are_refused_with_typed_errors(owners: tuple[Owner, Owner, Owner]) -> None:
    alex, blair, _ = owners
    friends = alex.status()["friends"]
    gid, before = friends["id"], friends["history_hash"]
    done = blair.run("tests.agent.sync.group_forge", str(blair.state), "alex", gid)
    assert done.returncode == 0, done.stderr
    got = alex.receive()
    codes = sorted(e["code"] for e in got["errors"])
    assert codes == ["group_bad_content_type", "group_change_refused", "sync_key_uncertified"]
    assert got["group_messages"] == []
    after = alex.status()
    assert after["friends"]["history_hash"] == before
    assert set(after) == {"friends"}  # a group named without its records: not joined
    assert sorted(m["name"] for m in after["friends"]["members"]) == ["blair", "me"]
