"""Shared fixtures of the HSM service tests: a SoftHSM token with keys, approvers with
software FIDO2 authenticators (registered and asked through the real fido2 client), a
configuration writer, and an opened engine.

The token (``hsm-service``) is made for the whole test session (tests/conftest.py);
its standing keys are generated once here.  Tests that generate or destroy keys use
labels of their own (the ``key_name`` fixture).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.server import Fido2Server
from fido2.webauthn import (
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from agent.hsm_service.config import DEFAULT_APPROVAL_RP_ID, ServiceConfig, load_config
from agent.hsm_service.engine import HsmEngine, OperationRequest
from hardware.fido2_authenticator import ScriptedPresence, SoftwareAuthenticator
from hardware.softhsm import SoftHSMToken
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from policies.approvals import Approval, Approver, ApproverSet, request_approval
from tests.policies.keys import software_keys

RP_ID = DEFAULT_APPROVAL_RP_ID
ORIGIN = f"https://{RP_ID}"
PIN_ENV = "JANUS_HSM_TEST_PIN"

#: The standing keys on the service's token: label -> algorithm.
TOKEN_KEYS = {
    "hsm-sign": Algorithm.ES256,
    "hsm-ed": Algorithm.EdDSA,
    "hsm-ecdh": Algorithm.ES256,
    "hsm-x25519": Algorithm.X25519,
    "hsm-audit-head": Algorithm.ES256,
}


@pytest.fixture(scope="session")
def hsm_token(hsm_service_token: SoftHSMToken) -> SoftHSMToken:
    """The service's token with the :data:`TOKEN_KEYS` on it."""
    provider = Pkcs11Provider.open(hsm_service_token.uri())
    for label, alg in TOKEN_KEYS.items():
        try:
            provider.lookup(f"pkcs11:token={hsm_service_token.label};object={label}")
        except KeyNotFoundError:
            provider.generate(f"pkcs11:token={hsm_service_token.label};object={label}", alg)
    return hsm_service_token


@pytest.fixture(scope="session")
def hsm_provider(hsm_token: SoftHSMToken) -> Pkcs11Provider:
    """Direct access to the service's token, to check what the service did (or not)."""
    return Pkcs11Provider.open(hsm_token.uri())


# --------------------------------------------------------------------------- clients


@pytest.fixture(scope="session")
def client_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyHandle]:
    """Software keys whose did:keys name the service's clients and administrators."""
    return software_keys(
        tmp_path_factory.mktemp("hsm-clients"),
        {
            "alice-app": Algorithm.EdDSA,
            "bob-app": Algorithm.EdDSA,
            "admin": Algorithm.EdDSA,
        },
    )


@pytest.fixture(scope="session")
def clients(client_keys: dict[str, KeyHandle]) -> dict[str, str]:
    """name -> did:key of each client key."""
    return {name: key.did for name, key in client_keys.items()}


# --------------------------------------------------------------------------- approvers


class _Person(UserInteraction):
    def prompt_up(self) -> None:
        pass


@dataclasses.dataclass
class Operator:
    """An approver: a software authenticator, reached through fido2's Fido2Client."""

    approver: Approver
    device: SoftwareAuthenticator
    presence: ScriptedPresence
    client: Fido2Client

    def approve(self, claims: Mapping[str, Any]) -> Approval:
        return request_approval(self.client, self.approver, claims, rp_id=RP_ID, origin=ORIGIN)


def make_operator(name: str) -> Operator:
    """Register an approval credential the way `janus fido2 register` does (a real
    WebAuthn registration, checked by fido2's server)."""
    presence = ScriptedPresence()
    device = SoftwareAuthenticator(presence=presence, presence_timeout=0.2)
    client = Fido2Client(device, DefaultClientDataCollector(ORIGIN), _Person())
    server = Fido2Server(PublicKeyCredentialRpEntity(id=RP_ID, name="Janus HSM"))
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=name.encode(), name=name, display_name=name),
        resident_key_requirement=ResidentKeyRequirement.DISCOURAGED,
        user_verification=UserVerificationRequirement.DISCOURAGED,
    )
    credential = server.register_complete(state, client.make_credential(options.public_key))
    assert credential.credential_data is not None
    approver = Approver(
        id=name,
        credential_id=credential.credential_data.credential_id,
        public_key=credential.credential_data.public_key,
        rp_id=RP_ID,
    )
    return Operator(approver, device, presence, client)


@pytest.fixture(scope="session")
def operators() -> dict[str, Operator]:
    """Three approvers (alice, bob, carol), each with their own authenticator."""
    return {name: make_operator(name) for name in ("alice", "bob", "carol")}


@pytest.fixture
def approvers_file(tmp_path: Path, operators: dict[str, Operator]) -> Path:
    path = tmp_path / "approvers.json"
    ApproverSet(tuple(o.approver for o in operators.values())).save(path)
    return path


# --------------------------------------------------------------------------- config


def toml_value(value: Any) -> str:
    """A TOML value for the few types the test configurations use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    raise TypeError(f"no TOML for {value!r}")


def toml_document(sections: Mapping[str, Any]) -> str:
    """``{"service": {...}, "token": [{...}], "key.LABEL": {...}}`` as TOML text."""
    lines: list[str] = []
    for name, body in sections.items():
        entries = body if isinstance(body, list) else [body]
        for entry in entries:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            lines.append("")
    return "\n".join(lines)


ConfigWriter = Callable[..., Path]


@pytest.fixture
def write_config(
    tmp_path: Path,
    hsm_token: SoftHSMToken,
    approvers_file: Path,
    clients: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> ConfigWriter:
    """``write_config(keys={label: {...}}, service={...}, extra={...})`` writes a
    configuration for the service's token and returns its path.

    Keys name their token object by label (``uri`` defaults to the label); the
    service section gets a fresh state dir, the approvers and the audit-head key.
    The token's PIN is given as ``env:`` (set here) so tests need no PIN file.
    """
    pin = hsm_token.pin_file.read_text().strip()
    monkeypatch.setenv(PIN_ENV, pin)
    counter = [0]

    def write(
        keys: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        service: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        state_dir: Path | None = None,
        name: str | None = None,
    ) -> Path:
        counter[0] += 1
        sections: dict[str, Any] = {
            "service": {
                "state-dir": str(state_dir or tmp_path / "state"),
                "name": "test-hsm",
                "administrators": [clients["admin"]],
                "approvers": str(approvers_file),
                "audit-head-key": f"pkcs11:token={hsm_token.label};object=hsm-audit-head",
                "audit-head-interval": 3600,
                **(service or {}),
            },
            "token": [
                {
                    "name": "main",
                    "module": hsm_token.module_path,
                    "token": hsm_token.label,
                    "pin-source": f"env:{PIN_ENV}",
                }
            ],
        }
        for label, spec in (keys or {}).items():
            body = dict(spec)
            obj = body.pop("object", label)
            body.setdefault("uri", f"pkcs11:token={hsm_token.label};object={obj}")
            body.setdefault("operations", ["sign"])
            body.setdefault("clients", [clients["alice-app"]])
            sections[f"key.{label}"] = body
        sections.update(extra or {})
        path = tmp_path / (name or f"hsm-{counter[0]}.toml")
        path.write_text(toml_document(sections))
        return path

    return write


@pytest.fixture
def open_engine(write_config: ConfigWriter) -> Iterator[Callable[..., HsmEngine]]:
    """``open_engine(keys, **write_config options)``: an engine on a fresh
    configuration, closed after the test (heads are signed only when asked)."""
    opened: list[HsmEngine] = []

    def make(keys: Mapping[str, Mapping[str, Any]] | None = None, **options: Any) -> HsmEngine:
        config: ServiceConfig = load_config(write_config(keys, **options))
        engine = HsmEngine.open(config, sign_heads=False)
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.close()


def sign_request(client: str, key: str, payload: bytes = b"payload", **kw: Any) -> OperationRequest:
    return OperationRequest(client=client, operation="sign", key=key, payload=payload, **kw)
