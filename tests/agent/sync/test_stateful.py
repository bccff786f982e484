"""Hypothesis: devices syncing over a lossy, reordering, duplicating network converge.

Devices go offline and come back, one is restored from an old copy of its store;
whatever happens, every delivery is in causal order (checked as it happens, in
network.py), and once the network is fair again every device holds the same history
(compared by hash) and every store is consistent.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.sync.ids import new_conversation_id

from .integrity import check_store
from .network import Network

NAMES = ["alex", "blair", "casey"]
names = st.sampled_from(NAMES)
links = st.sampled_from([(a, b) for a in NAMES for b in NAMES if a != b])


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="janus-sync-"))
        self.net = Network(self.dir, NAMES, new_conversation_id())

    @precondition(lambda self: sum(d.posted for d in self.net.devices.values()) < 60)
    @rule(name=names, count=st.integers(1, 4))
    def post(self, name: str, count: int) -> None:
        if self.net.devices[name].online:
            for _ in range(count):
                self.net.post(name)

    @rule()
    def exchange(self) -> None:
        """One round on every link, in order: what gets messages far enough to be lost."""
        for link in self.net.links:
            self.net.poll(*link)
            while self.net.links[link]:
                self.net.deliver(*link, 0)

    @rule(link=links)
    def poll(self, link: tuple[str, str]) -> None:
        self.net.poll(*link)

    @rule(link=links, index=st.integers(0, 20), duplicate=st.booleans())
    def deliver(self, link: tuple[str, str], index: int, duplicate: bool) -> None:
        self.net.deliver(*link, index, keep=duplicate)

    @rule(link=links, index=st.integers(0, 20))
    def drop(self, link: tuple[str, str], index: int) -> None:
        queue = self.net.links[link]
        if queue:
            del queue[index % len(queue)]

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 30.0]))
    def tick(self, seconds: float) -> None:
        self.net.now += seconds

    @rule(name=names, online=st.booleans())
    def set_online(self, name: str, online: bool) -> None:
        self.net.set_online(name, online)

    @rule(name=names)
    def backup(self, name: str) -> None:
        self.net.backup(name)

    @rule(name=names)
    def restore(self, name: str) -> None:
        before = len(self.net.devices[name].shown)
        self.net.restore(name)
        if len(self.net.devices[name].shown) < before:
            event("a device went back to an older store")

    @invariant()
    def shown_is_what_the_store_delivered(self) -> None:
        for device in self.net.devices.values():
            assert device.shown == set(device.node.store.delivered_ids(self.net.conversation))

    def teardown(self) -> None:
        try:
            event(f"{sum(d.posted for d in self.net.devices.values()) // 10 * 10}+ messages")
            self.net.settle()
            hashes = self.net.histories()
            assert len(set(hashes.values())) == 1, hashes
            for device in self.net.devices.values():
                check_store(device.path)
        finally:
            for device in self.net.devices.values():
                device.node.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)


SyncMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
TestSync = SyncMachine.TestCase
