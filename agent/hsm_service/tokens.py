"""The tokens behind the service: opened once with their PINs, recovered once when lost.

The PINs are read here, from each ``[[token]]``'s pin-source, and go nowhere else: the
fronts see labels and public keys only.  Opening, finding and using keys is
janus_hsm's PKCS#11 backend (one logged-in session per token, re-opened once on a
lost session); this module adds the second level of recovery the service needs when
the token itself was re-created under it (SoftHSM re-initialised, an HSM swapped):
the provider is opened anew and the key looked up again, once, and otherwise the
request fails with :class:`TokenUnavailable` rather than waiting.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Mechanism, ObjectClass

from agent.hsm_service.config import ServiceConfig, TokenConfig
from agent.hsm_service.errors import ConfigError, InvalidRequest, TokenUnavailable
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.backends.pkcs11.handle import Pkcs11KeyHandle
from janus_hsm.errors import (
    BackendError,
    JanusHSMError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    PinError,
    PinUnavailableError,
    TokenLostError,
    TokenNotFoundError,
)
from janus_hsm.pin import PinSource, pin_source_path, read_pin_file
from janus_hsm.public_keys import PublicKey, PublicKeyFormatError, algorithm_of
from janus_hsm.uri import Pkcs11Uri

T = TypeVar("T")

# The raw mechanisms a p11-kit client may ask for by number: signatures only, with the
# key types Janus keeps.  Anything else (derivation into a session key, wrapping…)
# is not offered through the service.
_ECDSA: Final = frozenset(
    {int(Mechanism.ECDSA), int(Mechanism.ECDSA_SHA256), int(Mechanism.ECDSA_SHA384)}
)
RAW_SIGN_MECHANISMS: Final = {
    Algorithm.ES256: _ECDSA,
    Algorithm.ES384: _ECDSA,
    Algorithm.EdDSA: frozenset({int(Mechanism.EDDSA)}),
}


def check_feasible(
    algorithm: Algorithm, operation: str, payload: bytes, mechanism: int | None
) -> None:
    """InvalidRequest for what the token would refuse anyway (a mechanism the key's
    type does not take, a peer key of another curve), so that it is refused before
    anything is decided, counted or audited."""
    if operation == "sign":
        if not algorithm.can_sign:
            raise InvalidRequest(f"a {algorithm.value} key cannot sign")
        offered = RAW_SIGN_MECHANISMS.get(algorithm, frozenset())
        if mechanism is not None and mechanism not in offered:
            raise InvalidRequest(
                f"mechanism 0x{mechanism:x} is not offered for signing with a {algorithm.value} key"
            )
    elif operation == "ecdh":
        if not algorithm.can_exchange:
            raise InvalidRequest(f"a {algorithm.value} key cannot do key agreement")
        if mechanism is not None and mechanism != int(Mechanism.ECDH1_DERIVE):
            raise InvalidRequest(f"mechanism 0x{mechanism:x} is not offered for ECDH")
        try:
            peer_algorithm = algorithm_of(peer_public_key(payload))
        except PublicKeyFormatError:
            peer_algorithm = None
        if peer_algorithm is not algorithm:
            raise InvalidRequest(f"the peer public key is not a {algorithm.value} key")
    elif mechanism is not None:
        raise InvalidRequest(f"no mechanism is taken for {operation}")


def peer_public_key(spki_der: bytes) -> PublicKey:
    """A peer's SubjectPublicKeyInfo (DER), or InvalidRequest."""
    try:
        peer: Any = load_der_public_key(spki_der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidRequest("the peer public key is not a DER SubjectPublicKeyInfo") from None
    key: PublicKey = peer
    return key


class _Lost(Exception):
    """The token or its session was lost (args[0]: the error code): open it again."""


def pin_reader(source: str, token: str) -> PinSource:
    """A callable reading the PIN at login time (never at configuration time)."""
    if source.startswith("env:"):
        name = source[4:]

        def from_environment() -> str:
            pin = os.environ.get(name, "")
            if not pin:
                raise PinUnavailableError(f"the PIN variable {name} for token {token!r} is not set")
            return pin

        return from_environment
    path = pin_source_path(source)
    return lambda: read_pin_file(path)


class TokenSet:
    """Every declared token, opened, and the keys on them by URI."""

    def __init__(self, config: ServiceConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._providers: dict[str, Pkcs11Provider] = {}
        self._handles: dict[str, Pkcs11KeyHandle] = {}

    def open_all(self) -> None:
        for token in self._config.tokens:
            self._provider(token.name)

    def _token_uri(self, token: TokenConfig) -> Pkcs11Uri:
        return Pkcs11Uri({"token": token.token}, {"module-path": token.module})

    def _provider(self, name: str, *, fresh: bool = False) -> Pkcs11Provider:
        with self._lock:
            provider = self._providers.get(name)
            if provider is not None and not fresh:
                return provider
            token = self._config.token(name)
            try:
                provider = Pkcs11Provider.open(
                    self._token_uri(token), pin_source=pin_reader(token.pin_source, token.name)
                )
                provider.token_session.token  # noqa: B018 - finds the token now, not later
            except TokenNotFoundError as exc:
                raise TokenUnavailable(f"token {name!r}: {exc}") from None
            except PinError as exc:
                raise TokenUnavailable(f"token {name!r}: {exc}") from None
            except JanusHSMError as exc:
                raise TokenUnavailable(f"token {name!r} cannot be opened: {exc}") from None
            self._providers[name] = provider
            self._handles = {
                k: h for k, h in self._handles.items() if not k.startswith(name + "\0")
            }
            return provider

    def lookup(self, token: str, uri: str, *, fresh: bool = False) -> Pkcs11KeyHandle:
        """The key at ``uri`` on ``token`` (KeyNotFoundError if it is not there)."""
        cache = f"{token}\0{uri}"
        if not fresh:
            handle = self._handles.get(cache)
            if handle is not None:
                return handle
        provider = self._provider(token)
        handle = provider.lookup(uri)
        self._handles[cache] = handle
        return handle

    def exists(self, token: str, uri: str) -> bool:
        try:
            self.recovering(token, uri, lambda h: None)
        except KeyNotFoundError:
            return False
        return True

    def recovering(self, token: str, uri: str, operation: Callable[[Pkcs11KeyHandle], T]) -> T:
        """``operation(handle)``; if the token or its session was lost, open the token
        again and retry once; then TokenUnavailable.  A key that is really absent after
        the token was opened afresh is KeyNotFoundError."""
        # A key missing from a cached handle's session may be a session gone stale (the
        # token was re-initialised): look again.  Missing on a fresh lookup is final.
        cached = f"{token}\0{uri}" in self._handles
        try:
            return self._translated(lambda: operation(self.lookup(token, uri)), last=not cached)
        except _Lost:
            pass
        self.forget(token)
        try:
            return self._translated(
                lambda: operation(self.lookup(token, uri, fresh=True)), last=True
            )
        except _Lost as lost:
            raise TokenUnavailable(
                f"token {token!r} was lost and could not be re-opened ({lost.args[0]})"
            ) from None

    @staticmethod
    def _translated(call: Callable[[], T], *, last: bool = False) -> T:
        try:
            return call()
        except (MechanismUnsupportedError, PublicKeyFormatError) as exc:
            raise InvalidRequest(str(exc)) from None
        except KeyNotFoundError as exc:
            if last:
                raise
            raise _Lost(exc.code) from None
        except (TokenLostError, TokenNotFoundError, BackendError) as exc:
            raise _Lost(exc.code) from None
        except TokenUnavailable as exc:  # opening the provider failed
            raise _Lost(exc.code) from None
        except JanusHSMError as exc:  # a PIN that cannot be read, a locked PIN…
            raise TokenUnavailable(f"the token cannot be used ({exc.code})") from None

    def forget(self, token: str) -> None:
        with self._lock:
            provider = self._providers.pop(token, None)
            self._handles = {
                k: h for k, h in self._handles.items() if not k.startswith(token + "\0")
            }
        if provider is not None:
            with contextlib.suppress(JanusHSMError):
                provider.close()

    # -- operations

    def sign(self, token: str, uri: str, data: bytes, mechanism: int | None) -> bytes:
        if mechanism is None:
            return self.recovering(token, uri, lambda h: h.sign(data))
        mech = Mechanism(mechanism)  # check_feasible admitted it for this key

        def raw(handle: Pkcs11KeyHandle) -> bytes:
            # The backend's KeyHandle signs in the Janus formats only; a p11-kit client
            # asks for a mechanism by number, so the call is made on the same session.
            session = self._provider(token).token_session
            return bytes(
                session.run(
                    lambda s: session.object(
                        s, ObjectClass.PRIVATE_KEY, handle.key_id, handle.label
                    ).sign(data, mechanism=mech),
                    what=f"signing with {mech.name}",
                )
            )

        return self.recovering(token, uri, raw)

    def ecdh(self, token: str, uri: str, peer_spki_der: bytes) -> bytes:
        key = peer_public_key(peer_spki_der)
        return self.recovering(token, uri, lambda h: h.exchange(key))

    def generate(self, token: str, uri: str, algorithm: Algorithm) -> Pkcs11KeyHandle:
        provider = self._provider(token)
        try:
            handle = provider.generate(uri, algorithm)
        except (TokenLostError, BackendError) as exc:
            raise TokenUnavailable(f"token {token!r}: {exc}") from None
        except JanusHSMError as exc:
            raise InvalidRequest(f"cannot generate on token {token!r}: {exc}") from None
        self._handles[f"{token}\0{uri}"] = handle
        return handle

    def destroy(self, token: str, uri: str) -> None:
        def delete(handle: Pkcs11KeyHandle) -> None:
            self._provider(token).delete(uri)

        self.recovering(token, uri, delete)
        self._handles.pop(f"{token}\0{uri}", None)

    def close(self) -> None:
        for name in list(self._providers):
            self.forget(name)


def check_keys_present(config: ServiceConfig, tokens: TokenSet) -> None:
    """Refuse to start when a configured key is not on its token (unless the key is
    yet to be generated, or was destroyed)."""
    for label, key in config.keys.items():
        if "generate" in key.operations or key.state == "destroyed":
            continue
        if not tokens.exists(key.token, key.uri):
            raise ConfigError(
                f"no such key on token {key.token!r}",
                source=config.source,
                field=f"key.{label}.uri",
            )
