"""The registry of FIDO2 credentials enrolled to protect software keystores.

Approvers live in the approver registry of :mod:`policies.approvals` (it holds their
public keys, which verification needs); this file holds the keystore credentials, which
have no public key that matters (only their hmac-secret does).  Nothing in it is
secret: credential ids, RP IDs, labels.  It is parsed strictly and replaced atomically
(temp file, fsync, rename, mode 0600), so a bad file is refused and changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from janus_hsm import strictjson
from janus_hsm.atomic_file import replace_file
from janus_hsm.backends.software.keyfile import HmacSecretRecipient, b64d, b64e
from janus_hsm.errors import KeystoreError
from janus_hsm.fido2.errors import Fido2RegistryError

REGISTRY_TYP = "janus-fido2-credentials/1"
MAX_REGISTRY = 256 * 1024
_ENTRY_FIELDS = frozenset({"label", "credential_id", "rp_id", "uv", "aaguid", "created"})
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_AAGUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


#: The default RP ID of keystore credentials.  A reserved name (RFC 2606 ``.invalid``)
#: no website can own, so no web page can ever ask a browser for these credentials.
KEYSTORE_RP_ID = "keystore.janus.invalid"


def default_directory() -> Path:
    """Where ``janus fido2`` keeps its registries: the user's data dir, like the keystore."""
    import platformdirs

    return Path(platformdirs.user_data_dir("janus")) / "fido2"


@dataclass(frozen=True)
class KeystoreCredential:
    """A credential enrolled for keystore protection."""

    recipient: HmacSecretRecipient
    aaguid: str
    created: str

    @property
    def label(self) -> str:
        return self.recipient.label

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.recipient.label,
            "credential_id": b64e(self.recipient.credential_id),
            "rp_id": self.recipient.rp_id,
            "uv": self.recipient.uv,
            "aaguid": self.aaguid,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, obj: Any, what: str) -> KeystoreCredential:
        if not isinstance(obj, dict) or set(obj) != _ENTRY_FIELDS:
            raise Fido2RegistryError(
                f"{what} must be an object with exactly {', '.join(sorted(_ENTRY_FIELDS))}"
            )
        if not isinstance(obj["aaguid"], str) or not _AAGUID.fullmatch(obj["aaguid"]):
            raise Fido2RegistryError(f"{what}: aaguid must be a lower-case UUID")
        if not isinstance(obj["created"], str) or not _TIMESTAMP.fullmatch(obj["created"]):
            raise Fido2RegistryError(f"{what}: created must look like 2025-01-31T12:00:00Z")
        try:
            recipient = HmacSecretRecipient(
                b64d(obj["credential_id"], f"{what}: credential_id"),
                obj["rp_id"],
                obj["uv"],
                obj["label"],
            )
        except KeystoreError as exc:
            raise Fido2RegistryError(f"{what}: {exc}") from None
        return cls(recipient, obj["aaguid"], obj["created"])


@dataclass(frozen=True)
class CredentialRegistry:
    """The enrolled keystore credentials; labels and credential ids are unique."""

    credentials: tuple[KeystoreCredential, ...] = ()

    def __post_init__(self) -> None:
        labels = [c.label for c in self.credentials]
        ids = [c.recipient.credential_id for c in self.credentials]
        if len(set(labels)) != len(labels) or len(set(ids)) != len(ids):
            raise Fido2RegistryError("the same label or credential is registered twice")

    def get(self, label: str) -> KeystoreCredential | None:
        return next((c for c in self.credentials if c.label == label), None)

    def with_credential(self, credential: KeystoreCredential) -> CredentialRegistry:
        return CredentialRegistry((*self.credentials, credential))

    def without(self, label: str) -> CredentialRegistry:
        if self.get(label) is None:
            raise Fido2RegistryError(f"no keystore credential {label!r} is registered")
        return CredentialRegistry(tuple(c for c in self.credentials if c.label != label))

    def recipients(self) -> list[HmacSecretRecipient]:
        return [c.recipient for c in self.credentials]

    def to_bytes(self) -> bytes:
        doc = {"typ": REGISTRY_TYP, "credentials": [c.to_json() for c in self.credentials]}
        return strictjson.canonical_json(doc, ascii_only=True) + b"\n"

    @classmethod
    def loads(cls, data: bytes, source: str) -> CredentialRegistry:
        if len(data) > MAX_REGISTRY:
            raise Fido2RegistryError(f"{source} is too large to be a credential registry")
        obj = strictjson.loads_object(data, source, error=Fido2RegistryError)
        if set(obj) != {"typ", "credentials"} or obj["typ"] != REGISTRY_TYP:
            raise Fido2RegistryError(f"{source}: not a {REGISTRY_TYP} credential registry")
        entries = obj["credentials"]
        if not isinstance(entries, list):
            raise Fido2RegistryError(f"{source}: credentials must be an array")
        return cls(
            tuple(
                KeystoreCredential.from_json(e, f"{source}: credential #{i}")
                for i, e in enumerate(entries, 1)
            )
        )

    @classmethod
    def load(cls, path: Path) -> CredentialRegistry:
        """The registry at ``path``; an empty one if the file does not exist."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise Fido2RegistryError(f"cannot read {path}: {exc.strerror}") from None
        return cls.loads(data, str(path))

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_bytes())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` (mode 0600) so that a crash leaves the old file or the new."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_file(path, data)
    except OSError as exc:
        raise Fido2RegistryError(f"cannot write {path}: {exc.strerror}") from None


__all__ = ["REGISTRY_TYP", "CredentialRegistry", "KeystoreCredential", "default_directory"]
