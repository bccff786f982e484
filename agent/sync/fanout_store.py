"""A device's fan-out node, kept in the relationship vault.

The node holds every device-pair ratchet, so its record goes where the relationship
ratchets go: the vault (sealed under a key only the token unwraps), one record
(``fanout``/``node``), written in one transaction.  A caller commits it *before* the
messages a change produced leave the device (as ``janus rel send`` commits a ratchet
before sending), so a crash can never make two messages under one key.  The device
bundle's signed prekeys are files of their own in ``devices/fanout-prekeys`` (as the
relationship prekeys are), mode 0600.
"""

from __future__ import annotations

from typing import Final

from agent.relationships.vault import Vault
from agent.sync.device_errors import NoDeviceListError
from agent.sync.devices import Devices
from agent.sync.fanout import FanoutNode, Outgoing
from agent.sync.fanout_state import dump_node, load_node

FANOUT_KIND: Final = "fanout"
FANOUT_KEY: Final = "node"
PREKEYS_DIR: Final = "fanout-prekeys"


class FanoutStore:
    """Open, save and bring up to date one device's node (the caller holds the
    relationships lock across a load-change-save, as every vault user does)."""

    def __init__(self, devices: Devices, vault: Vault) -> None:
        self.devices = devices
        self.vault = vault
        self.prekeys = devices.directory / PREKEYS_DIR

    def open(self) -> FanoutNode:
        """The node saved here, or a new one (publishing this device's bundle, saved at
        once) for a device that is in its owner's list."""
        edge = self.devices.edge
        data = self.vault.get(FANOUT_KIND, FANOUT_KEY)
        if data is not None:
            return load_node(edge.root, edge.agreement, data, self.prekeys)
        dl = self.devices.stored()
        if dl is None:
            raise NoDeviceListError("no device list here: the fan-out needs one")
        node = FanoutNode(edge.root, edge.agreement, dl, self.prekeys)
        self.save(node)
        return node

    def save(self, node: FanoutNode) -> None:
        with self.vault.transaction() as tx:
            tx.put(FANOUT_KIND, FANOUT_KEY, dump_node(node))

    def refresh(self, node: FanoutNode) -> list[Outgoing]:
        """Take the list accepted in ``devices/`` since the node last saw one (``janus
        device accept|add|remove`` ran meanwhile): sessions with removed devices end and
        the list is to be announced.  The caller saves the node, then sends."""
        dl = self.devices.stored()
        own = node.views[node.owner].current
        if dl is None or dl.compact == own.compact or dl.version <= own.version:
            return []
        return node.accept_own_list(dl.compact)
