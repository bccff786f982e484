"""`janus msg pack | unpack` as real subprocesses, keys in SoftHSM and a software keystore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.didcomm.keys import agreement_kid
from hardware.softhsm import SoftHSMToken

PASS = "msg cli passphrase"
TYPE = "https://example.com/protocols/test/1.0/ping"


class Shell:
    def __init__(self, token: SoftHSMToken, tmp: Path) -> None:
        self.token, self.tmp = token, tmp

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env={**self.token.environ(), "JANUS_PIN": PASS},
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def ok(self, *args: str, stdin: str = "") -> Any:
        result = self.run(*args, "--json", stdin=stdin)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def fails(self, *args: str) -> dict[str, Any]:
        result = self.run(*args, "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        error: dict[str, Any] = json.loads(result.stdout)["error"]
        return error

    def file(self, name: str, obj: Any) -> str:
        path = self.tmp / name
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return str(path)


@pytest.fixture(scope="module")
def keys(cli_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bob's X25519 and P-256 keys in the token, Alice's in a software keystore."""
    tmp = tmp_path_factory.mktemp("msg-cli")
    sh = Shell(cli_token, tmp)
    suffix = tmp.name[-8:].replace("-", "")
    soft = f"soft:dir={tmp / 'keys'}"
    wanted = {
        "bob": (cli_token.uri(object=f"msg-bob-{suffix}"), "X25519", False),
        "bob-p256": (cli_token.uri(object=f"msg-bobp-{suffix}"), "ES256", False),
        "signer": (cli_token.uri(object=f"msg-sig-{suffix}"), "EdDSA", False),
        "alice": (f"{soft};object=alice", "X25519", True),
        "carol": (f"{soft};object=carol", "X25519", True),
    }
    out: dict[str, Any] = {"tmp": tmp}
    for name, (uri, alg, soft_key) in wanted.items():
        extra = ["--allow-extractable"] if soft_key else []
        shown = sh.ok("keys", "generate", uri, "--alg", alg, *extra)
        out[name] = {"uri": uri, "did": shown["did"], "jwk": shown["jwk"]}
    return out


@pytest.fixture
def sh(cli_token: SoftHSMToken, tmp_path: Path) -> Shell:
    return Shell(cli_token, tmp_path)


def plaintext(sh: Shell, **headers: Any) -> str:
    return sh.file("plain.json", {"id": "m-1", "type": TYPE, "body": {"n": 1}, **headers})


def test_authcrypt_round_trip(sh: Shell, keys: dict[str, Any]) -> None:
    bob, alice = keys["bob"], keys["alice"]
    envelope = str(sh.tmp / "env.json")
    packed = sh.ok(
        "msg", "pack", "--to", bob["did"], "--from", alice["uri"], "--allow-extractable",
        "--in", plaintext(sh), "--out", envelope,
    )  # fmt: skip
    assert packed["mode"] == "authcrypt"
    assert packed["recipients"] == [agreement_kid(bob["did"])]
    assert packed["sender"] == agreement_kid(alice["did"])
    assert json.loads(Path(envelope).read_text()) == packed["envelope"]

    result = sh.ok("msg", "unpack", "--key", bob["uri"], "--in", envelope)
    assert result["message"]["id"] == "m-1" and result["message"]["body"] == {"n": 1}
    # pack filled in what the envelope implies
    assert result["message"]["from"] == alice["did"]
    assert result["message"]["to"] == [bob["did"]]
    meta = result["metadata"]
    assert meta["mode"] == "authcrypt" and meta["sender"] == alice["did"]
    assert meta["algorithms"] == ["ECDH-1PU+A256KW/A256CBC-HS512"]

    # --sender: the expected sender passes, anyone else is refused.
    sh.ok("msg", "unpack", "--key", bob["uri"], "--in", envelope, "--sender", alice["did"])
    error = sh.fails(
        "msg", "unpack", "--key", bob["uri"], "--in", envelope, "--sender", keys["carol"]["did"]
    )
    assert error["code"] == "inconsistent_envelope"

    # Without --json: the plaintext message alone.
    plain = sh.run("msg", "unpack", "--key", bob["uri"], "--in", envelope)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["id"] == "m-1"


@pytest.mark.parametrize("enc", ["A256CBC-HS512", "A256GCM", "XC20P"])
def test_anoncrypt_to_did_and_jwk_file(sh: Shell, keys: dict[str, Any], enc: str) -> None:
    bob, carol = keys["bob"], keys["carol"]
    carol_jwk = {**carol["jwk"], "kid": agreement_kid(carol["did"])}
    jwk_file = sh.file("carol.jwk", carol_jwk)
    packed = sh.ok(
        "msg", "pack", "--to", bob["did"], "--to", jwk_file, "--enc", enc,
        "--in", "-", stdin=json.dumps({"id": "m-2", "type": TYPE}),
    )  # fmt: skip
    assert packed["mode"] == "anoncrypt"
    envelope = sh.file("env.json", packed["envelope"])
    for who, flags in (("bob", []), ("carol", ["--allow-extractable"])):
        result = sh.ok("msg", "unpack", "--key", keys[who]["uri"], *flags, "--in", envelope)
        assert result["metadata"]["mode"] == "anoncrypt"
        assert result["metadata"]["algorithms"] == [f"ECDH-ES+A256KW/{enc}"]
        assert result["metadata"]["sender"] is None
        assert sorted(result["message"]["to"]) == sorted([bob["did"], carol["did"]])


def test_signed_and_protected_sender(sh: Shell, keys: dict[str, Any]) -> None:
    bob, signer, alice = keys["bob"], keys["signer"], keys["alice"]
    packed = sh.ok(
        "msg", "pack", "--to", bob["did"], "--sign", signer["uri"], "--in", plaintext(sh)
    )
    assert packed["mode"] == "anoncrypt+signed"
    result = sh.ok(
        "msg", "unpack", "--key", bob["uri"], "--in", sh.file("e.json", packed["envelope"])
    )
    assert result["metadata"]["mode"] == "anoncrypt+signed"
    assert result["metadata"]["signed_by"] == f"{signer['did']}#{signer['did'][8:]}"

    packed = sh.ok(
        "msg", "pack", "--to", bob["did"], "--from", alice["uri"], "--allow-extractable",
        "--protect-sender", "--in", plaintext(sh),
    )  # fmt: skip
    result = sh.ok(
        "msg", "unpack", "--key", bob["uri"], "--in", sh.file("e2.json", packed["envelope"])
    )
    assert result["metadata"]["mode"] == "anoncrypt+authcrypt"
    assert result["metadata"]["sender"] == alice["did"]


def test_errors_have_stable_codes(sh: Shell, keys: dict[str, Any]) -> None:
    bob, alice, carol = keys["bob"], keys["alice"], keys["carol"]
    packed = sh.ok("msg", "pack", "--to", bob["did"], "--in", plaintext(sh))
    envelope = sh.file("env.json", packed["envelope"])

    error = sh.fails(
        "msg", "unpack", "--key", carol["uri"], "--allow-extractable", "--in", envelope
    )
    assert error["code"] == "wrong_recipient"

    tampered = dict(packed["envelope"])
    first = tampered["ciphertext"][0]
    # A different first character: replacing it with a fixed one is a no-op 1 time in 64.
    tampered["ciphertext"] = ("B" if first == "A" else "A") + tampered["ciphertext"][1:]
    error = sh.fails("msg", "unpack", "--key", bob["uri"], "--in", sh.file("t.json", tampered))
    assert error["code"] in {"decryption_failed", "malformed_envelope"}

    error = sh.fails("msg", "unpack", "--key", bob["uri"], "--in", envelope, "--max-size", "100")
    assert error["code"] == "bad_request"  # refused while reading, before parsing

    # Software keys need --allow-extractable, as everywhere in Janus.
    error = sh.fails(
        "msg", "pack", "--to", bob["did"], "--from", alice["uri"], "--in", plaintext(sh)
    )
    assert error["code"] == "extractable_key"

    error = sh.fails("msg", "pack", "--to", bob["did"], "--to", keys["bob-p256"]["did"],
                     "--in", plaintext(sh))  # fmt: skip
    assert error["code"] == "pack_error"

    error = sh.fails("msg", "pack", "--to", "did:example:nobody", "--in", plaintext(sh))
    assert error["code"] == "key_resolution_error"

    error = sh.fails("msg", "pack", "--to", bob["did"], "--in", sh.file("bad.json", "{}"))
    assert error["code"] == "bad_request"

    error = sh.fails(
        "msg", "pack", "--to", bob["did"], "--from", alice["uri"], "--allow-extractable",
        "--enc", "A256GCM", "--in", plaintext(sh),
    )  # fmt: skip
    assert error["code"] == "bad_request"


def test_pack_refuses_from_that_is_not_the_sender(sh: Shell, keys: dict[str, Any]) -> None:
    bob, alice = keys["bob"], keys["alice"]
    error = sh.fails(
        "msg", "pack", "--to", bob["did"], "--from", alice["uri"], "--allow-extractable",
        "--in", plaintext(sh, **{"from": keys["carol"]["did"]}),
    )  # fmt: skip
    assert error["code"] == "pack_error"
