"""Keys held by an HSM service, as a Janus key backend: ``hsm+https://HOST:PORT/keys/LABEL``.

Every Janus command that takes a key URI (``janus keys sign``, ``janus grant --issuer``,
``janus edge init --token``) can then use an institutional key: the private key stays
in the service's token, the service applies the key's policy, quorum and audit, and
this backend is only its client.  ``hsm+http://`` is accepted for a loopback service
only (127.0.0.1, ::1, localhost); anywhere else the service sits behind a TLS proxy
and is named ``hsm+https://``.

Who the client is comes from the environment (URIs carry no credentials):

``JANUS_HSM_CLIENT_KEY``   the URI of the client's own key (any backend but ``hsm+``)
``JANUS_HSM_CAPABILITY``   the file of the capability bundle an administrator granted
                           to that key (``janus grant … --out FILE``)
``JANUS_HSM_APPROVAL_REQUEST`` / ``JANUS_HSM_APPROVALS``
                           for a key whose policy needs a quorum: the request written
                           by ``janus hsm request`` and the approval files approvers
                           wrote for it with ``janus hsm approve`` (paths separated by
                           the OS path separator, ``:`` on POSIX)
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from agent.hsm_service.client import HsmClient, HsmClientError
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import (
    JanusHSMError,
    KeyExistsError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    UriError,
)
from janus_hsm.pin import PinSource
from janus_hsm.provider import KeyHandle, KeyProperties, KeyProvider, SignatureFormat, der_to_raw
from janus_hsm.public_keys import PublicKey

SCHEMES: Final = ("hsm+http", "hsm+https")
CLIENT_KEY_ENV: Final = "JANUS_HSM_CLIENT_KEY"
CAPABILITY_ENV: Final = "JANUS_HSM_CAPABILITY"
APPROVAL_REQUEST_ENV: Final = "JANUS_HSM_APPROVAL_REQUEST"
APPROVALS_ENV: Final = "JANUS_HSM_APPROVALS"
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})
MAX_BUNDLE_FILE: Final = 256 * 1024


class HsmProviderError(JanusHSMError):
    """The HSM service refused or could not be reached; ``code`` is the service's."""

    code = "hsm_service"

    def __init__(self, message: str, *, code: str = "hsm_service") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class HsmUri:
    """``hsm+https://HOST:PORT/keys/LABEL`` (the label may be absent: the whole service)."""

    base: str  # http(s)://HOST:PORT
    label: str | None

    @classmethod
    def parse(cls, uri: str) -> HsmUri:
        scheme, sep, _ = uri.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in SCHEMES:
            raise UriError("an HSM service key URI is hsm+https://HOST:PORT/keys/LABEL")
        parts = urlsplit(uri[len("hsm+") :])
        if parts.username or parts.password:
            # Never echo it: a credential pasted into the URI.
            raise UriError("an hsm+ URI carries no credentials (see JANUS_HSM_CLIENT_KEY)")
        if parts.query or parts.fragment:
            raise UriError("an hsm+ URI has no query or fragment")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise UriError("the hsm+ URI's port is not a number from 0 to 65535") from None
        if not host:
            raise UriError("the hsm+ URI names no host")
        if scheme == "hsm+http" and host not in _LOOPBACK:
            raise UriError(
                "hsm+http:// is for a service on this machine (127.0.0.1, ::1, localhost); "
                "reach a remote service through its TLS proxy with hsm+https://"
            )
        path = parts.path.rstrip("/")
        label: str | None
        if path in ("", "/keys"):
            label = None
        elif path.startswith("/keys/") and "/" not in path[len("/keys/") :]:
            label = unquote(path[len("/keys/") :])
        else:
            raise UriError("an hsm+ URI's path is /keys/LABEL")
        shown_host = f"[{host}]" if ":" in host else host
        base = f"{parts.scheme}://{shown_host}" + (f":{port}" if port is not None else "")
        return cls(base, label or None)

    def key_uri(self, label: str) -> str:
        from urllib.parse import quote

        return f"hsm+{self.base}/keys/{quote(label, safe='')}"


def key_uri(service_uri: str, label: str) -> str:
    """The URI of key ``label`` at the service ``service_uri`` names."""
    return HsmUri.parse(service_uri).key_uri(label)


def _client_from_environment(base: str) -> HsmClient:
    from janus_hsm import open_key
    from policies.capability import Bundle
    from policies.errors import FormatError

    key_uri_ = os.environ.get(CLIENT_KEY_ENV, "")
    bundle_path = os.environ.get(CAPABILITY_ENV, "")
    if not key_uri_ or not bundle_path:
        raise HsmProviderError(
            f"using a key of an HSM service needs {CLIENT_KEY_ENV} (the URI of this "
            f"client's own key) and {CAPABILITY_ENV} (the file of the capability the "
            "service's administrator granted it); see docs/hsm-service.md",
            code="hsm_client_unset",
        )
    if key_uri_.lower().startswith("hsm+"):
        raise HsmProviderError(
            f"{CLIENT_KEY_ENV} must name a key of this client, not one held by the service",
            code="hsm_client_unset",
        )
    try:
        data = Path(bundle_path).read_bytes()[: MAX_BUNDLE_FILE + 1]
    except OSError as exc:
        raise HsmProviderError(
            f"cannot read {CAPABILITY_ENV} file {bundle_path}: {exc.strerror}",
            code="hsm_client_unset",
        ) from None
    try:
        bundle = Bundle.parse(data)
    except FormatError as exc:
        raise HsmProviderError(
            f"{CAPABILITY_ENV} file {bundle_path} is not a capability bundle: {exc}",
            code="hsm_client_unset",
        ) from None
    # The client's key is its identity towards the service, not a key in custody: a
    # software key of an application is the usual case.
    key = open_key(key_uri_, allow_extractable=True)
    return HsmClient(base, key, bundle)


def open_provider(
    uri: str,
    *,
    pin_source: PinSource | None = None,
    allow_extractable: bool = False,
    on_touch: Callable[[str], None] | None = None,
) -> KeyProvider:
    """The registered opener of ``hsm+http`` / ``hsm+https`` (see :func:`register`)."""
    parsed = HsmUri.parse(uri)
    # The service holds the keys' PINs: a pin_source given here has nothing to unlock.
    return HsmKeyProvider(parsed, _client_from_environment(parsed.base))


def register() -> None:
    """Make ``janus_hsm.open_provider`` / ``open_key`` serve ``hsm+`` URIs."""
    from janus_hsm import register_scheme

    for scheme in SCHEMES:
        register_scheme(scheme, open_provider)


def _service_error(exc: Exception) -> HsmProviderError:
    code = getattr(exc, "code", "hsm_service")
    if isinstance(exc, HsmClientError) and exc.reason:
        code = f"{exc.code}:{exc.reason}" if exc.code == "hsm_refused" else exc.code
    return HsmProviderError(str(exc), code=code)


class HsmKeyProvider(KeyProvider):
    """The keys one HSM service lets this client see."""

    def __init__(self, uri: HsmUri, client: HsmClient) -> None:
        self.uri = uri
        self.client = client

    def _label(self, uri: str) -> str:
        parsed = HsmUri.parse(uri)
        if parsed.base != self.uri.base:
            raise UriError("the key URI names another HSM service than this provider's")
        if parsed.label is None:
            raise UriError("the hsm+ URI names no key: give /keys/LABEL")
        return parsed.label

    def _handle(self, view: dict[str, Any]) -> HsmKeyHandle:
        return HsmKeyHandle(self, view)

    def lookup(self, uri: str) -> KeyHandle:
        label = self._label(uri)
        try:
            view = self.client.key(label)
            if not view.get("public_key"):
                raise KeyNotFoundError(f"the HSM service's key {label!r} is not generated yet")
            return self._handle(view)
        except HsmClientError as exc:
            if exc.reason == "unknown_key" or exc.status == 404:
                raise KeyNotFoundError(
                    f"the HSM service has no key {label!r} for this client"
                ) from None
            raise _service_error(exc) from None
        except Exception as exc:
            if isinstance(exc, JanusHSMError):
                raise
            raise _service_error(exc) from None

    def list_keys(self) -> Sequence[KeyHandle]:
        try:
            views = self.client.list_keys()
        except Exception as exc:
            raise _service_error(exc) from None
        # A key the service will generate later has no public key yet: not a key here.
        return [self._handle(view) for view in views if view.get("public_key")]

    def generate(self, uri: str, algorithm: Algorithm) -> KeyHandle:
        label = self._label(uri)
        try:
            view = self.client.key(label)
        except HsmClientError:
            view = None
        if view is not None and view.get("public_key"):
            raise KeyExistsError(f"the HSM service already holds a key {label!r}")
        if view is not None and view.get("alg") not in (None, algorithm.value):
            raise MechanismUnsupportedError(
                f"the HSM service's key {label!r} is configured as {view.get('alg')}, "
                f"not {algorithm.value}"
            )
        handle_view = self._quorum_call(
            label, "generate", {"algorithm": algorithm.value}, quorum=_quorum(view)
        )
        return self._handle(handle_view)

    def delete(self, uri: str) -> None:
        label = self._label(uri)
        handle = self.lookup(uri)
        assert isinstance(handle, HsmKeyHandle)
        self._quorum_call(label, "destroy", {}, quorum=handle.quorum)

    def _quorum_call(
        self, label: str, operation: str, body: dict[str, Any], *, quorum: int
    ) -> dict[str, Any]:
        extra = _approvals_from_environment(label, operation, b"") if quorum else {}
        try:
            return self.client.perform(label, operation, body, **extra)
        except JanusHSMError:
            raise
        except Exception as exc:
            raise _service_error(exc) from None

    def close(self) -> None:
        self.client.close()


def _quorum(view: dict[str, Any] | None) -> int:
    value = (view or {}).get("quorum", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class HsmKeyHandle(KeyHandle):
    """A key in the service: public half here, every private operation a request."""

    def __init__(self, provider: HsmKeyProvider, view: dict[str, Any]) -> None:
        try:
            self.label = str(view["label"])
            self._algorithm = Algorithm(view["alg"])
            self._public_der = b64url.decode(view["public_key"], "public_key")
            self._public: Any = load_der_public_key(self._public_der)
        except (KeyError, ValueError, TypeError) as exc:
            raise HsmProviderError(
                f"the service's description of a key is unusable: {exc}"
            ) from None
        self._provider = provider
        self.state = str(view.get("state", ""))
        self.quorum = _quorum(view)
        self.allow_extractable = True  # custody is the service's to check, on its token

    @property
    def uri(self) -> str:
        return self._provider.uri.key_uri(self.label)

    @property
    def properties(self) -> KeyProperties:
        # The service opens its keys with the custody check (non-extractable, generated
        # on the token); what reaches a client is a key that passed it.
        return KeyProperties(
            algorithm=self._algorithm,
            sensitive=True,
            extractable=False,
            always_sensitive=True,
            never_extractable=True,
            local=True,
            backend="hsm-service",
        )

    def public_key(self) -> PublicKey:
        public: PublicKey = self._public
        return public

    def _call(self, operation: str, data: bytes, peer: bytes = b"") -> bytes:
        client = self._provider.client
        extra = (
            _approvals_from_environment(self.label, operation, data or peer) if self.quorum else {}
        )
        try:
            if operation == "sign":
                return client.sign(self.label, data, **extra)
            return client.ecdh(self.label, peer, **extra)
        except Exception as exc:
            raise _service_error(exc) from None

    def sign(self, data: bytes, *, format: SignatureFormat = SignatureFormat.RAW) -> bytes:
        if not self._algorithm.can_sign:
            raise MechanismUnsupportedError(f"{self._algorithm.value} keys cannot sign")
        raw = self._call("sign", data)
        if format is SignatureFormat.DER:
            if self._algorithm is Algorithm.EdDSA:
                raise MechanismUnsupportedError("Ed25519 signatures have no DER form; use raw")
            from janus_hsm.provider import raw_to_der

            return raw_to_der(raw, self._algorithm.coordinate_size)
        return raw

    def sign_digest(self, digest: bytes, *, format: SignatureFormat = SignatureFormat.RAW) -> bytes:
        raise MechanismUnsupportedError(
            "keys of an HSM service sign data, not digests: the service's policy and its "
            "approvers see what is signed"
        )

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        peer = peer_public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return self._call("ecdh", b"", peer)


def _approvals_from_environment(label: str, operation: str, payload: bytes) -> dict[str, Any]:
    """The approvals (and their nonce) for one operation of a quorum key.

    They come from an approval request (``janus hsm request``) and the approval files
    approvers made for it; the request must be for this key, this operation and this
    payload, or the service would refuse the approvals anyway (said here, clearly).
    """
    from agent.hsm_service.client import HsmApprovalRequest
    from policies.approval_requests import approvals_from_files
    from policies.errors import FormatError

    request_path = os.environ.get(APPROVAL_REQUEST_ENV, "")
    files = [p for p in os.environ.get(APPROVALS_ENV, "").split(os.pathsep) if p]
    if not request_path or not files:
        raise HsmProviderError(
            f"the HSM service's key {label!r} needs approvals for {operation}: prepare a "
            f"request with `janus hsm request`, have approvers run `janus hsm approve`, "
            f"then set {APPROVAL_REQUEST_ENV} and {APPROVALS_ENV} (docs/hsm-service.md)",
            code="hsm_refused:quorum_required",
        )
    try:
        data = Path(request_path).read_bytes()[: 64 * 1024 + 1]
        request = HsmApprovalRequest.loads(data, request_path)
    except OSError as exc:
        raise HsmProviderError(f"cannot read {request_path}: {exc.strerror}") from None
    except FormatError as exc:
        raise HsmProviderError(str(exc), code="bad_format") from None
    claims = request.claims
    if claims.get("key") != label or claims.get("operation") != operation:
        raise HsmProviderError(
            f"{request_path} is an approval request for another key or operation",
            code="hsm_refused:quorum_invalid",
        )
    digest = hashlib.sha256(payload).hexdigest()
    if not hmac.compare_digest(str(claims.get("payload_sha256", "")), digest):
        raise HsmProviderError(
            f"{request_path} is an approval request for other data than this {operation}",
            code="hsm_refused:quorum_invalid",
        )
    loaded = []
    for path in files:
        try:
            loaded.append((path, Path(path).read_bytes()[: 64 * 1024 + 1]))
        except OSError as exc:
            raise HsmProviderError(f"cannot read approval file {path}: {exc.strerror}") from None
    try:
        approvals = approvals_from_files(loaded, challenge=request.challenge)
    except FormatError as exc:
        raise HsmProviderError(str(exc), code="bad_format") from None
    return {"approvals": list(approvals), "nonce": request.nonce, "expires": request.expires}


__all__ = [
    "HsmKeyHandle",
    "HsmKeyProvider",
    "HsmProviderError",
    "HsmUri",
    "der_to_raw",
    "key_uri",
    "open_provider",
    "register",
]
