"""Three owners with two devices each, as real processes, through a lossy network: every
device its own SoftHSM token and state, each owner its own cloud agent, and in front of
each owner's receiving service a proxy that loses, duplicates and reorders deliveries
(tests/agent/lossy_proxy.py, seeded).

A group and two 1:1 conversations, written on random devices in random order while one
device is offline; once the network heals, every device ends with the same histories
(compared by hash), each message after its parents; then a removed member and a
removed device receive nothing new.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from tests.agent.lossy_proxy import LossyProxy
from tests.agent.test_cli_device_fanout import Device, authors, join, sessions, settle

pytestmark = pytest.mark.slow
SERVICE_ARGS = ["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"]
SEED = 20261206


def connect(a: Device, b: Device, base: Path) -> None:
    invitation = base / f"{a.name}-{b.name}.invite"
    a.ok("rel", "invite", "--name", b.name.split("-")[0], "--out", str(invitation))
    b.ok("rel", "accept", str(invitation), "--name", a.name.split("-")[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("sync-faults")
    clouds: list[CloudProcess] = []
    proxies: list[LossyProxy] = []

    def one(n: int, owner: str) -> list[Device]:
        root = Device(f"{owner}-laptop", base)
        cloud = CloudProcess(base / owner / "cloud", owner=root.did, extra_args=SERVICE_ARGS)
        clouds.append(cloud)
        proxy = LossyProxy(cloud.url, seed=SEED + n)
        proxies.append(proxy)
        # Every delivery to this owner's devices (relationship addresses and device
        # inboxes alike) goes through the proxy; its sending service is reached direct.
        root.ok("edge", "service", "add", proxy.url, "--role", "receiving")
        root.ok("edge", "service", "add", cloud.url, "--role", "sending")
        root.ok("device", "init", "--name", "laptop")
        other = Device(f"{owner}-desktop", base)
        join(root, other, base)
        return [root, other]

    try:
        # The owners share nothing until they meet: set up side by side, so no owner's
        # set-up waits on another's processes.
        with ThreadPoolExecutor(max_workers=3) as pool:
            made = {o: pool.submit(one, n, o) for n, o in enumerate(("alex", "blair", "casey"))}
        owners = {owner: future.result() for owner, future in made.items()}
        proxies.sort(key=lambda p: p.seed)
        alex, blair, casey = (owners[o][0] for o in ("alex", "blair", "casey"))
        connect(alex, blair, base)
        connect(alex, casey, base)
        connect(blair, casey, base)
        everyone = [d for devices in owners.values() for d in devices]
        dids = {d.did for d in everyone}
        for _ in range(6):  # the relationships' starts carry the owners' announcements
            settle(everyone)
            if all(sessions(d) == dids - {d.did} for d in everyone):
                break
        assert all(sessions(d) == dids - {d.did} for d in everyone)
        yield {**owners, "proxies": proxies, "base": base}
    finally:
        for proxy in proxies:
            proxy.close()
        for cloud in clouds:
            cloud.stop()


def group(device: Device) -> dict[str, Any]:
    shown: dict[str, Any] = device.ok("group", "show", "crew")
    seen: set[str] = set()
    for item in shown["history"]:  # causal order on every device
        assert set(item["parents"]) <= seen, item
        seen.add(item["id"])
    return shown


def texts(device: Device) -> set[str]:
    return {h["text"] for h in group(device)["history"] if "text" in h}


def members(device: Device) -> set[str]:
    groups = device.ok("sync", "status")["groups"]
    return {m["did"] for g in groups for m in g["members"]}


def conversation_hash(device: Device, peer: str) -> str:
    for conversation in device.devices()["conversations"]:
        if conversation["peer"] == peer:
            return str(conversation["history_hash"])
    raise AssertionError(f"{device.name} has no conversation with {peer}")


def test_six_devices_converge_through_a_lossy_network(world: dict[str, Any]) -> None:
    alex, blair, casey = world["alex"], world["blair"], world["casey"]
    proxies: list[LossyProxy] = world["proxies"]
    everyone = alex + blair + casey
    roots = {"alex": alex[0].did, "blair": blair[0].did, "casey": casey[0].did}
    made = blair[1].ok("group", "create", "crew", "--member", roots["alex"],
                       "--member", roots["casey"])  # fmt: skip
    assert made["errors"] == []
    for _ in range(4):
        settle(everyone)
        if all(members(d) == set(roots.values()) for d in everyone):
            break
    assert all(members(d) == set(roots.values()) for d in everyone)
    by_name = {d.name: d for d in everyone}
    dids = {d.did for d in everyone}

    # A calm start: a group message goes to every other device of every member at once,
    # and a device that was offline gets all of it in one receive, each after its parents.
    sent = alex[0].ok("group", "send", "crew", "--text", "calm from alex-laptop")
    assert sent["devices"] == sorted(dids - {alex[0].did})
    settle([alex[1], blair[1], casey[0], casey[1]])
    casey[1].ok("group", "send", "crew", "--text", "calm from casey-desktop")
    settle([alex[0], alex[1], blair[1], casey[0]])
    got = blair[0].ok("rel", "receive")
    assert sorted(m["text"] for m in got["group_messages"]) == [
        "calm from alex-laptop",
        "calm from casey-desktop",
    ]
    group_texts = ["calm from alex-laptop", "calm from casey-desktop"]

    for proxy in proxies:
        proxy.faulty = True
    rng = random.Random(SEED)
    offline = alex[1]
    direct_texts: list[str] = []
    for round_ in range(3):
        order = [d for d in everyone if d is not offline or round_ == 2]
        rng.shuffle(order)
        for device in order:
            owner = device.name.split("-")[0]
            if rng.random() < 0.6:
                text = f"group {len(group_texts)} from {device.name}"
                device.ok("group", "send", "crew", "--text", text)
                group_texts.append(text)
            elif owner in ("alex", "blair"):
                peer = roots["blair" if owner == "alex" else "alex"]
                text = f"direct {len(direct_texts)} from {device.name}"
                device.ok("rel", "send", peer, "--text", text)
                direct_texts.append(text)
            device.ok("rel", "receive")  # faults make errors, never a failed command
    faults = sum((p.counts for p in proxies), start=Counter[str]())
    assert faults["lost"] and faults["duplicated"] and faults["held"], faults

    # The network heals: commands alone (offers, requests, acks) bring every device level.
    for proxy in proxies:
        proxy.faulty = False
    for _ in range(8):
        settle(everyone)
        if all(texts(d) == set(group_texts) for d in everyone):
            break
    shown = [group(d) for d in everyone]
    assert all(texts(d) == set(group_texts) for d in everyone)
    assert len({s["history_hash"] for s in shown}) == 1
    # Each message shows the device it was written on and its owner's root; it is signed
    # by that device's sync key (certified once by the device's key), never the token.
    for item in (h for h in shown[0]["history"] if "text" in h):
        writer = by_name[item["text"].rsplit(" from ", 1)[1]]
        assert item["device"] == writer.did, item
        assert item["author_did"] == roots[writer.name.split("-")[0]], item
    written = authors(casey[0], "groups.db")
    ids = [h["id"] for h in shown[0]["history"] if "text" in h]
    writers = {h["device"] for h in shown[0]["history"] if "text" in h}
    keys = {written[i] for i in ids}
    assert len(keys) == len(writers) and not keys & dids
    pair = alex + blair
    for _ in range(4):
        if len({conversation_hash(d, roots["blair" if d in alex else "alex"]) for d in pair}) == 1:
            break
        settle(pair)
    assert len({conversation_hash(d, roots["blair" if d in alex else "alex"]) for d in pair}) == 1
    assert all(set(d.history()) == set(direct_texts) for d in pair if direct_texts)

    # Blair removes Casey from the group; Alex removes its desktop: neither gets anything new.
    blair[0].ok("group", "remove", "crew", "casey")
    alex[0].ok("device", "remove", alex[1].did)
    settle([blair[0], alex[0], blair[1], casey[0], casey[1]])
    at_removal = {d.name: group(d)["history_hash"] for d in (casey[0], casey[1], alex[1])}
    sent = alex[0].ok("group", "send", "crew", "--text", "after the removals")
    assert sent["devices"] == sorted({blair[0].did, blair[1].did})
    blair[1].ok("group", "send", "crew", "--text", "after them too")
    settle(everyone, rounds=2)
    for device in (casey[0], casey[1], alex[1]):
        assert group(device)["history_hash"] == at_removal[device.name], device.name
        assert not {"after the removals", "after them too"} & texts(device)
    assert alex[1].ok("sync", "status")["devices"]["removed"] is True
    assert alex[1].fails("group", "send", "crew", "--text", "x") == "device_removed"
    current = [alex[0], blair[0], blair[1]]
    assert len({group(d)["history_hash"] for d in current}) == 1
    assert all({"after the removals", "after them too"} <= texts(d) for d in current)
