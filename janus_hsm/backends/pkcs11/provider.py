"""The PKCS#11 key provider: generate, find, list and delete keys on one token."""

from __future__ import annotations

import os
import threading
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import (
    AmbiguousKeyError,
    ExtractableKeyError,
    KeyExistsError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    UriError,
)
from janus_hsm.pin import PinSource, resolve_pin_source
from janus_hsm.provider import KeyProperties, KeyProvider
from janus_hsm.public_keys import public_key_from_raw
from janus_hsm.uri import Pkcs11Uri, format_id

from .encoding import algorithm_from_ec_params, ec_params_for, point_from_ec_point
from .handle import Pkcs11KeyHandle
from .module import load_module, resolve_module_path
from .session import TokenSession, find_token_typed

BACKEND = "pkcs11"
_KEY_TYPES = {
    Algorithm.ES256: KeyType.EC,
    Algorithm.ES384: KeyType.EC,
    Algorithm.EdDSA: KeyType.EC_EDWARDS,
    # SoftHSM has no CKM_EC_MONTGOMERY_KEY_PAIR_GEN; it keeps X25519 as an EC_EDWARDS
    # key with the curve25519 parameters and routes ECDH1_DERIVE to X25519.
    Algorithm.X25519: KeyType.EC_EDWARDS,
}
_GENERATE_MECHANISMS = {
    KeyType.EC: Mechanism.EC_KEY_PAIR_GEN,
    KeyType.EC_EDWARDS: Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
}
# What each algorithm's private key may be used for (and nothing more).
_PRIVATE_USAGE = {
    Algorithm.ES256: {Attribute.SIGN: True, Attribute.DERIVE: True},
    Algorithm.ES384: {Attribute.SIGN: True, Attribute.DERIVE: True},
    Algorithm.EdDSA: {Attribute.SIGN: True, Attribute.DERIVE: False},
    Algorithm.X25519: {Attribute.SIGN: False, Attribute.DERIVE: True},
}
_CUSTODY_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
}

_sessions: dict[tuple[str, str, bytes], TokenSession] = {}
_sessions_lock = threading.Lock()


class Pkcs11Provider(KeyProvider):
    """Keys on one PKCS#11 token. Thread-safe; one logged-in session per token per process."""

    def __init__(
        self, token_session: TokenSession, base_uri: Pkcs11Uri, *, allow_extractable: bool
    ) -> None:
        self._ts = token_session
        self._base_uri = base_uri
        self.allow_extractable = allow_extractable

    @classmethod
    def open(
        cls,
        uri: str | Pkcs11Uri,
        *,
        pin_source: PinSource | None = None,
        allow_extractable: bool = False,
    ) -> Pkcs11Provider:
        """Open the token a URI names (its object attributes, if any, are ignored here)."""
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        module = load_module(resolve_module_path(parsed.module_path, parsed.module_name))
        token_uri = parsed.token_uri()
        with module.lock:
            module.check_process()
            token = find_token_typed(module, token_uri)
            identity = (module.path, str(token.label), bytes(token.serial or b""))
        if pin_source is None:
            pin_source = resolve_pin_source(
                parsed.pin_source, prompt=f"PIN for token '{token.label}': "
            )
        with _sessions_lock:
            session = _sessions.get(identity)
            if session is None or session.module is not module:
                session = TokenSession(module, token_uri, pin_source)
                _sessions[identity] = session
            else:
                # PKCS#11 login state is per process: once logged in, every provider on
                # this token shares it. Until then, the newest PIN source is the one used.
                session.replace_pin_source(pin_source)
        # Keys this provider prints are named by label (and module, when one was given).
        query = {k: v for k, v in parsed.query.items() if k in ("module-path", "module-name")}
        base = Pkcs11Uri({"token": str(token.label)}, query)
        return cls(session, base, allow_extractable=allow_extractable)

    @property
    def token_session(self) -> TokenSession:
        return self._ts

    @property
    def token_uri(self) -> str:
        return str(self._base_uri)

    def generate(self, uri: str | Pkcs11Uri, algorithm: Algorithm) -> Pkcs11KeyHandle:
        parsed = _as_uri(uri)
        label = parsed.object
        if not label:
            raise UriError("to generate a key the URI must name it with object=<label>")
        if parsed.type not in (None, "private"):
            raise UriError("to generate a key pair, leave type= out or use type=private")
        key_id = parsed.id or os.urandom(16)
        key_type = _KEY_TYPES[algorithm]

        def generate(session: Any) -> None:
            by_label = list(session.get_objects({Attribute.LABEL: label}))
            by_id = list(session.get_objects({Attribute.ID: key_id}))
            if by_label or by_id:
                raise KeyExistsError(
                    f"{self._ts.describe()} already has an object "
                    + (f"labelled {label!r}" if by_label else f"with id={format_id(key_id)}")
                    + "; Janus never creates a second key under one name. Pick another "
                    "name, or delete the old key first"
                )
            mechanism = _GENERATE_MECHANISMS[key_type]
            if mechanism not in self._ts.token.slot.get_mechanisms():
                raise MechanismUnsupportedError(
                    f"{self._ts.describe()} cannot generate {algorithm.value} keys "
                    f"(no {mechanism.name})"
                )
            params = session.create_domain_parameters(
                key_type, {Attribute.EC_PARAMS: ec_params_for(algorithm)}, local=True
            )
            params.generate_keypair(
                store=True,
                id=key_id,
                label=label,
                capabilities=MechanismFlag(0),
                mechanism=mechanism,
                public_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.VERIFY: algorithm.can_sign,
                    Attribute.ENCRYPT: False,
                    Attribute.WRAP: False,
                },
                private_template={**_CUSTODY_TEMPLATE, **_PRIVATE_USAGE[algorithm]},
            )
            self._ts.forget()

        self._ts.run(generate, what=f"{algorithm.value} key generation")
        handle = self._load(key_id, label)
        props = handle.properties
        if not props.custody_grade:
            # The token ignored the template: such a key must not exist under our name.
            self._destroy(key_id, label)
            raise ExtractableKeyError(
                f"{self._ts.describe()} created {label!r} without the protection Janus asked "
                f"for ({props.as_dict()}); the key was destroyed. Check the token's policy"
            )
        return handle

    def lookup(self, uri: str | Pkcs11Uri) -> Pkcs11KeyHandle:
        parsed = _as_uri(uri)
        if parsed.type not in (None, "private"):
            raise UriError(
                f"type={parsed.type} names a {parsed.type} object; Janus works with key pairs, "
                "so use type=private or leave type= out"
            )
        if not parsed.names_object():
            raise UriError("the URI must name a key with object=<label> and/or id=<bytes>")
        attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if parsed.object is not None:
            attrs[Attribute.LABEL] = parsed.object
        if parsed.id is not None:
            attrs[Attribute.ID] = parsed.id

        def lookup(session: Any) -> list[tuple[bytes, str]]:
            return [
                (bytes(o[Attribute.ID] or b""), str(o[Attribute.LABEL]))
                for o in session.get_objects(attrs)
            ]

        found = self._ts.run(lookup, what="key lookup")
        name = repr(parsed.object) if parsed.object else f"id={format_id(parsed.id or b'')}"
        if not found:
            raise KeyNotFoundError(
                f"no private key {name} on {self._ts.describe()}; "
                f"`janus keys list {self._base_uri}` shows the keys there"
            )
        if len(found) > 1:
            raise AmbiguousKeyError(
                f"{len(found)} private keys on {self._ts.describe()} match {name}; "
                "add id= to the URI to choose one"
            )
        return self._load(*found[0])

    def list_keys(self) -> list[Pkcs11KeyHandle]:
        def ids(session: Any) -> list[tuple[bytes, str]]:
            return [
                (bytes(o[Attribute.ID] or b""), str(o[Attribute.LABEL]))
                for o in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            ]

        handles = []
        for key_id, label in self._ts.run(ids, what="listing keys"):
            try:
                handles.append(self._load(key_id, label))
            except MechanismUnsupportedError:
                continue  # RSA and other keys Janus does not handle
        return handles

    def delete(self, uri: str | Pkcs11Uri) -> None:
        handle = self.lookup(uri)
        self._destroy(handle.key_id, handle.label)

    def close(self) -> None:
        self._ts.close()

    def _destroy(self, key_id: bytes, label: str) -> None:
        def destroy(session: Any) -> None:
            attrs: dict[Attribute, Any] = (
                {Attribute.ID: key_id} if key_id else {Attribute.LABEL: label}
            )
            for obj in list(session.get_objects(attrs)):
                if obj[Attribute.CLASS] in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    obj.destroy()
            self._ts.forget()

        self._ts.run(destroy, what="key deletion")

    def _load(self, key_id: bytes, label: str) -> Pkcs11KeyHandle:
        def read(session: Any) -> tuple[KeyProperties, bytes]:
            private = self._ts.object(session, ObjectClass.PRIVATE_KEY, key_id, label)
            try:
                key_type = private[Attribute.KEY_TYPE]
            except ValueError:  # a CKK_* value python-pkcs11 has no constant for
                raise MechanismUnsupportedError(
                    f"{label!r} has a key type Janus cannot use"
                ) from None
            if key_type not in (KeyType.EC, KeyType.EC_EDWARDS):
                raise MechanismUnsupportedError(f"{label!r} is a {key_type.name} key")
            algorithm = algorithm_from_ec_params(bytes(private[Attribute.EC_PARAMS]))
            flags = {
                a: bool(private[a])
                for a in (
                    Attribute.SENSITIVE,
                    Attribute.EXTRACTABLE,
                    Attribute.ALWAYS_SENSITIVE,
                    Attribute.NEVER_EXTRACTABLE,
                    Attribute.LOCAL,
                )
            }
            props = KeyProperties(
                algorithm=algorithm,
                sensitive=flags[Attribute.SENSITIVE],
                extractable=flags[Attribute.EXTRACTABLE],
                always_sensitive=flags[Attribute.ALWAYS_SENSITIVE],
                never_extractable=flags[Attribute.NEVER_EXTRACTABLE],
                local=flags[Attribute.LOCAL],
                backend=BACKEND,
            )
            return props, self._public_point(session, key_id, label, algorithm)

        props, point = self._ts.run(read, what="reading key attributes")
        path: dict[str, Any] = {"object": label, "type": "private"}
        if key_id:
            path["id"] = key_id
        return Pkcs11KeyHandle(
            self._ts,
            uri=str(self._base_uri.with_path(**path)),
            key_id=key_id,
            label=label,
            properties=props,
            public_key=public_key_from_raw(props.algorithm, point),
            allow_extractable=self.allow_extractable,
        )

    def _public_point(self, session: Any, key_id: bytes, label: str, alg: Algorithm) -> bytes:
        attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
        attrs.update({Attribute.ID: key_id} if key_id else {Attribute.LABEL: label})
        publics = list(session.get_objects(attrs))
        if len(publics) == 1:
            return point_from_ec_point(alg, bytes(publics[0][Attribute.EC_POINT]))
        try:  # PKCS#11 3.0 tokens may keep EC_POINT on the private key as well
            private = self._ts.object(session, ObjectClass.PRIVATE_KEY, key_id, label)
            return point_from_ec_point(alg, bytes(private[Attribute.EC_POINT]))
        except pkcs11.PKCS11Error:
            pass
        raise KeyNotFoundError(
            f"private key {label!r} on {self._ts.describe()} has "
            f"{'no' if not publics else 'several'} matching public key objects; "
            "import its public key with the same id"
        )


def _as_uri(uri: str | Pkcs11Uri) -> Pkcs11Uri:
    return uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
