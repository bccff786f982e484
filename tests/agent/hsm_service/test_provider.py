"""The ``hsm+http(s)://`` key backend: janus_hsm.open_key on keys held by a real HSM
service process, the scheme registry, and the URI's checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519

import janus_hsm
from agent.hsm_service.client import HsmClient, new_nonce
from agent.hsm_service.provider import (
    APPROVAL_REQUEST_ENV,
    APPROVALS_ENV,
    CAPABILITY_ENV,
    CLIENT_KEY_ENV,
    HsmProviderError,
    HsmUri,
    register,
)
from janus_hsm import b64url
from janus_hsm.errors import KeyNotFoundError, UriError
from janus_hsm.provider import KeyHandle, SignatureFormat
from policies.approval_requests import approval_file
from tests.agent.hsm_service.hsmprocess import HsmServiceProcess, capability
from tests.policies.keys import PASSPHRASE


@pytest.fixture
def service(
    write_config: Any, tmp_path: Path, clients: dict[str, str]
) -> Iterator[HsmServiceProcess]:
    quorum = {"m": 2, "approvers": ["alice", "bob", "carol"]}
    process = HsmServiceProcess(
        write_config(
            {
                "hsm-sign": {},
                "hsm-x25519": {"operations": ["ecdh"]},
                "hsm-ed": {"quorum": quorum},
            }
        ),
        tmp_path,
    )
    yield process
    process.stop()


@pytest.fixture
def as_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, client_keys: dict[str, KeyHandle]
) -> Path:
    """This process is alice-app: its key and capability named in the environment."""
    register()
    bundle = tmp_path / "alice.cap.json"
    bundle.write_text(capability(client_keys["admin"], client_keys["alice-app"]).to_json())
    monkeypatch.setenv(CLIENT_KEY_ENV, client_keys["alice-app"].uri)
    monkeypatch.setenv(CAPABILITY_ENV, str(bundle))
    monkeypatch.setenv("JANUS_PIN", PASSPHRASE)
    return bundle


def key_uri(service: HsmServiceProcess, label: str) -> str:
    return f"hsm+{service.url}/keys/{label}"


def test_open_key_signs_and_exchanges_through_the_service(
    service: HsmServiceProcess, as_client: Path
) -> None:
    key = janus_hsm.open_key(key_uri(service, "hsm-sign"))
    assert key.uri == key_uri(service, "hsm-sign")
    assert key.algorithm.value == "ES256" and key.did.startswith("did:key:z")
    der = key.sign(b"institutional", format=SignatureFormat.DER)
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(der, b"institutional", ec.ECDSA(hashes.SHA256()))
    agreement = janus_hsm.open_key(key_uri(service, "hsm-x25519"))
    peer = x25519.X25519PrivateKey.generate()
    secret = agreement.exchange(peer.public_key())
    assert secret == peer.exchange(agreement.public_key())  # type: ignore[arg-type]
    provider = janus_hsm.open_provider(f"hsm+{service.url}/keys")
    labels = sorted(k.uri.rsplit("/", 1)[1] for k in provider.list_keys())
    assert labels == ["hsm-ed", "hsm-sign", "hsm-x25519"]
    with pytest.raises(KeyNotFoundError):
        provider.find(key_uri(service, "nope"))


def test_quorum_key_with_approval_files(
    service: HsmServiceProcess,
    as_client: Path,
    tmp_path: Path,
    client_keys: dict[str, KeyHandle],
    operators: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = janus_hsm.open_key(key_uri(service, "hsm-ed"))
    with pytest.raises(HsmProviderError, match="janus hsm request") as exc:
        key.sign(b"release")
    assert exc.value.code == "hsm_refused:quorum_required"
    requester = HsmClient(
        service.url,
        client_keys["alice-app"],
        capability(client_keys["admin"], client_keys["alice-app"]),
    )
    body = {"payload": b64url.encode(b"release")}
    request = requester.approval_request("hsm-ed", "sign", body, nonce=new_nonce(), lifetime=300)
    assert request.claims["payload_sha256"] == hashlib.sha256(b"release").hexdigest()
    request_file = tmp_path / "request.json"
    request_file.write_bytes(request.to_bytes())
    files = []
    for name in ("alice", "carol"):
        path = tmp_path / f"{name}.approval.json"
        path.write_bytes(approval_file(operators[name].approve(request.claims), request.challenge))
        files.append(str(path))
    monkeypatch.setenv(APPROVAL_REQUEST_ENV, str(request_file))
    monkeypatch.setenv(APPROVALS_ENV, ":".join(files))
    with pytest.raises(HsmProviderError, match="other data") as exc:
        key.sign(b"something else")
    signature = key.sign(b"release")
    public = key.public_key()
    public.verify(signature, b"release")  # type: ignore[call-arg, union-attr]
    with pytest.raises(HsmProviderError) as exc:  # each approval is good once
        key.sign(b"release")
    assert exc.value.code == "hsm_refused:approval_reused"


def test_missing_client_identity_is_a_clear_error(
    service: HsmServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    register()
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    monkeypatch.delenv(CAPABILITY_ENV, raising=False)
    with pytest.raises(HsmProviderError, match=CLIENT_KEY_ENV) as exc:
        janus_hsm.open_key(key_uri(service, "hsm-sign"))
    assert exc.value.code == "hsm_client_unset"


def test_unreachable_service_is_a_clear_error(as_client: Path) -> None:
    from hardware.postgres import free_port

    key_ = f"hsm+http://127.0.0.1:{free_port()}/keys/hsm-sign"
    with pytest.raises(HsmProviderError) as exc:
        janus_hsm.open_key(key_)
    assert exc.value.code == "hsm_unreachable"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hsm+http://hsm.example.org:8450/keys/k", "TLS proxy"),
        ("hsm+https://user:hunter2@hsm.example.org/keys/k", "no credentials"),
        ("hsm+https://hsm.example.org/keys/k?pin=1234", "no query"),
        ("hsm+https://hsm.example.org/other/k", "path is /keys/LABEL"),
        ("hsm+https://hsm.example.org:99999/keys/k", "port"),
        ("hsm+ftp://hsm.example.org/keys/k", "HOST:PORT"),
        ("hsm+https:///keys/k", "no host"),
    ],
)
def test_bad_uris_are_refused_without_echoing_secrets(uri: str, message: str) -> None:
    with pytest.raises(UriError, match=message) as exc:
        HsmUri.parse(uri)
    assert "hunter2" not in str(exc.value) and "1234" not in str(exc.value)


def test_uri_forms() -> None:
    parsed = HsmUri.parse("hsm+https://hsm.example.org:8443/keys/signer")
    assert (parsed.base, parsed.label) == ("https://hsm.example.org:8443", "signer")
    assert HsmUri.parse("hsm+http://[::1]:8450/keys/").label is None
    assert HsmUri.parse("hsm+http://localhost:8450").key_uri("a b") == (
        "hsm+http://localhost:8450/keys/a%20b"
    )


def test_scheme_registry() -> None:
    with pytest.raises(ValueError):
        janus_hsm.register_scheme("pkcs11", lambda uri, **kw: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        janus_hsm.register_scheme("Not A Scheme", lambda uri, **kw: None)  # type: ignore[arg-type]
    opened: list[str] = []

    def opener(uri: str, **options: Any) -> Any:
        opened.append(uri)
        raise KeyNotFoundError("test backend has no keys")

    janus_hsm.register_scheme("test-backend", opener)
    assert janus_hsm.uri_scheme("test-backend:x") == "test-backend"
    with pytest.raises(KeyNotFoundError):
        janus_hsm.open_key("test-backend:x")
    assert opened == ["test-backend:x"]
    with pytest.raises(UriError, match="unsupported key URI"):
        janus_hsm.open_key("never-registered:x")


def _entry_point_opener(uri: str, **options: Any) -> Any:
    raise KeyNotFoundError(f"opened by an entry point: {uri}")


def test_scheme_from_an_installed_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside package declares its scheme in the ``janus.key_providers`` group: a
    real distribution's metadata on sys.path, found by importlib.metadata."""
    dist = tmp_path / "janus_test_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: janus-test-backend\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[janus.key_providers]\n"
        "ep-backend = tests.agent.hsm_service.test_provider:_entry_point_opener\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(janus_hsm, "_entry_points_loaded", False)  # look again
    with pytest.raises(KeyNotFoundError, match="opened by an entry point: ep-backend:k"):
        janus_hsm.open_key("ep-backend:k")
