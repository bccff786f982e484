"""A device restored from an old backup, and a device that joins after a removal, as
real processes (every device its own SoftHSM token and state, each owner its own cloud
agent): both end with the whole conversation, compared by hash.

- ``janus device reopen`` on the restored device opens new sessions with the other
  devices (their ratchets moved past the backup's); the heads offered over them bring
  back what it lost, with nothing new written.
- What a device wrote before its removal reaches a device added after it: every device
  admits it alike (written before the root-signed time of the removal).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from tests.agent.test_cli_device_fanout import (
    SERVICE_ARGS,
    Device,
    join,
    make_owners,
    sessions,
    settle,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("reopen")
    clouds: list[CloudProcess] = []
    try:
        owners = make_owners(base, {"alex": 2, "blair": 1}, clouds)
        (alex, desktop), (blair,) = owners["alex"], owners["blair"]
        invitation = base / "blair.invite"
        alex.ok("rel", "invite", "--name", "blair", "--out", str(invitation))
        blair.ok("rel", "accept", str(invitation), "--name", "alex")
        everyone = [alex, desktop, blair]
        dids = {d.did for d in everyone}
        for _ in range(4):
            settle(everyone)
            if all(sessions(d) == dids - {d.did} for d in everyone):
                break
        assert all(sessions(d) == dids - {d.did} for d in everyone)
        yield {"alex": alex, "desktop": desktop, "blair": blair, "base": base}
    finally:
        for cloud in clouds:
            cloud.stop()


def group_texts(device: Device) -> list[str]:
    shown = device.ok("group", "show", "pair")["history"]
    return [h["text"] for h in shown if "text" in h]


def hashes(devices: list[Device]) -> set[str]:
    return {c["history_hash"] for d in devices for c in d.devices()["conversations"]}


def test_a_restored_device_reopens_its_sessions_and_catches_up(world: dict[str, Any]) -> None:
    alex, desktop, blair = world["alex"], world["desktop"], world["blair"]
    everyone = [alex, desktop, blair]
    alex.ok("rel", "send", "blair", "--text", "before the backup")
    alex.ok("group", "create", "pair", "--member", "blair")
    alex.ok("group", "send", "pair", "--text", "group before the backup")
    settle(everyone, rounds=2)
    assert all(d.history() == ["before the backup"] for d in everyone)
    assert all(group_texts(d) == ["group before the backup"] for d in everyone)
    settle(everyone, rounds=2)  # quiet rounds: every heads offer due is made (and noted)
    backup = world["base"] / "desktop-backup"
    shutil.copytree(desktop.state, backup)

    blair.ok("rel", "send", "alex", "--text", "one")
    desktop.receive()
    desktop.ok("rel", "send", blair.did, "--text", "two")  # its ratchets move on
    desktop.ok("group", "send", "pair", "--text", "group two")
    blair.ok("group", "send", "pair", "--text", "group three")
    settle(everyone, rounds=2)
    whole = ["before the backup", "one", "two"]
    assert all(d.history() == whole for d in everyone)
    whole_group = {"group before the backup", "group two", "group three"}
    assert all(set(group_texts(d)) == whole_group for d in everyone)
    settle(everyone, rounds=2)

    # The desktop comes back from its backup: history and ratchets both old.
    shutil.rmtree(desktop.state)
    shutil.copytree(backup, desktop.state)
    assert desktop.history() == ["before the backup"]
    assert group_texts(desktop) == ["group before the backup"]
    # Naming a device it has no session with is refused, nothing changed.
    assert desktop.fails("device", "reopen", "no-such-device") == "unknown_device"
    reopened = desktop.ok("device", "reopen")
    assert reopened["reopened"] == sorted({alex.did, blair.did})
    assert reopened["errors"] == [] and reopened["queued"] is False
    # Nothing new written: the heads offered over the new sessions, then requests and
    # answers, bring back all it lost (its own "two" included) in a few commands, in
    # the 1:1 conversation and in the group alike.
    for _ in range(5):
        settle([alex, blair, desktop])
        if desktop.history() == whole and set(group_texts(desktop)) == whole_group:
            break
    assert desktop.history() == whole
    assert len(hashes(everyone)) == 1
    assert set(group_texts(desktop)) == whole_group
    assert len({d.ok("group", "show", "pair")["history_hash"] for d in everyone}) == 1
    # Its sessions work both ways again.
    desktop.ok("rel", "send", blair.did, "--text", "back")
    assert blair.receive() == ["back"] and alex.receive() == ["back"]
    blair.ok("rel", "send", "alex", "--text", "welcome back")
    assert desktop.receive() == ["welcome back"]


def test_a_device_added_after_a_removal_gets_what_the_removed_one_wrote(
    world: dict[str, Any],
) -> None:
    alex, desktop, blair = world["alex"], world["desktop"], world["blair"]
    base: Path = world["base"]
    desktop.ok("rel", "send", blair.did, "--text", "written on the desktop")
    settle([blair, alex])
    time.sleep(1.1)  # the removal is stamped in whole seconds, after that message
    alex.ok("device", "remove", desktop.did)
    settle([alex, blair])
    assert desktop.did in {d for o in blair.devices()["owners"] for d in o["ended"]}

    tablet = Device("alex-tablet", base)
    join(alex, tablet, base)
    for _ in range(4):
        settle([alex, blair, tablet])
        if tablet.history() == alex.history():
            break
    history = tablet.history()
    assert history == alex.history() == blair.history()
    assert "written on the desktop" in history
    # Its author is the removed desktop, admitted as written before the removal.
    items = tablet.ok("rel", "history")["history"]
    assert desktop.did in {h["device"] for h in items}
    assert len(hashes([alex, blair, tablet])) == 1
    # The removed desktop learns it at its next command, and opens nothing any more.
    desktop.receive()
    assert desktop.devices()["removed"] is True
    assert desktop.fails("device", "reopen") == "device_removed"


def test_a_group_mixing_owners_with_and_without_device_lists_is_refused_up_front(
    world: dict[str, Any],
) -> None:
    """With a device list here a group syncs by device; an owner without a list syncs by
    relationship: such a group would stay silent between them, so it is not made."""
    alex, base = world["alex"], world["base"]
    casey = Device("casey-laptop", base)
    cloud = CloudProcess(base / "casey" / "cloud", owner=casey.did, extra_args=SERVICE_ARGS)
    try:
        for role in ("receiving", "sending"):
            casey.ok("edge", "service", "add", cloud.url, "--role", role)
        invitation = base / "casey.invite"
        alex.ok("rel", "invite", "--name", "casey", "--out", str(invitation))
        casey.ok("rel", "accept", str(invitation), "--name", "alex")
        alex.receive()
        before = alex.ok("sync", "status")
        assert alex.fails("group", "create", "mixed", "--member", "casey") == "group_mixed_devices"
        assert alex.fails("group", "create", "mixed", "--member", "blair", "--member", "casey") == (
            "group_mixed_devices"
        )
        assert alex.ok("sync", "status")["groups"] == before["groups"]  # nothing made
        # Adding such a member to a group of owners with lists is refused alike.
        alex.ok("group", "create", "listed", "--member", "blair")
        assert alex.fails("group", "add", "listed", "casey") == "group_mixed_devices"
        members = {m["name"] for m in alex.ok("group", "show", "listed")["members"]}
        assert "casey" not in members
        # What the error advises: a list of one device, announced over the relationship.
        casey.ok("device", "init", "--name", "laptop")
        for _ in range(4):
            settle([casey, alex])
            if casey.did in {o["owner"] for o in alex.devices()["owners"]}:
                break
        alex.ok("group", "add", "listed", "casey")
        alex.ok("group", "send", "listed", "--text", "hello casey")
        for _ in range(4):
            settle([casey, alex])
            shown = casey.ok("group", "show", "listed")["history"]
            if any(h.get("text") == "hello casey" for h in shown):
                break
        assert [h["text"] for h in shown if "text" in h] == ["hello casey"]
    finally:
        cloud.stop()
