"""OpenSSL, unmodified, signing through the p11-kit RPC front: the OpenSSL PKCS#11
engine (libp11, Debian's ``libengine-pkcs11-openssl``) loads ``p11-kit-client.so``, and
the service's per-key policy and forced audit decide every signature."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from tests.agent.hsm_service.test_p11kit import CLIENT, OLD_CLIENT, Service, service

__all__ = ["service"]  # test_p11kit's fixture: a SoftHSM token behind the engine and socket


def _engine_path() -> Path | None:
    """Where this openssl looks for the PKCS#11 engine (its ENGINESDIR), if it has one."""
    if shutil.which("openssl") is None:
        return None
    version = subprocess.run(
        ["openssl", "version", "-e"], capture_output=True, text=True, timeout=30, check=False
    )
    directory = version.stdout.partition(":")[2].strip().strip('"')
    return Path(directory) / "pkcs11.so" if directory else None


ENGINE = _engine_path()

pytestmark = [
    pytest.mark.skipif(not CLIENT.exists(), reason="no p11-kit-client.so here"),
    pytest.mark.skipif(ENGINE is None, reason="no openssl command with engines here"),
    pytest.mark.skipif(
        ENGINE is not None and not ENGINE.exists(),
        reason=f"the OpenSSL PKCS#11 engine ({ENGINE}, Debian package "
        "libengine-pkcs11-openssl) is not installed: `make system` installs it",
    ),
]

OPENSSL_CNF = """\
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
MODULE_PATH = {module}
init = 0
"""


def openssl(
    service: Service, *args: str, module: Path = CLIENT, cnf: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl`` with the PKCS#11 engine loading a p11-kit client module, which
    forwards every call to the service's socket: the module named by the environment,
    or by an openssl.cnf when ``cnf`` is given."""
    env = service.env()
    env.pop("OPENSSL_CONF", None)
    env.pop("PKCS11_MODULE_PATH", None)
    if cnf is None:
        env["PKCS11_MODULE_PATH"] = str(module)
    else:
        cnf.write_text(OPENSSL_CNF.format(module=module))
        env["OPENSSL_CONF"] = str(cnf)
    return subprocess.run(
        ["openssl", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def engine_sign(
    service: Service,
    label: str,
    digest: Path,
    signature: Path,
    *,
    module: Path = CLIENT,
    cnf: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    uri = f"pkcs11:token=janus-hsm;object={label};type=private"
    return openssl(
        service, "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri,
        "-sign", "-in", str(digest), "-out", str(signature), module=module, cnf=cnf,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("role", "hash_alg", "module", "by_cnf"),
    [
        ("signer", hashes.SHA256(), CLIENT, False),
        ("p384", hashes.SHA384(), CLIENT, False),
        ("signer", hashes.SHA256(), CLIENT, True),
        ("signer", hashes.SHA256(), OLD_CLIENT, False),
    ],
    ids=["es256", "es384", "openssl-cnf", "debian-client"],
)
def test_openssl_signs_a_digest_through_the_service(
    service: Service,
    tmp_path: Path,
    role: str,
    hash_alg: hashes.HashAlgorithm,
    module: Path,
    by_cnf: bool,
) -> None:
    if not module.exists():
        pytest.skip(f"{module} is not installed")
    digest = hashes.Hash(hash_alg)
    digest.update(b"openssl signs through the service")
    (tmp_path / "digest").write_bytes(digest.finalize())
    signature = tmp_path / "sig"
    before = len(service.decisions(role))
    cnf = tmp_path / "openssl.cnf" if by_cnf else None
    signed = engine_sign(
        service, service.labels[role], tmp_path / "digest", signature, module=module, cnf=cnf
    )
    assert signed.returncode == 0, signed.stderr
    # OpenSSL writes a DER ECDSA signature: check it with the key read from the token.
    data = (tmp_path / "digest").read_bytes()
    service.public[role].verify(signature.read_bytes(), data, ec.ECDSA(utils.Prehashed(hash_alg)))
    decisions = service.decisions(role)
    assert len(decisions) == before + 1  # one signature, one decision, before it was made
    last = decisions[-1]
    assert last["outcome"] == "allowed" and last["client"] == service.client
    assert last["payload_sha256"] == hashlib.sha256(data).hexdigest()
    # And openssl itself agrees, given the public key.
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        service.public[role].public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verified = openssl(
        service, "pkeyutl", "-verify", "-pubin", "-inkey", str(pem),
        "-in", str(tmp_path / "digest"), "-sigfile", str(signature),
    )  # fmt: skip
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout


@pytest.mark.parametrize(
    ("role", "reason", "ckr"),
    [
        ("ecdh-only", "operation_not_allowed", "Key function not permitted"),
        ("retired", "key_state", "Key function not permitted"),
        ("hidden", None, None),
    ],
)
def test_openssl_is_refused_what_the_policy_refuses(
    service: Service, tmp_path: Path, role: str, reason: str | None, ckr: str | None
) -> None:
    (tmp_path / "digest").write_bytes(hashlib.sha256(b"refused").digest())
    signature = tmp_path / "sig"
    before = len(service.decisions(role))
    refused = engine_sign(service, service.labels[role], tmp_path / "digest", signature)
    assert refused.returncode != 0
    assert not signature.exists() or signature.read_bytes() == b""
    decisions = service.decisions(role)[before:]
    if reason is None:
        # A key of another client is not even listed: OpenSSL cannot find it to ask.
        assert "not found" in refused.stderr
        assert decisions == []
        return
    assert ckr is not None and ckr in refused.stderr
    assert {(d["outcome"], d["reason"]) for d in decisions} == {("refused", reason)}
    assert all(d["client"] == service.client for d in decisions)
