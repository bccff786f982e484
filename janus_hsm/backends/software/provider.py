"""The software key provider: a directory of ``.jkey`` files, one key per file.

Software keys exist for cloud agents, which run on machines the owner does not control
and hold only delegated, limited-use authority: one fresh key per grant, destroyed when
the grant ends.  They are extractable by nature (whoever has the file and its secret
has the key), which their properties say, so custody checks refuse them unless the
caller opts in with ``allow_extractable``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import (
    ExtractableKeyError,
    KeyExistsError,
    KeyNotFoundError,
    KeystoreError,
    UriError,
)
from janus_hsm.pin import resolve_pin_source
from janus_hsm.provider import KeyHandle, KeyProvider

from . import keyfile
from .handle import SoftwareKeyHandle
from .keyfile import HmacSecretRecipient, HmacSecretSource, KeyFile, PrivateKey, WrappingKey
from .uri import OBJECT_NAME, SoftwareUri

log = logging.getLogger(__name__)


class SoftwareProvider(KeyProvider):
    """Keys in one keystore directory. Thread-safe, and safe with several processes."""

    def __init__(
        self,
        directory: Path,
        *,
        passphrase_source: Callable[[], str],
        allow_extractable: bool,
        wrapping_key: KeyHandle | None,
        hmac_secret: HmacSecretSource | None = None,
    ) -> None:
        if wrapping_key is not None and hmac_secret is not None:
            raise KeystoreError(
                "give a wrapping key or FIDO2 credentials (hmac_secret) for new keys, not both"
            )
        self._directory = directory
        self._hmac_secret = hmac_secret
        self._passphrase_source = passphrase_source
        self.allow_extractable = allow_extractable
        self._wrapping_handle = wrapping_key
        self._wrapping: WrappingKey | None = None
        if wrapping_key is not None:
            self._wrapping = WrappingKey(
                wrapping_key.uri, wrapping_key.public_key(), wrapping_key.exchange
            )
        self._handles: weakref.WeakSet[SoftwareKeyHandle] = weakref.WeakSet()
        self._handles_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(
        cls,
        uri: str | SoftwareUri,
        *,
        passphrase_source: Callable[[], str] | None = None,
        allow_extractable: bool = False,
        wrapping_key: KeyHandle | None = None,
        hmac_secret: HmacSecretSource | None = None,
    ) -> SoftwareProvider:
        """Open the keystore a ``soft:`` URI names (its ``object``, if any, is ignored).

        The passphrase is looked for only when a key is generated or unlocked, in this
        order: ``passphrase_source``, the URI's ``pin-source``, ``JANUS_PIN``, a prompt.
        With ``wrapping_key``, new keys are wrapped to that key instead, and keys that
        were wrapped to it can be unlocked; passphrase-protected keys still need the
        passphrase.  Nothing is created on disk until the first key is generated.
        """
        parsed = uri if isinstance(uri, SoftwareUri) else SoftwareUri.parse(uri)
        directory = parsed.directory
        if not directory.is_absolute():
            raise UriError(f"the keystore directory {directory} must be absolute")
        if passphrase_source is None:
            passphrase_source = resolve_pin_source(
                parsed.pin_source, prompt=f"Passphrase for keystore {directory}: "
            )
        return cls(
            directory,
            passphrase_source=passphrase_source,
            allow_extractable=allow_extractable,
            wrapping_key=wrapping_key,
            hmac_secret=hmac_secret,
        )

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def store_uri(self) -> str:
        """The keystore's URI, as ``janus keys list`` takes it."""
        return str(SoftwareUri(dir=str(self._directory)))

    @property
    def wrapping_key(self) -> KeyHandle | None:
        return self._wrapping_handle

    def key_uri(self, name: str) -> str:
        return str(SoftwareUri(dir=str(self._directory), object=name))

    def generate(self, uri: str | SoftwareUri, algorithm: Algorithm) -> SoftwareKeyHandle:
        """Create ``object`` in the keystore; refuses names in use and, unless
        ``allow_extractable``, refuses outright, since the key could not be used."""
        name = self._name(uri, "to generate a key the URI must name it with object=<name>")
        self._check_open()
        if not self.allow_extractable:
            # Refuse before writing: a key nobody may use is only a file to clean up.
            raise ExtractableKeyError(
                f"refusing to generate {self.key_uri(name)}: software keys are extractable "
                "by nature (whoever has the file and its secret has the key) and are meant "
                "for cloud agents. Pass --allow-extractable (allow_extractable=True) if "
                "that is what you want"
            )
        algorithm = Algorithm(algorithm)
        self._refuse_existing(name)  # before asking for a passphrase, to fail early
        private = keyfile.generate_private_key(algorithm)
        # Sealed outside the lock: it may prompt, or use a token, and must not hold up
        # other writers meanwhile.
        sealed = self._seal(name, private)
        with self._write_lock(create=True):
            self._refuse_existing(name)
            keyfile.remove_stale_temp_files(self._directory)
            keyfile.write_new_key_file(self._directory, sealed)
        log.info("generated %s key %s", algorithm.value, self.key_uri(name))
        handle = self._handle(sealed)
        handle._private = private  # just generated: no need to decrypt it
        return handle

    def find(self, uri: str | SoftwareUri) -> SoftwareKeyHandle:
        """The key ``uri`` names; refused (ExtractableKeyError) unless allow_extractable."""
        handle = self.lookup(uri)
        handle.check_custody()
        return handle

    def lookup(self, uri: str | SoftwareUri) -> SoftwareKeyHandle:
        """The key ``uri`` names, without the custody check (for showing and deleting).

        Reads the file but needs no secret: the key is decrypted on first use.
        """
        name = self._name(uri, "the URI must name a key with object=<name>")
        self._check_open()
        key_file = keyfile.read_key_file(self._directory, name)
        if key_file is None:
            raise self._not_found(name)
        return self._handle(key_file)

    def fido2_credentials(self, uri: str | SoftwareUri) -> list[HmacSecretRecipient]:
        """The FIDO2 credentials a key is sealed for ([] for passphrase or wrapped keys).

        Read from the key file itself, so a lost security key can still be dropped by
        label after it left every registry.
        """
        name = self._name(uri, "the URI must name a key with object=<name>")
        self._check_open()
        key_file = keyfile.read_key_file(self._directory, name)
        if key_file is None:
            raise self._not_found(name)
        return keyfile.hmac_secret_recipients(key_file)

    def list_keys(self) -> list[SoftwareKeyHandle]:
        """Every readable key, without asking for a secret; unreadable files are skipped
        with a warning (``find`` on one of them says what is wrong)."""
        self._check_open()
        handles: list[SoftwareKeyHandle] = []
        for name in keyfile.list_names(self._directory, _valid_name):
            try:
                key_file = keyfile.read_key_file(self._directory, name)
            except KeystoreError as exc:
                log.warning("skipping %s: %s", self.key_uri(name), exc)
                continue
            if key_file is not None:  # deleted while we listed
                handles.append(self._handle(key_file))
        return handles

    def delete(self, uri: str | SoftwareUri) -> None:
        """Remove the key file; handles to it in this process stop working at once.

        Deleting needs no secret (as with a token, where deleting needs only a login),
        and the file is unlinked, not overwritten: on journalled and flash storage an
        overwrite does not reach the old blocks anyway.  The key stays encrypted there.
        """
        name = self._name(uri, "the URI must name a key with object=<name>")
        self._check_open()
        if not self._directory.is_dir():
            raise self._not_found(name)
        with self._write_lock(create=False):
            if not keyfile.remove_key_file(self._directory, name):
                raise self._not_found(name)
        for handle in self._live_handles():
            if handle.name == name:
                handle._forget("deleted")
        log.info("deleted key %s", self.key_uri(name))

    def close(self) -> None:
        """Drop every decrypted key this provider's handles hold."""
        self._closed = True
        for handle in self._live_handles():
            handle._forget("closed")

    # --- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KeystoreError(f"the provider for {self.store_uri} was closed; open it again")

    def _name(self, uri: str | SoftwareUri, missing: str) -> str:
        parsed = uri if isinstance(uri, SoftwareUri) else SoftwareUri.parse(uri)
        if parsed.object is None:
            raise UriError(missing)
        # A URI without dir= means "this keystore" here; one with dir= must agree.
        if parsed.dir is not None and posixpath.normpath(parsed.dir) != posixpath.normpath(
            str(self._directory)
        ):
            raise UriError(
                f"{parsed.without_query()} names keystore {parsed.dir}, but this provider is "
                f"open on {self._directory}; open that keystore instead"
            )
        return parsed.object

    def _not_found(self, name: str) -> KeyNotFoundError:
        return KeyNotFoundError(
            f"no key {name!r} in keystore {self._directory}; "
            f"`janus keys list {self.store_uri}` shows the keys there"
        )

    def _refuse_existing(self, name: str) -> None:
        if os.path.lexists(keyfile.key_path(self._directory, name)):
            raise KeyExistsError(
                f"{self.store_uri} already has a key named {name!r}; Janus never replaces "
                "a key. Pick another name, or delete the old key first"
            )

    def _write_lock(self, *, create: bool) -> AbstractContextManager[None]:
        keyfile.ensure_directory(self._directory, create=create)
        return keyfile.locked(self._directory)

    def rewrap(
        self,
        uri: str | SoftwareUri,
        *,
        add: list[HmacSecretRecipient] | tuple[HmacSecretRecipient, ...] = (),
        remove: list[bytes] | tuple[bytes, ...] = (),
    ) -> SoftwareKeyHandle:
        """Enrol (``add``) or drop (``remove``, by credential id) FIDO2 credentials of a
        fido2-hmac-secret key: opens it with any connected enrolled credential and
        replaces the file atomically.  How to recover from a lost security key."""
        name = self._name(uri, "the URI must name a key with object=<name>")
        self._check_open()
        if self._hmac_secret is None:
            raise KeystoreError("rewrapping needs the provider opened with hmac_secret")
        with self._write_lock(create=False):
            key_file = keyfile.read_key_file(self._directory, name)
            if key_file is None:
                raise self._not_found(name)
            rewrapped = keyfile.rewrap_hmac_secret(
                key_file, source=self._hmac_secret, add=add, remove=remove, where=self.key_uri(name)
            )
            keyfile.write_new_key_file(self._directory, rewrapped)
        log.info(
            "rewrapped key %s for %d credential(s)",
            self.key_uri(name),
            len(keyfile.hmac_secret_recipients(rewrapped)),
        )
        return self._handle(rewrapped)

    def _seal(self, name: str, private: PrivateKey) -> KeyFile:
        # A source with no enrolled credentials only opens FIDO2-protected files (how
        # open_provider sets every keystore up); new keys then use the passphrase.
        if self._hmac_secret is not None and self._hmac_secret.enrolled():
            return keyfile.seal_with_hmac_secret(
                name=name, private_key=private, source=self._hmac_secret
            )
        if self._wrapping is not None:
            return keyfile.seal_with_wrapping_key(
                name=name, private_key=private, wrapping_key=self._wrapping
            )
        return keyfile.seal_with_passphrase(
            name=name, private_key=private, passphrase=self._passphrase_source()
        )

    def _open(self, key_file: KeyFile, where: str) -> PrivateKey:
        self._check_open()
        return keyfile.open_key_file(
            key_file,
            passphrase=self._passphrase_source,
            wrapping_key=self._wrapping,
            where=where,
            hmac_secret=self._hmac_secret,
        )

    def _handle(self, key_file: KeyFile) -> SoftwareKeyHandle:
        handle = SoftwareKeyHandle(
            key_file,
            uri=self.key_uri(key_file.name),
            path=keyfile.key_path(self._directory, key_file.name),
            opener=self._open,
            allow_extractable=self.allow_extractable,
        )
        with self._handles_lock:
            self._handles.add(handle)
        return handle

    def _live_handles(self) -> list[SoftwareKeyHandle]:
        with self._handles_lock:
            return list(self._handles)


def _valid_name(name: str) -> bool:
    return OBJECT_NAME.fullmatch(name) is not None


__all__ = ["SoftwareProvider"]
