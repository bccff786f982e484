"""Devices running SyncNode over a simulated network that may drop, reorder and repeat.

Every delivery checks causal order: a message is shown only after its parents.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.sync.messages import Message
from agent.sync.protocol import Limits, SyncNode
from agent.sync.store import SyncStore

from .keys import DeviceKey

LIMITS = Limits(retransmit_after=1.0, max_backoff=8.0, heads_every=20.0)


@dataclass
class Device:
    name: str
    path: Path
    key: DeviceKey = field(default_factory=DeviceKey.ed25519)
    online: bool = True
    node: SyncNode = field(init=False)
    shown: set[str] = field(default_factory=set)
    posted: int = 0


class Network:
    def __init__(self, root: Path, names: list[str], conversation: str) -> None:
        self.root, self.conversation, self.now = root, conversation, 0.0
        self.devices = {n: Device(n, root / f"{n}.db") for n in names}
        self.links: dict[tuple[str, str], list[bytes]] = {
            (a, b): [] for a in names for b in names if a != b
        }
        self.bytes_sent = 0
        for device in self.devices.values():
            self._open(device)

    def _open(self, device: Device) -> None:
        device.node = SyncNode(SyncStore(device.path, durable=False), limits=LIMITS)
        device.shown = set(device.node.store.delivered_ids(self.conversation))
        for other in self.devices:
            if other != device.name:
                device.node.open(other, self.conversation, self.now)

    def post(self, name: str) -> Message:
        device = self.devices[name]
        device.posted += 1
        message = Message.create(
            device.key,
            conversation=self.conversation,
            parents=device.node.store.heads(self.conversation),
            content_type="text/plain",
            body=f"{name} {device.posted}".encode(),
            timestamp=int(self.now * 1000),
        )
        self._shown(device, device.node.post(message, self.now))
        return message

    def _shown(self, device: Device, delivered: list[Message]) -> None:
        for message in delivered:
            assert set(message.parents) <= device.shown, "shown before a parent"
            assert message.id not in device.shown, "shown twice"
            device.shown.add(message.id)

    def poll(self, src: str, dst: str) -> bool:
        device = self.devices[src]
        if not device.online:
            return False
        batch = device.node.poll(dst, self.now)
        if batch is None:
            return False
        self.bytes_sent += len(batch)
        self.links[(src, dst)].append(batch)
        return True

    def deliver(self, src: str, dst: str, index: int, keep: bool = False) -> None:
        queue = self.links[(src, dst)]
        if not queue:
            return
        batch = queue[index % len(queue)]
        if not keep:
            queue.remove(batch)
        device = self.devices[dst]
        if device.online:  # else lost
            self._shown(device, device.node.receive(src, batch, self.now).delivered)

    def set_online(self, name: str, online: bool) -> None:
        device = self.devices[name]
        if online and not device.online:
            for other in self.devices.values():
                if other.name != name:
                    other.node.reconnect(name, self.now)
                    device.node.reconnect(other.name, self.now)
        device.online = online

    def backup(self, name: str) -> None:
        device = self.devices[name]
        device.node.store.backup(device.path.with_suffix(".backup"))

    def restore(self, name: str) -> None:
        """The device comes back from its last backup (and restarts)."""
        device = self.devices[name]
        backup = device.path.with_suffix(".backup")
        if not backup.exists():
            return
        device.node.store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(device.path) + suffix).unlink(missing_ok=True)
        shutil.copy(backup, device.path)
        self._open(device)
        for other in self.devices.values():
            if other.name != name:
                other.node.reconnect(name, self.now)

    def histories(self) -> dict[str, str]:
        return {n: d.node.store.history_hash(self.conversation) for n, d in self.devices.items()}

    def settle(self, max_rounds: int = 400) -> int:
        """Everyone online, a fair lossless network: run until every history is equal."""
        for name in self.devices:
            self.set_online(name, True)
        for queue in self.links.values():
            queue.clear()
        for rounds in range(max_rounds):
            moved = False
            for src, dst in self.links:
                moved |= self.poll(src, dst)
                while self.links[(src, dst)]:
                    self.deliver(src, dst, 0)
            if not moved:
                if len(set(self.histories().values())) == 1 and not self.recoverable():
                    return rounds
                self.now += LIMITS.max_backoff  # let retransmissions fall due
        raise AssertionError(f"no convergence after {max_rounds} rounds: {self.histories()}")

    def recoverable(self) -> set[str]:
        """Parents that some device waits for and another device holds."""
        stores = [d.node.store for d in self.devices.values()]
        wanted = {p for store in stores for p in store.missing(self.conversation)}
        return {p for p in wanted if any(s.has(self.conversation, [p]) for s in stores)}
