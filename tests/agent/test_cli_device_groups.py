"""A group across devices, as real processes: Alex and Blair with two devices each,
Casey with one, every device its own SoftHSM token and state, each owner its own cloud
agent.

The group's sync peers are devices: messages written on different devices reach every
device of every member over device-pair sessions, every device ends with the same
history (compared by hash, each message after its parents), and a device removed from
its owner's list receives nothing new of the group.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from tests.agent.test_cli_device_fanout import (
    Device,
    authors,
    make_owners,
    sessions,
    settle,
)

pytestmark = pytest.mark.slow


def connect(a: Device, b: Device, base: Path) -> None:
    invitation = base / f"{a.name}-{b.name}.invite"
    a.ok("rel", "invite", "--name", b.name.split("-")[0], "--out", str(invitation))
    b.ok("rel", "accept", str(invitation), "--name", a.name.split("-")[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Device]]]:
    base = tmp_path_factory.mktemp("device-groups")
    clouds: list[CloudProcess] = []
    try:
        owners = make_owners(base, {"alex": 2, "blair": 2, "casey": 1}, clouds)
        alex, blair, casey = owners["alex"][0], owners["blair"][0], owners["casey"][0]
        connect(alex, blair, base)
        connect(alex, casey, base)
        connect(blair, casey, base)
        yield owners
    finally:
        for cloud in clouds:
            cloud.stop()


def group(device: Device) -> dict[str, Any]:
    shown: dict[str, Any] = device.ok("group", "show", "friends")
    seen: set[str] = set()
    for item in shown["history"]:  # causal order on every device
        assert set(item["parents"]) <= seen, item
        seen.add(item["id"])
    return shown


def texts(shown: dict[str, Any]) -> list[str]:
    """The texts of a device's group history, as ``group`` showed it."""
    return [h["text"] for h in shown["history"] if "text" in h]


def test_group_across_devices_converges_and_a_removed_device_gets_nothing(
    world: dict[str, list[Device]],
) -> None:
    alex, blair, casey = world["alex"], world["blair"], world["casey"]
    everyone = alex + blair + casey
    dids = {d.did for d in everyone}
    for _ in range(5):  # the relationships' starts carry the owners' announcements
        settle(everyone)
        if converged := all(sessions(d) == dids - {d.did} for d in everyone):
            break
    assert converged, {d.name: sessions(d) for d in everyone}

    # Alex's desktop (no relationship of its own) creates the group, naming the other
    # owners by their roots; every device of every member joins.
    made = alex[1].ok("group", "create", "friends", "--member", blair[0].did,
                      "--member", casey[0].did)  # fmt: skip
    assert made["errors"] == []
    settle(everyone)
    for device in everyone:
        assert {m["did"] for m in group(device)["members"]} == {alex[0].did, blair[0].did,
                                                                casey[0].did}  # fmt: skip

    # Messages from four devices of three owners; Blair's laptop is offline meanwhile.
    sent = alex[0].ok("group", "send", "friends", "--text", "a1")
    assert sent["devices"] == sorted(dids - {alex[0].did})
    settle([alex[1], blair[1], casey[0]])
    blair[1].ok("group", "send", "friends", "--text", "b1")
    settle([casey[0], alex[1]])
    casey[0].ok("group", "send", "friends", "--text", "c1")
    alex[1].ok("group", "send", "friends", "--text", "a2")  # concurrent with c1
    settle([alex[0], alex[1], blair[1], casey[0]])
    got = blair[0].ok("rel", "receive")  # back online: all of it, each after its parents
    assert sorted(m["text"] for m in got["group_messages"]) == ["a1", "a2", "b1", "c1"]
    settle(everyone)
    shown = [group(d) for d in everyone]
    assert len({s["history_hash"] for s in shown}) == 1, shown
    assert all(sorted(texts(s)) == ["a1", "a2", "b1", "c1"] for s in shown), shown
    by_text = {h["text"]: h for h in shown[0]["history"] if "text" in h}
    assert by_text["a1"]["device"] == alex[0].did and by_text["a2"]["device"] == alex[1].did
    assert by_text["b1"]["author_did"] == blair[0].did and by_text["b1"]["device"] == blair[1].did
    # Signed by each device's sync key (the token only certified it), never the token.
    written = authors(casey[0].state / "sync" / "groups.db")
    keys = {written[by_text[t]["id"]] for t in ("a1", "a2", "b1", "c1")}
    assert len(keys) == 4 and not keys & dids

    # Blair removes the desktop: from then on no device sends it anything of the group.
    blair[0].ok("device", "remove", blair[1].did)
    settle([blair[0], alex[0], alex[1], casey[0]])
    at_removal = group(blair[1])["history_hash"]
    sent = alex[0].ok("group", "send", "friends", "--text", "after")
    assert blair[1].did not in sent["devices"]
    casey[0].ok("group", "send", "friends", "--text", "after too")
    settle(everyone)
    assert blair[1].ok("sync", "status")["devices"]["removed"] is True
    removed = group(blair[1])
    assert removed["history_hash"] == at_removal
    assert "after" not in texts(removed)
    assert blair[1].fails("group", "send", "friends", "--text", "x") == "device_removed"
    current = [alex[0], alex[1], blair[0], casey[0]]
    shown = [group(d) for d in current]
    assert len({s["history_hash"] for s in shown}) == 1, shown
    assert all({"after", "after too"} <= set(texts(s)) for s in shown), shown
