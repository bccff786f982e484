"""Device sync keys: a software Ed25519 key per device that signs its sync messages.

With devices, 1:1 and group messages are written by a device, and the token is for
long-term operations only (never per message).  So each device has a *sync key*, as an
owner without devices has one (agent/sync/sync_key.py): made in software the first
time the device writes, and certified once by the device's own key (one token
signature) with a compact JWS of ``typ`` ``janus-device-sync-key+jws`` binding the sync
key's did:key to the device's.  The certificates travel in the sync batches (the
``keys`` of a batch: those of the authors of the messages it holds), and ``admit``
takes a message whose author is a sync key certified by a device that is current in
its owner's list.

The private key and the certificates known here live in the relationship vault
(sealed there), never in a file of their own.  Without a vault (a node run in memory)
they are kept in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Final

from agent.relationships.vault import Vault
from agent.sync.group_errors import BadSyncKeyCertificateError
from agent.sync.sync_key import SyncKey, certify, parse_certificate
from janus_hsm.provider import KeyHandle

CERT_TYP: Final = "janus-device-sync-key+jws"
KEY_KIND: Final = "device_sync_key"
CERT_KIND: Final = "device_sync_cert"


class BadDeviceSyncKeyCertificateError(BadSyncKeyCertificateError):
    """A device sync-key certificate that does not verify or is not of its form."""

    code = "bad_device_sync_key_certificate"


class DeviceSyncKeys:
    """This device's sync key and the device sync keys known here (sync did -> device)."""

    def __init__(self, vault: Vault | None = None) -> None:
        self.vault = vault
        self._key: SyncKey | None = None
        self._own: str | None = None  # the device the key in memory is certified by
        #: sync-key did -> (device did, certificate), verified certificates only.
        self.known: dict[str, tuple[str, str]] = {}
        if vault is not None:
            for sync_did, data in vault.all(CERT_KIND):
                stored = json.loads(data)
                self.known[sync_did] = (str(stored["device"]), str(stored["compact"]))

    def signer(self, device: KeyHandle) -> SyncKey:
        """This device's sync key: made and certified by ``device`` (one token
        signature) the first time it is needed, then loaded from the vault."""
        if self._key is not None and self._own == device.did:
            return self._key
        seed = None if self.vault is None else self.vault.get(KEY_KIND, device.did)
        if seed is not None:
            key = SyncKey(seed)
        else:
            key = SyncKey.generate()
            cert = certify(device, key, typ=CERT_TYP)
            record = _record(device.did, cert.compact)
            if self.vault is not None:
                with self.vault.transaction() as tx:
                    tx.put(KEY_KIND, device.did, key.seed)
                    tx.put(CERT_KIND, key.did, record)
            self.known[key.did] = (device.did, cert.compact)
        self._key, self._own = key, device.did
        return key

    def device_of(self, author: str) -> str | None:
        entry = self.known.get(author)
        return None if entry is None else entry[0]

    def certificates(self, authors: Iterable[str]) -> list[str]:
        """The certificates of these authors known here (for a batch that holds them)."""
        return [self.known[a][1] for a in sorted(set(authors)) if a in self.known]

    def learn(self, compacts: object, known_device: Callable[[str], bool]) -> None:
        """The certificates a batch carries: every one is verified before any is kept
        (a bad one refuses the batch, nothing kept); those of a device no list here
        names are not kept, so their messages are refused as uncertified."""
        if not isinstance(compacts, list) or len(compacts) > 64:
            raise BadDeviceSyncKeyCertificateError("a batch carries a list of at most 64 keys")
        fresh: dict[str, tuple[str, str]] = {}
        for compact in compacts:
            try:
                cert = parse_certificate(compact, typ=CERT_TYP)
            except BadSyncKeyCertificateError as exc:
                raise BadDeviceSyncKeyCertificateError(str(exc)) from None
            if cert.sync_did not in self.known and known_device(cert.root_did):
                fresh[cert.sync_did] = (cert.root_did, cert.compact)
        if not fresh:
            return
        if self.vault is not None:
            with self.vault.transaction() as tx:
                for sync_did, (device, compact) in fresh.items():
                    tx.put(CERT_KIND, sync_did, _record(device, compact))
        self.known.update(fresh)


def _record(device: str, compact: str) -> bytes:
    return json.dumps({"device": device, "compact": compact}).encode()
