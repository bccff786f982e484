"""What only a token across a process boundary can show: the server going away, the
socket missing, the CLI on p11-kit-client URIs, and the session's clean-up.

The PKCS#11 suite itself runs on the container too (test_pkcs11_provider.py, target
`container`); these tests add what it cannot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, Mechanism, ObjectClass

from hardware.token_container import RemoteToken, TokenContainer
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import ExportRefusedError, TokenLostError
from janus_hsm.provider import SignatureFormat

ROOT = Path(__file__).resolve().parents[2]
JANUS = [sys.executable, "-m", "agent"]


@pytest.fixture
def remote(container_tokens: dict[str, RemoteToken]) -> RemoteToken:
    return container_tokens["janus-test"]


@pytest.fixture
def remote_provider(remote: RemoteToken) -> Pkcs11Provider:
    return Pkcs11Provider.open(remote.uri())


def janus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JANUS, *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_token_is_reached_through_p11_kit_client(remote_provider: Pkcs11Provider) -> None:
    module = remote_provider.token_session.module
    assert Path(module.path).name == "p11-kit-client.so"
    assert module.lib.manufacturer_id.startswith("PKCS#11 Kit")


def test_container_stopped_mid_session_is_token_lost_then_recovers(
    token_container: TokenContainer, remote_provider: Pkcs11Provider, key_name: str
) -> None:
    handle = remote_provider.generate(f"pkcs11:object={key_name}", Algorithm.ES256)
    try:
        assert len(handle.sign(b"before")) == 64
        token_container.stop()
        try:
            for _ in range(2):  # and again: a session already discarded stays lost
                started = time.monotonic()
                with pytest.raises(TokenLostError, match="p11-kit server") as info:
                    handle.sign(b"while stopped")
                assert info.value.code == "token_lost"
                assert time.monotonic() - started < 5  # no hang
        finally:
            token_container.start()
        signature = handle.sign(b"after", format=SignatureFormat.DER)
        public = handle.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"after", ec.ECDSA(Algorithm.ES256.hash_algorithm))
    finally:
        remote_provider.delete(handle.uri)


def test_export_routes_the_rpc_carries_are_refused(
    remote: RemoteToken, remote_provider: Pkcs11Provider, key_name: str
) -> None:
    """Each route is refused by the token on the far side, and the refusal crosses back.
    (Wrapping: test_every_export_route_is_refused on the container target tries the one
    wrap mechanism p11-kit's RPC carries, AES-CBC.)"""
    handle = remote_provider.generate(f"pkcs11:object={key_name}", Algorithm.ES256)
    try:
        token = pkcs11.lib(remote.module_path).get_token(token_label=remote.label)
        try:
            session = token.open(rw=True, user_pin=remote.pin_file.read_text().strip())
        except pkcs11.exceptions.UserAlreadyLoggedIn:  # this process's server is
            session = token.open(rw=True)
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=handle.key_id)
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            private[Attribute.EXTRACTABLE] = True
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            private[Attribute.SENSITIVE] = False
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            private.copy({Attribute.EXTRACTABLE: True})
        with pytest.raises(ExportRefusedError):
            handle.as_cryptography_key().private_numbers()
        assert handle.properties.custody_grade
    finally:
        remote_provider.delete(handle.uri)


@pytest.mark.parametrize("alg", [Algorithm.ES256, Algorithm.ES384])
def test_ecdh_crosses_the_container_boundary(
    remote_provider: Pkcs11Provider, key_name: str, alg: Algorithm
) -> None:
    """p11-kit 0.25 carries ECDH1_DERIVE; the host's client and the image's server are
    built with it (bookworm's 0.24 would refuse the mechanism on the host side)."""
    mechanisms = remote_provider.token_session.token.slot.get_mechanisms()
    assert Mechanism.ECDH1_DERIVE in mechanisms
    handle = remote_provider.generate(f"pkcs11:object={key_name}", alg)
    try:
        public = handle.public_key()
        assert alg.curve is not None and isinstance(public, ec.EllipticCurvePublicKey)
        for _ in range(3):
            peer = ec.generate_private_key(alg.curve)
            expected = peer.exchange(ec.ECDH(), public)
            assert handle.exchange(peer.public_key()) == expected
    finally:
        remote_provider.delete(handle.uri)


# Debian bookworm's own p11-kit-client.so (0.24.1, package p11-kit-modules).
_OLD_CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")

_OLD_CLIENT_ECDH = """
import sys
from cryptography.hazmat.primitives.asymmetric import ec
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import MechanismUnsupportedError

provider = Pkcs11Provider.open(sys.argv[1])
handle = provider.generate(sys.argv[2], Algorithm.ES256)
try:
    handle.exchange(ec.generate_private_key(ec.SECP256R1()).public_key())
    print("exchanged")
except MechanismUnsupportedError as exc:
    print(exc.code, exc)
finally:
    provider.delete(handle.uri)
"""


@pytest.mark.skipif(not _OLD_CLIENT.exists(), reason=f"no p11-kit 0.24 client at {_OLD_CLIENT}")
def test_ecdh_through_an_old_p11_kit_client_is_a_typed_refusal(
    remote: RemoteToken, key_name: str
) -> None:
    """A p11-kit-client without ECDH in its RPC (0.24) in front of the same server: Janus
    says the token cannot do ECDH, typed, rather than failing obscurely.  In a child
    process, so this process keeps one p11-kit client."""
    old = dataclasses.replace(remote, module_path=str(_OLD_CLIENT))
    result = subprocess.run(
        [sys.executable, "-c", _OLD_CLIENT_ECDH, old.uri(), f"pkcs11:object={key_name}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("mechanism_unsupported "), result.stdout
    assert "ECDH" in result.stdout


def test_janus_keys_with_a_p11_kit_client_uri(remote: RemoteToken, tmp_path: Path) -> None:
    key = remote.uri(object="cli-remote")
    made = janus("keys", "generate", "--json", "--alg", "ES256", key)
    assert made.returncode == 0, made.stderr
    generated = json.loads(made.stdout)
    assert "p11-kit-client.so" in generated["uri"] and generated["custody_grade"]
    try:
        listed = janus("keys", "list", "--json", remote.uri())
        assert listed.returncode == 0, listed.stderr
        assert generated["uri"] in [k["uri"] for k in json.loads(listed.stdout)]
        message = tmp_path / "message"
        message.write_bytes(b"signed across the container boundary")
        out = tmp_path / "sig"
        signed = janus(
            "keys", "sign", "--in", str(message), "--format", "der", "--out", str(out), key
        )
        assert signed.returncode == 0, signed.stderr
        shown = janus("keys", "show", "--json", key)
        public = ec.EllipticCurvePublicNumbers(
            int.from_bytes(_b64(json.loads(shown.stdout)["jwk"]["x"])),
            int.from_bytes(_b64(json.loads(shown.stdout)["jwk"]["y"])),
            ec.SECP256R1(),
        ).public_key()
        public.verify(
            out.read_bytes(), message.read_bytes(), ec.ECDSA(Algorithm.ES256.hash_algorithm)
        )
    finally:
        deleted = janus("keys", "delete", key)
        assert deleted.returncode == 0, deleted.stderr


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_socket_missing_at_start_names_what_to_run(remote: RemoteToken, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.sock"
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={missing}"}
    result = janus("keys", "list", remote.uri(), env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("janus: error: "), result.stderr
    assert f"no p11-kit server socket at {missing}" in lines[0]
    assert "start-token-server.sh" in lines[0] and "p11-kit server" in lines[0]
    assert "Traceback" not in result.stderr


def test_dead_socket_at_start_names_what_to_run(remote: RemoteToken, tmp_path: Path) -> None:
    """A socket file nobody listens on (a server that died without removing it)."""
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # bound, never listening: connecting is refused
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={stale}"}
    result = janus("keys", "list", remote.uri(), env=env)
    assert result.returncode == 1
    assert "nothing answers at the p11-kit server socket" in result.stderr
    assert "start-token-server.sh" in result.stderr


def test_session_cleans_up_after_a_failing_test(
    token_container: TokenContainer, tmp_path: Path
) -> None:
    """A session whose test fails still removes its container, and creates no network."""
    (tmp_path / "test_fails.py").write_text(
        "import os\n"
        "def test_fails(token_container):\n"
        f"    open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
        "    assert False, 'deliberately'\n"
    )
    # In a conftest, the fixtures override pytest-docker's (plugins given with -p do not).
    (tmp_path / "conftest.py").write_text("from tests.containers import *  # noqa: F403\n")
    engine = token_container.engine
    networks = engine.run("network", "ls", "--format", "{{.Name}}").stdout
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        check=False,
    )
    assert inner.returncode == 1 and "deliberately" in inner.stdout, inner.stdout[-2000:]
    pid = (tmp_path / "pid").read_text()
    left = engine.run(
        "ps", "-a", "--filter", f"label=org.janus.owner-pid={pid}", "--format", "{{.ID}}"
    ).stdout
    assert left.strip() == ""
    assert engine.run("network", "ls", "--format", "{{.Name}}").stdout == networks


def test_without_an_engine_each_test_skips_naming_what_is_missing(tmp_path: Path) -> None:
    """Here the only engine allowed is Docker, and no docker is on PATH."""
    (tmp_path / "conftest.py").write_text("from tests.containers import *  # noqa: F403\n")
    (tmp_path / "test_needs.py").write_text(
        "def test_one(token_container):\n    pass\ndef test_two(container_tokens):\n    pass\n"
    )
    env = {**os.environ, "JANUS_CONTAINER_ENGINE": "docker", "PATH": "/usr/bin:/bin"}
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert inner.returncode == 0, inner.stdout[-2000:]
    assert "2 skipped" in inner.stdout
    reasons = [line for line in inner.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(reasons) == 2 or "[2]" in reasons[0]
    assert all(
        "no SoftHSM container: no usable container engine: needs docker" in r for r in reasons
    )
