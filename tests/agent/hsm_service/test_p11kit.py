"""The p11-kit RPC front end to end: a real SoftHSM token behind the real engine, stock
clients (pkcs11-tool, python-pkcs11) loading p11-kit's own ``p11-kit-client.so``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.hsm_service.config import P11KitClient, load_config
from agent.hsm_service.engine import HsmEngine
from agent.hsm_service.errors import ConfigError
from agent.hsm_service.p11kit import P11KitServer, serve_unix
from agent.hsm_service.p11kit import constants as ck
from agent.hsm_service.p11kit.calls import CALL_IDS, CALLS
from agent.hsm_service.p11kit.dispatch import Connection
from agent.hsm_service.p11kit.errors import MalformedMessage
from hardware.softhsm import SoftHSMToken
from hardware.token_container import P11_KIT_PREFIX
from janus_hsm.algorithms import Algorithm
from janus_hsm.public_keys import to_did_key
from tests.agent.hsm_service.hsmprocess import HsmServiceProcess

NEW_CLIENT = P11_KIT_PREFIX / "lib" / "pkcs11" / "p11-kit-client.so"
OLD_CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")  # Debian's 0.24
CLIENT = NEW_CLIENT if NEW_CLIENT.exists() else OLD_CLIENT

pytestmark = pytest.mark.skipif(not CLIENT.exists(), reason="no p11-kit-client.so here")


def _did() -> str:
    return to_did_key(ec.generate_private_key(ec.SECP256R1()).public_key())


@dataclass
class Service:
    engine: HsmEngine
    server: P11KitServer
    state_dir: Path
    client: str
    labels: dict[str, str]  # role -> key label
    public: dict[str, EllipticCurvePublicKey]  # role -> public key, read from the token

    @property
    def socket(self) -> Path:
        return self.server.path

    def env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}

    def decisions(self, role: str) -> list[dict[str, Any]]:
        with sqlite3.connect(f"file:{self.state_dir / 'audit.db'}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT data FROM janus_audit WHERE kind = 'decision' AND cap_id = ? ORDER BY seq",
                (self.labels[role],),
            ).fetchall()
        return [d for d in (json.loads(r[0]) for r in rows) if d.get("event") == "decision"]


@pytest.fixture(scope="module")
def service(
    softhsm_token: SoftHSMToken, pkcs11_provider: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("p11kit")
    tag = uuid.uuid4().hex[:8]
    roles = {
        "signer": (Algorithm.ES256, 'operations = ["sign"]'),
        "p384": (Algorithm.ES384, 'operations = ["sign"]'),
        "once": (Algorithm.ES256, 'operations = ["sign"]\nmax-uses = 1'),
        "twice": (Algorithm.ES256, 'operations = ["sign"]\nmax-uses = 2'),
        "ecdh-only": (Algorithm.ES256, 'operations = ["ecdh"]'),
        "retired": (Algorithm.ES256, 'operations = ["sign"]\nstate = "deactivated"'),
        "hidden": (Algorithm.ES256, 'operations = ["sign"]'),
    }
    client, other = _did(), _did()
    labels = {role: f"rpc-{role}-{tag}" for role in roles}
    public: dict[str, EllipticCurvePublicKey] = {}
    sections = []
    for role, (alg, policy) in roles.items():
        handle = pkcs11_provider.generate(f"pkcs11:object={labels[role]}", alg)
        public[role] = handle.public_key()
        allowed = other if role == "hidden" else client
        sections.append(
            f'[key.{labels[role]}]\nuri = "pkcs11:token={softhsm_token.label};'
            f'object={labels[role]}"\n{policy}\nclients = ["{allowed}"]\n'
        )
    config_path = home / "hsm.toml"
    config_path.write_text(
        textwrap.dedent(
            f"""\
            [service]
            state-dir = "{home / "state"}"
            name = "janus-hsm"

            [[token]]
            module = "{softhsm_token.module_path}"
            token = "{softhsm_token.label}"
            pin-source = "file:{softhsm_token.pin_file}"

            [p11kit]
            clients = [{{ uid = {os.getuid()}, client = "{client}" }}]

            """
        )
        + "\n".join(sections)
    )
    config = load_config(config_path)
    engine = HsmEngine.open(config, sign_heads=False)
    try:
        server = serve_unix(
            engine, home / "p11kit.sock", config.p11kit_clients, service_name=config.service.name
        )
        try:
            yield Service(engine, server, home / "state", client, labels, public)
        finally:
            server.close()
    finally:
        engine.close()
        for label in labels.values():
            pkcs11_provider.delete(f"pkcs11:object={label}")


def tool(service: Service, *args: str, module: Path = CLIENT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pkcs11-tool", "--module", str(module), *args],
        env=service.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def raw_signature(signature: bytes) -> bytes:
    r, s = utils.decode_dss_signature(signature)
    size = (max(r.bit_length(), s.bit_length()) + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify_raw(key: EllipticCurvePublicKey, raw: bytes, data: bytes, prehashed: bool) -> None:
    half = len(raw) // 2
    der = utils.encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )
    hash_alg = hashes.SHA256() if key.curve.key_size == 256 else hashes.SHA384()
    algorithm = ec.ECDSA(utils.Prehashed(hash_alg) if prehashed else hash_alg)
    key.verify(der, data, algorithm)


# --------------------------------------------------------------------------- stock tools


@pytest.mark.parametrize("module", [CLIENT, OLD_CLIENT], ids=["client", "debian-client"])
def test_pkcs11_tool_lists_the_clients_keys_only(service: Service, module: Path) -> None:
    if not module.exists():
        pytest.skip(f"{module} is not installed")
    listed = tool(service, "-O", module=module)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    for role in ("signer", "p384", "once", "twice", "ecdh-only", "retired"):
        assert f"label:      {service.labels[role]}" in out
    assert service.labels["hidden"] not in out
    private = out.split("Private Key Object")[1].split("Public Key Object")[0]
    assert "sensitive" in private and "never extractable" in private
    slots = tool(service, "-L", module=module)
    assert "token label        : janus-hsm" in slots.stdout


def test_pkcs11_tool_signs_through_the_engine(service: Service, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"stock tools sign through the service")
    signature = tmp_path / "sig"
    signed = tool(
        service, "--sign", "-m", "ECDSA-SHA256", "--id", service.labels["signer"].encode().hex(),
        "-i", str(data), "-o", str(signature),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    verify_raw(service.public["signer"], signature.read_bytes(), data.read_bytes(), False)
    last = service.decisions("signer")[-1]
    assert last["outcome"] == "allowed" and last["client"] == service.client
    assert last["payload_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


@pytest.mark.parametrize("module", [CLIENT, OLD_CLIENT], ids=["client", "debian-client"])
def test_pkcs11_tool_signs_a_digest_with_raw_ecdsa(
    service: Service, tmp_path: Path, module: Path
) -> None:
    if not module.exists():
        pytest.skip(f"{module} is not installed")
    digest = hashes.Hash(hashes.SHA384())
    digest.update(b"prehashed by the caller")
    (tmp_path / "digest").write_bytes(digest.finalize())
    signed = tool(
        service, "--sign", "-m", "ECDSA", "--id", service.labels["p384"].encode().hex(),
        "-i", str(tmp_path / "digest"), "-o", str(tmp_path / "sig"), module=module,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    raw = (tmp_path / "sig").read_bytes()
    assert len(raw) == 96
    verify_raw(service.public["p384"], raw, (tmp_path / "digest").read_bytes(), True)


def test_refusals_map_to_ckr_codes_and_are_audited(service: Service, tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(b"x")

    def sign(role: str) -> subprocess.CompletedProcess[str]:
        return tool(
            service, "--sign", "-m", "ECDSA-SHA256", "--id", service.labels[role].encode().hex(),
            "-i", str(tmp_path / "data"), "-o", str(tmp_path / f"{role}.sig"),
        )  # fmt: skip

    refused = sign("ecdh-only")
    assert refused.returncode != 0 and "CKR_KEY_FUNCTION_NOT_PERMITTED" in refused.stderr
    assert service.decisions("ecdh-only")[-1]["reason"] == "operation_not_allowed"

    retired = sign("retired")
    assert "CKR_KEY_FUNCTION_NOT_PERMITTED" in retired.stderr
    assert service.decisions("retired")[-1]["reason"] == "key_state"

    assert sign("once").returncode == 0
    again = sign("once")
    assert again.returncode != 0 and "(0x200)" in again.stderr  # CKR_FUNCTION_REJECTED
    decisions = service.decisions("once")
    # pkcs11-tool retries a refused C_Sign as SignUpdate/SignFinal: each try is decided.
    assert decisions[0]["outcome"] == "allowed" and len(decisions) >= 2
    assert {(d["outcome"], d["reason"]) for d in decisions[1:]} == {("refused", "max_uses")}
    assert all(d["client"] == service.client for d in decisions)


PYKCS11_SCRIPT = """
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import AttributeSensitive

lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label="janus-hsm")
out = {}
with token.open(user_pin="ignored-by-the-service") as session:
    key = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=sys.argv[2])
    out["sensitive"] = key[Attribute.SENSITIVE]
    out["extractable"] = key[Attribute.EXTRACTABLE]
    try:
        key[Attribute.VALUE]
        out["value"] = "readable"
    except AttributeSensitive:
        out["value"] = "sensitive"
    data = b"python-pkcs11 through p11-kit"
    out["signature"] = key.sign(data, mechanism=Mechanism.ECDSA_SHA256).hex()
    public = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})
    out["objects"] = sorted(o.label for o in public)
print(json.dumps(out))
"""


def test_python_pkcs11_signs_and_cannot_read_the_private_value(service: Service) -> None:
    run = subprocess.run(
        [sys.executable, "-c", PYKCS11_SCRIPT, str(CLIENT), service.labels["signer"]],
        env=service.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["value"] == "sensitive"
    assert out["sensitive"] is True and out["extractable"] is False
    verify_raw(
        service.public["signer"],
        bytes.fromhex(out["signature"]),
        b"python-pkcs11 through p11-kit",
        False,
    )
    assert service.labels["hidden"] not in out["objects"]
    assert service.labels["signer"] in out["objects"]


def test_a_uid_not_in_the_config_sees_nothing(service: Service, tmp_path: Path) -> None:
    others = [P11KitClient(uid=os.getuid() + 4242, client=service.client)]
    with serve_unix(service.engine, tmp_path / "other.sock", others) as server:
        env = {**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={server.path}"}
        listed = subprocess.run(
            ["pkcs11-tool", "--module", str(CLIENT), "-L"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert "No slots" in listed.stdout + listed.stderr
        wire = Wire(server.path)
        wire.initialize()
        assert wire.call("C_GetSlotList", b"\x01" + u32(8)) == b"\x01" + u32(0)
        assert wire.error("C_OpenSession", u64(1) + u64(ck.CKF_SERIAL_SESSION)) == (
            ck.CKR_SLOT_ID_INVALID
        )
        wire.close()


def test_start_up_replaces_a_stale_socket_and_refuses_anything_else(
    service: Service, tmp_path: Path
) -> None:
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))  # bound, never listening: what a killed service leaves
    leftover.close()
    with serve_unix(service.engine, stale, []) as server:
        Wire(server.path).close()  # it answers the handshake
        with pytest.raises(ConfigError, match="another process listens"):
            serve_unix(service.engine, stale, [])
    assert not stale.exists()
    regular = tmp_path / "file"
    regular.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        serve_unix(service.engine, regular, [])
    assert regular.read_text() == "not a socket"
    with pytest.raises(ConfigError, match="cannot create the socket"):
        serve_unix(service.engine, tmp_path / "missing" / "p11kit.sock", [])


CONNECT_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


def test_the_socket_is_private_to_its_owner(service: Service) -> None:
    assert stat.S_IMODE(service.socket.stat().st_mode) == 0o600
    if os.getuid() != 0:
        pytest.skip("connecting as another uid needs root")
    home = Path(tempfile.mkdtemp(prefix="janus-p11kit-"))
    try:
        home.chmod(0o755)  # the directory lets anyone reach the socket: only its mode stops them

        def nobody_connects(mode: int) -> str:
            with serve_unix(service.engine, home / f"{mode:o}.sock", [], mode=mode) as server:
                assert stat.S_IMODE(server.path.stat().st_mode) == mode
                run = subprocess.run(
                    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     "/usr/bin/python3", "-c", CONNECT_AS_NOBODY, str(server.path)],
                    capture_output=True, text=True, timeout=60, check=True,
                )  # fmt: skip
            return run.stdout.strip()

        assert nobody_connects(0o600) == "refused"
        assert nobody_connects(0o666) == "connected"  # the check above can fail
    finally:
        shutil.rmtree(home)


# --------------------------------------------------------------------------- the wire


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


class Wire:
    """A bare p11-kit RPC client, to send what p11-kit-client never would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.sock.sendall(b"\x01")
        assert self._read(1) == b"\x01"
        self.serial = 0

    def close(self) -> None:
        self.sock.close()

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def send_raw(self, message: bytes, *, header: bytes | None = None) -> None:
        self.serial += 1
        self.sock.sendall(header or struct.pack(">III", self.serial, 0, len(message)))
        self.sock.sendall(message)

    def request(self, name: str, body: bytes) -> tuple[int, bytes]:
        signature = (CALLS[CALL_IDS[name]].request or "").encode()
        self.send_raw(u32(CALL_IDS[name]) + u32(len(signature)) + signature + body)
        code, _options, length = struct.unpack(">III", self._read(12))
        assert code == self.serial
        message = self._read(length)
        call_id, sig_length = struct.unpack(">II", message[:8])
        return call_id, message[8 + sig_length :]

    def call(self, name: str, body: bytes = b"") -> bytes:
        call_id, payload = self.request(name, body)
        assert call_id == CALL_IDS[name], f"error {struct.unpack('>Q', payload)[0]:#x}"
        return payload

    def error(self, name: str, body: bytes = b"") -> int:
        call_id, payload = self.request(name, body)
        assert call_id == 0
        value: int = struct.unpack(">Q", payload)[0]
        return value

    def initialize(self) -> None:
        handshake = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
        body = b"\x01" + u32(len(handshake)) + handshake + b"\x00" + b"\x01" + u32(1) + b"\x00"
        assert self.call("C_Initialize", body) == b""

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def _label_template(label: str) -> bytes:
    raw = label.encode()
    return (
        u32(2)
        + u32(ck.CKA_CLASS) + b"\x01" + u32(8) + u64(ck.CKO_PRIVATE_KEY)
        + u32(ck.CKA_LABEL) + b"\x01" + u32(len(raw)) + u32(len(raw)) + raw
    )  # fmt: skip


def _open_and_find(wire: Wire, label: str) -> tuple[int, int]:
    session = struct.unpack(">Q", wire.call("C_OpenSession", u64(1) + u64(ck.CKF_SERIAL_SESSION)))[
        0
    ]
    wire.call("C_FindObjectsInit", u64(session) + _label_template(label))
    found = wire.call("C_FindObjects", u64(session) + u32(4))
    assert found[:5] == b"\x01" + u32(1)
    wire.call("C_FindObjectsFinal", u64(session))
    return session, struct.unpack(">Q", found[5:13])[0]


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">III", 1, 0, 1 << 30),  # a frame longer than any request
        u32(1) + u32(0) + u32(12) + u32(999) + u32(0) + u32(0),  # an unknown call
        u32(1) + u32(0) + u32(11) + u32(CALL_IDS["C_GetInfo"]) + u32(3) + b"uuu",  # wrong sig
        u32(1) + u32(0) + u32(14) + u32(CALL_IDS["C_CloseSession"]) + u32(1) + b"u" + b"\0" * 5,
    ],
    ids=["huge", "unknown-call", "bad-signature", "truncated"],
)
def test_a_malformed_frame_closes_only_its_connection(service: Service, garbage: bytes) -> None:
    bystander = Wire(service.socket)
    bystander.initialize()
    offender = Wire(service.socket)
    offender.initialize()
    offender.sock.sendall(garbage)
    assert offender.closed()
    offender.close()
    info = bystander.call("C_GetInfo")
    assert info[:2] == bytes((2, 40))
    bystander.close()


@settings(max_examples=300)
@given(
    call_id=st.integers(min_value=0, max_value=len(CALLS) + 2),
    body=st.binary(max_size=64),
    session_first=st.booleans(),
)
def test_any_request_is_answered_or_refused_as_malformed(
    service: Service, call_id: int, body: bytes, session_first: bool
) -> None:
    """Whatever arguments follow a call header, the front answers with a PKCS#11 code
    or refuses the message as malformed: no other exception, whatever the state."""
    connection = Connection(service.engine, service.client)
    handshake = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
    init = b"\x01" + u32(len(handshake)) + handshake + b"\x00\x01" + u32(1) + b"\x00"
    connection.handle(_message("C_Initialize", init))
    if session_first:
        connection.handle(_message("C_OpenSession", u64(1) + u64(ck.CKF_SERIAL_SESSION)))
    known = call_id < len(CALLS) and CALLS[call_id].request is not None
    signature = (CALLS[call_id].request or "").encode() if known else b"u"
    try:
        answer = connection.handle(u32(call_id) + u32(len(signature)) + signature + body)
    except MalformedMessage:
        return
    assert struct.unpack(">I", answer[:4])[0] in (0, call_id)


def _message(name: str, body: bytes) -> bytes:
    signature = (CALLS[CALL_IDS[name]].request or "").encode()
    return u32(CALL_IDS[name]) + u32(len(signature)) + signature + body


def test_the_wire_contract(service: Service) -> None:
    wire = Wire(service.socket)
    # Nothing before C_Initialize; unimplemented calls say so and keep the connection.
    assert wire.error("C_GetInfo") == ck.CKR_CRYPTOKI_NOT_INITIALIZED
    wire.initialize()
    assert wire.error("C_GenerateKeyPair", b"") == ck.CKR_FUNCTION_NOT_SUPPORTED
    assert wire.error("C_InitToken2", b"") == ck.CKR_FUNCTION_NOT_SUPPORTED
    session, key = _open_and_find(wire, service.labels["signer"])
    # C_Login is accepted and the PIN ignored; an SO login is not offered.
    pin = b"whatever"
    login = u64(session) + u64(ck.CKU_USER) + b"\x01" + u32(len(pin)) + pin
    assert wire.call("C_Login", login) == b""
    so = u64(session) + u64(ck.CKU_SO) + b"\x01" + u32(len(pin)) + pin
    assert wire.error("C_Login", so) == ck.CKR_FUNCTION_NOT_SUPPORTED
    # CKA_VALUE of the private key: sensitive, the rest still answered.
    template = u32(2) + u32(ck.CKA_VALUE) + u32(0) + u32(ck.CKA_SIGN) + u32(0)
    answer = wire.call("C_GetAttributeValue", u64(session) + u64(key) + template)
    assert answer == (
        u32(2) + u32(ck.CKA_VALUE) + b"\x00" + u32(ck.CKA_SIGN) + b"\x01" + u32(1) + b"\x01"
        + u64(ck.CKR_ATTRIBUTE_SENSITIVE)
    )  # fmt: skip
    # Asking for the signature's size costs no use of the key and no audit entry.
    before = len(service.decisions("signer"))
    mech = u32(ck.CKM_ECDSA_SHA256) + u32(0xFFFFFFFF)
    assert wire.call("C_SignInit", u64(session) + mech + u64(key)) == b""
    data = b"\x01" + u32(3) + b"abc"
    assert wire.call("C_Sign", u64(session) + data + u32(0)) == b"\x00" + u32(64)
    assert len(service.decisions("signer")) == before
    signed = wire.call("C_Sign", u64(session) + data + u32(64))
    assert signed[:5] == b"\x01" + u32(64)
    verify_raw(service.public["signer"], signed[5:], b"abc", False)
    assert len(service.decisions("signer")) == before + 1
    # Multi-part signing gathers the parts, then signs once.
    assert wire.call("C_SignInit", u64(session) + mech + u64(key)) == b""
    for part in (b"ab", b"c"):
        wire.call("C_SignUpdate", u64(session) + b"\x01" + u32(len(part)) + part)
    final = wire.call("C_SignFinal", u64(session) + u32(96))
    verify_raw(service.public["signer"], final[5:], b"abc", False)
    # A mechanism the key does not take, a public key, a bad session.
    assert (
        wire.error(
            "C_SignInit", u64(session) + u32(ck.CKM_ECDSA_SHA384) + u32(0xFFFFFFFF) + u64(key)
        )
        == ck.CKR_KEY_TYPE_INCONSISTENT
    )
    assert (
        wire.error("C_SignInit", u64(session) + u32(0x1) + u32(0xFFFFFFFF) + u64(key))
        == ck.CKR_MECHANISM_INVALID
    )
    assert wire.error("C_Sign", u64(session) + data + u32(64)) == ck.CKR_OPERATION_NOT_INITIALIZED
    assert wire.error("C_CloseSession", u64(999)) == ck.CKR_SESSION_HANDLE_INVALID
    assert wire.call("C_Finalize") == b""
    wire.close()


def test_concurrent_connections_get_exactly_the_keys_uses(service: Service) -> None:
    """Four connections, each its own server thread, race for a key with two uses."""
    wires = [Wire(service.socket) for _ in range(4)]
    keys = []
    for wire in wires:
        wire.initialize()
        keys.append(_open_and_find(wire, service.labels["twice"]))
    mech = u32(ck.CKM_ECDSA) + u32(0xFFFFFFFF)
    digest = b"\x01" + u32(32) + bytes(range(32))
    for wire, (session, key) in zip(wires, keys, strict=True):
        wire.call("C_SignInit", u64(session) + mech + u64(key))
    barrier = threading.Barrier(len(wires))

    def sign(index: int) -> int:
        wire, (session, _key) = wires[index], keys[index]
        barrier.wait()
        call_id, payload = wire.request("C_Sign", u64(session) + digest + u32(64))
        return ck.CKR_OK if call_id == CALL_IDS["C_Sign"] else struct.unpack(">Q", payload)[0]

    with ThreadPoolExecutor(len(wires)) as pool:
        results = sorted(pool.map(sign, range(len(wires))))
    for wire in wires:
        wire.close()
    assert results == [ck.CKR_OK] * 2 + [ck.CKR_FUNCTION_REJECTED] * 2
    outcomes = sorted(d["outcome"] for d in service.decisions("twice"))
    assert outcomes == ["allowed", "allowed", "refused", "refused"]


def test_a_key_under_quorum_is_refused_and_audited(
    open_engine: Callable[..., HsmEngine], clients: dict[str, str], tmp_path: Path
) -> None:
    """The RPC has no place for approvals: a quorum key refuses every signature."""
    mapping = [{"uid": os.getuid(), "client": clients["alice-app"]}]
    engine = open_engine(
        {"rpc-quorum": {"object": "hsm-sign", "quorum": {"m": 1, "approvers": ["alice"]}}},
        extra={"p11kit": {"clients": mapping}},
    )
    with serve_unix(engine, tmp_path / "q.sock", engine.config) as server:
        wire = Wire(server.path)
        wire.initialize()
        session, key = _open_and_find(wire, "rpc-quorum")
        wire.call("C_SignInit", u64(session) + u32(ck.CKM_ECDSA) + u32(0xFFFFFFFF) + u64(key))
        digest = b"\x01" + u32(32) + bytes(32)
        assert wire.error("C_Sign", u64(session) + digest + u32(64)) == ck.CKR_FUNCTION_REJECTED
        wire.close()
    audit = engine.config.service.state_dir / "audit.db"
    with sqlite3.connect(f"file:{audit}?mode=ro", uri=True) as db:
        (row,) = db.execute(
            "SELECT data FROM janus_audit WHERE kind = 'decision' AND cap_id = 'rpc-quorum'"
        ).fetchall()
    decision = json.loads(row[0])
    assert decision["reason"] == "quorum_required" and decision["client"] == clients["alice-app"]


# --------------------------------------------------------------------------- the service


def test_janus_hsm_serve_offers_the_socket(
    write_config: Callable[..., Path],
    hsm_provider: Any,
    hsm_token: SoftHSMToken,
    clients: dict[str, str],
    tmp_path: Path,
) -> None:
    """``janus hsm serve --p11kit-socket``: a real service process, pkcs11-tool signing
    through it with a key the configuration names by another label."""
    sock = tmp_path / "p11kit.sock"
    mapping = [{"uid": os.getuid(), "client": clients["alice-app"]}]
    config = write_config(
        {"rpc-proc": {"object": "hsm-sign"}}, extra={"p11kit": {"clients": mapping}}
    )
    process = HsmServiceProcess(config, tmp_path, extra=["--p11kit-socket", str(sock)])
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        (tmp_path / "data").write_bytes(b"through the service process")
        signed = subprocess.run(
            ["pkcs11-tool", "--module", str(CLIENT), "--sign", "-m", "ECDSA-SHA256",
             "--id", b"rpc-proc".hex(), "-i", str(tmp_path / "data"), "-o", str(tmp_path / "sig")],
            env={**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert signed.returncode == 0, signed.stderr + process.output()
    finally:
        process.stop()
    public = hsm_provider.lookup(f"pkcs11:token={hsm_token.label};object=hsm-sign").public_key()
    verify_raw(public, (tmp_path / "sig").read_bytes(), b"through the service process", False)
    assert not sock.exists()  # the service removed its socket on the way out
