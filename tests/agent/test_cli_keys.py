"""`janus keys …` run as a real subprocess: the contract scripts depend on (docs/cli.md)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hardware.softhsm import SoftHSMToken
from janus_hsm.public_keys import from_did_key, from_jwk
from janus_hsm.uri import Pkcs11Uri

SHOW_FIELDS = {"uri", "alg", "did", "jwk", "properties"}
PROPERTY_FIELDS = {"sensitive", "extractable", "always_sensitive", "never_extractable", "local"}


def janus(
    token: SoftHSMToken, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env={**token.environ(), **(env or {})},
        input=stdin if stdin is not None else b"",
        capture_output=True,
        check=False,
        timeout=120,
    )


def ok_json(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def key_uri(cli_token: SoftHSMToken, key_name: str) -> Any:
    return cli_token.uri(object=key_name)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "EdDSA", "X25519"])
def test_generate_show_list_delete(cli_token: SoftHSMToken, key_uri: str, alg: str) -> None:
    generated = ok_json(janus(cli_token, "keys", "generate", key_uri, "--alg", alg, "--json"))
    assert generated.keys() >= SHOW_FIELDS
    assert generated["alg"] == alg
    assert set(generated["properties"]) >= PROPERTY_FIELDS
    props = generated["properties"]
    assert props["sensitive"] and props["never_extractable"] and props["always_sensitive"]
    assert props["local"] and not props["extractable"]
    assert from_did_key(generated["did"]) == from_jwk(generated["jwk"])

    shown = ok_json(janus(cli_token, "keys", "show", key_uri, "--json"))
    assert shown == generated
    # The printed URI names the same key, PIN source aside.
    shown_again = ok_json(
        janus(
            cli_token,
            "keys",
            "show",
            shown["uri"],
            "--json",
            env={"JANUS_PIN": cli_token.pin_file.read_text().strip()},
        )
    )
    assert shown_again["did"] == generated["did"]

    listed = ok_json(janus(cli_token, "keys", "list", cli_token.uri(), "--json"))
    assert isinstance(listed, list)
    assert generated["did"] in [k["did"] for k in listed]

    deleted = ok_json(janus(cli_token, "keys", "delete", key_uri, "--json"))
    assert deleted["deleted"] == generated["uri"]
    gone = janus(cli_token, "keys", "show", key_uri, "--json")
    assert gone.returncode == 1
    assert json.loads(gone.stdout)["error"]["code"] == "key_not_found"


def test_duplicate_generate_is_refused(cli_token: SoftHSMToken, key_uri: str) -> None:
    ok_json(janus(cli_token, "keys", "generate", key_uri, "--alg", "ES256", "--json"))
    again = janus(cli_token, "keys", "generate", key_uri, "--alg", "ES256")
    assert again.returncode == 1
    assert b"already has an object" in again.stderr
    assert len(again.stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("alg", ["ES256", "ES384", "EdDSA"])
def test_sign_outputs_verify(
    cli_token: SoftHSMToken, key_uri: str, alg: str, tmp_path: Path
) -> None:
    info = ok_json(janus(cli_token, "keys", "generate", key_uri, "--alg", alg, "--json"))
    public = from_jwk(info["jwk"])
    message = tmp_path / "message.bin"
    message.write_bytes(b"pay 100 EUR\n" * 100)
    data = message.read_bytes()

    printed = janus(cli_token, "keys", "sign", key_uri, "--in", str(message))
    assert printed.returncode == 0, printed.stderr
    signature = b64url(printed.stdout.decode().strip())
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
        der_result = janus(
            cli_token, "keys", "sign", key_uri, "--in", str(message), "--format", "der"
        )
        assert der_result.returncode == 1
        return
    assert isinstance(public, ec.EllipticCurvePublicKey)
    size = len(signature) // 2
    hash_alg = ec.ECDSA(_hash_for(alg))
    public.verify(
        encode_dss_signature(
            int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        ),
        data,
        hash_alg,
    )

    out = tmp_path / "sig.der"
    result = ok_json(
        janus(
            cli_token,
            "keys",
            "sign",
            key_uri,
            "--in",
            str(message),
            "--format",
            "der",
            "--out",
            str(out),
            "--json",
        )
    )
    assert result["format"] == "der" and result["out"] == str(out)
    public.verify(out.read_bytes(), data, hash_alg)
    assert b64url(result["signature"]) == out.read_bytes()

    from_stdin = janus(cli_token, "keys", "sign", key_uri, "--in", "-", stdin=data)
    assert from_stdin.returncode == 0


def _hash_for(alg: str) -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256() if alg == "ES256" else hashes.SHA384()


def test_csr_and_cert(cli_token: SoftHSMToken, key_uri: str, tmp_path: Path) -> None:
    info = ok_json(janus(cli_token, "keys", "generate", key_uri, "--alg", "ES256", "--json"))
    csr_result = janus(cli_token, "keys", "csr", key_uri, "--subject", "CN=edge-root,O=Janus")
    assert csr_result.returncode == 0, csr_result.stderr
    csr = x509.load_pem_x509_csr(csr_result.stdout)
    assert csr.is_signature_valid
    assert csr.public_key() == from_jwk(info["jwk"])
    assert csr.subject.rfc4514_string() == "CN=edge-root,O=Janus"

    out = tmp_path / "cert.pem"
    ok_json(
        janus(
            cli_token,
            "keys",
            "cert",
            key_uri,
            "--subject",
            "CN=root",
            "--days",
            "30",
            "--out",
            str(out),
            "--json",
        )
    )
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    cert.verify_directly_issued_by(cert)

    bad = janus(cli_token, "keys", "csr", key_uri, "--subject", "not a name", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "bad_subject"


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("not a name", "RDN 1 ('not a name') has no '='"),
        ("CN=edge, O=Janus", "attribute type ' O' has spaces"),
        ("CN=edge;O=Janus", "does not separate RDNs in RFC 4514: use ','"),
        ("CN=edge,,O=Janus", "RDN 2 is empty"),
        ("FOO=bar", "unknown attribute type 'FOO': use one of CN"),
        ("CN=a\\", "escapes nothing"),
        ('CN="edge"', "unescaped '\"'"),
        ("CN=", "CN= has an empty value"),
        ("CN=edge,C=USA", "RDN 2 ('C=USA') is not valid: Attribute's length must be >= 2"),
    ],
)
def test_a_bad_subject_says_what_is_wrong(
    cli_token: SoftHSMToken, key_uri: str, subject: str, says: str
) -> None:
    for command in ("csr", "cert"):
        result = janus(cli_token, "keys", command, key_uri, "--subject", subject)
        assert result.returncode == 1
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("janus: error: --subject: ")
        assert says in lines[0]
        assert "expected TYPE=value pairs joined by ','" in lines[0]


def test_errors_are_one_line_with_exit_1(cli_token: SoftHSMToken, tmp_path: Path) -> None:
    cases = [
        (
            ["keys", "show", "pkcs11:token=cli;object=x;vendor=1"],
            "'vendor'",
        ),  # the name only: a value may be secret
        (["keys", "show", "pkcs11:token=nope;object=x"], "no token matches"),
        (["keys", "show", "ftp:x"], "unsupported key URI"),
        (["keys", "generate", cli_token.uri(object="z"), "--alg", "RS256"], "RS256"),
        (
            ["keys", "sign", cli_token.uri(object="absent"), "--in", "/etc/hostname"],
            "no private key 'absent'",
        ),
        (
            ["keys", "sign", cli_token.uri(object="x"), "--in", str(tmp_path / "missing")],
            "cannot read",
        ),
    ]
    for args, needle in cases:
        result = janus(cli_token, *args)
        assert result.returncode == 1, args
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("janus: error: ")
        assert needle in lines[0]


@pytest.mark.parametrize(
    "uri",
    [
        "soft:object=x;PIN-VALUE=hunter2",
        "soft:object=x?pin%2Dvalue=hunter2",
        "soft:object=x;colour=hunter2",
        "soft:object=x?pin-source=hunter2",
        "piv:slot=9c;pin%2Dvalue=hunter2",
        "piv:slot=9c;PIN=hunter2",
        "piv:slot=hunter2",
        "piv:slot=9c?pin-source=hunter2",
        "pkcs11:token=cli;object=x;PIN-VALUE=hunter2",
        "pkcs11:token=cli;object=x?pin_value=hunter2",
        "pkcs11:token=cli;object=x;type=hunter2",
        "pkcs11:token=cli;object=x?pin-source=hunter2",
        "pkcs11:token=cli;vendor=hunter2",
        "hunter2",
    ],
)
def test_uri_errors_never_print_a_value(cli_token: SoftHSMToken, uri: str) -> None:
    for json_flag in ((), ("--json",)):
        result = janus(cli_token, "keys", "show", uri, *json_flag)
        assert result.returncode == 1, result.stderr
        assert b"hunter2" not in result.stdout + result.stderr
        assert b"Traceback" not in result.stderr
        if not json_flag:
            assert result.stderr.decode().startswith("janus: error: ")


def test_ids_are_printed_percent_encoded_and_hex_ids_get_a_hint(
    cli_token: SoftHSMToken, key_name: str
) -> None:
    uri = str(Pkcs11Uri.parse(cli_token.uri(object=key_name)).with_path(id=b"\x0a\x1b\x2c"))
    generated = ok_json(janus(cli_token, "keys", "generate", uri, "--alg", "ES256", "--json"))
    assert "id=%0A%1B%2C" in generated["uri"]
    listed = ok_json(janus(cli_token, "keys", "list", cli_token.uri(), "--json"))
    assert any(f"object={key_name};type=private;id=%0A%1B%2C" in k["uri"] for k in listed)
    human = janus(cli_token, "keys", "list", cli_token.uri())
    assert f"object={key_name};type=private;id=%0A%1B%2C" in human.stdout.decode()
    for hex_id in ("0a1b2c", "0x0a1b2c"):
        hinted = janus(cli_token, "keys", "show", f"pkcs11:token=cli;id={hex_id}", "--json")
        assert hinted.returncode == 1
        error = json.loads(hinted.stdout)["error"]
        assert error["code"] == "bad_uri"
        assert "write id=%0A%1B%2C" in error["message"]
    pin = {"JANUS_PIN": cli_token.pin_file.read_text().strip()}
    found = janus(cli_token, "keys", "show", "pkcs11:token=cli;id=%0a%1b%2c", "--json", env=pin)
    assert ok_json(found)["did"] == generated["did"]
    absent = janus(cli_token, "keys", "show", "pkcs11:token=cli;id=%FF%FE", "--json", env=pin)
    assert "no private key id=%FF%FE" in json.loads(absent.stdout)["error"]["message"]


def test_usage_errors_exit_2(cli_token: SoftHSMToken) -> None:
    assert janus(cli_token, "keys", "generate", cli_token.uri(object="q")).returncode == 2
    assert janus(cli_token, "keys", "frobnicate").returncode == 2


def test_no_pin_on_argv(cli_token: SoftHSMToken) -> None:
    result = janus(cli_token, "keys", "list", "pkcs11:token=cli", "--pin", "1234")
    assert result.returncode == 2  # there is no such option
    missing = janus(cli_token, "keys", "list", "pkcs11:token=cli", "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["error"]["code"] == "pin_unavailable"


def test_wrong_pin_via_environment(cli_token: SoftHSMToken) -> None:
    result = janus(
        cli_token, "keys", "list", "pkcs11:token=cli", "--json", env={"JANUS_PIN": "not-the-pin"}
    )
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "pin_incorrect"
    assert b"not-the-pin" not in result.stdout + result.stderr


def test_extractable_key_needs_allow_extractable(
    cli_token: SoftHSMToken, key_name: str, tmp_path: Path
) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType

    token = pkcs11.lib(cli_token.module_path).get_token(token_label="cli")
    try:
        session = token.open(rw=True, user_pin=cli_token.pin_file.read_text().strip())
    except pkcs11.exceptions.UserAlreadyLoggedIn:  # an earlier test's provider, same process
        session = token.open(rw=True)
    params = session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters("secp256r1")},
        local=True,
    )
    params.generate_keypair(
        store=True,
        label=key_name,
        id=key_name.encode(),
        private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    session.close()
    uri = cli_token.uri(object=key_name)
    message = tmp_path / "m"
    message.write_bytes(b"m")
    refused = janus(cli_token, "keys", "sign", uri, "--in", str(message), "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"]["code"] == "extractable_key"
    shown = ok_json(janus(cli_token, "keys", "show", uri, "--json"))
    assert shown["properties"]["extractable"] is True
    allowed = janus(cli_token, "keys", "sign", uri, "--in", str(message), "--allow-extractable")
    assert allowed.returncode == 0


def test_attest_on_softhsm_says_unavailable(cli_token: SoftHSMToken, key_uri: str) -> None:
    ok_json(janus(cli_token, "keys", "generate", key_uri, "--alg", "ES256", "--json"))
    result = janus(cli_token, "keys", "attest", key_uri, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "attestation_unavailable"
