"""The ledger from the shell, as real `janus` subprocesses: who may create a ledger, and
how every failure (a capability that does not verify included) is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PASS = "ledger test passphrase"


class Janus:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env={**os.environ, "JANUS_PIN": PASS},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def ok(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def failure(self, *args: str) -> tuple[dict[str, Any], str]:
        """A failure the one documented way; returns (the --json document, the stderr line)."""
        result = self.run(*args, "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("janus: error: "), result.stderr
        document = json.loads(result.stdout)
        assert isinstance(document["error"]["code"], str)
        return document, lines[0]


@pytest.fixture
def janus(tmp_path: Path) -> Janus:
    return Janus(tmp_path)


@pytest.fixture
def granted(janus: Janus) -> dict[str, str]:
    """A root grant to a holder, both software keys."""
    soft = f"soft:dir={janus.tmp / 'keys'}"
    janus.ok("keys", "generate", f"{soft};object=root", "--alg", "ES256", "--allow-extractable")
    holder = janus.ok(
        "keys", "generate", f"{soft};object=holder", "--alg", "EdDSA", "--allow-extractable"
    )
    bundle = str(janus.tmp / "bundle.json")
    return {"issuer": f"{soft};object=root", "holder": holder["did"], "bundle": bundle}


def grant_args(granted: dict[str, str], *extra: str) -> list[str]:
    return [
        "grant",
        "--issuer",
        granted["issuer"],
        "--to",
        granted["holder"],
        "--can",
        "sign/payment",
        "--with",
        "janus:payments/eur",
        "--ttl",
        "10m",
        "--uses",
        "3",
        "--allow-extractable",
        *extra,
    ]


def test_reading_a_mistyped_ledger_is_an_error_not_a_clean_record(
    janus: Janus, granted: dict[str, str]
) -> None:
    ledger = janus.tmp / "ledger.db"
    url = f"sqlite:///{ledger}"
    first = janus.run(*grant_args(granted, "--ledger", url, "--out", granted["bundle"]))
    assert first.returncode == 0, first.stderr
    assert first.stderr == f"janus: created ledger {ledger}\n"  # recording may create: it says so
    again = janus.run(*grant_args(granted, "--ledger", url, "--out", str(janus.tmp / "b2.json")))
    assert again.returncode == 0 and again.stderr == ""  # only the first time
    janus.ok("revoke", "--issuer", granted["issuer"], "--bundle", granted["bundle"],
             "--ledger", url, "--allow-extractable")  # fmt: skip

    mistyped = janus.tmp / "ledgr.db"
    for command in (
        ["verify", granted["bundle"], "--ledger", f"sqlite:///{mistyped}"],
        ["verify", granted["bundle"], "--ledger", str(mistyped)],
        ["audit", "verify", "--ledger", f"sqlite:///{mistyped}"],
    ):
        document, line = janus.failure(*command)
        assert document["valid"] is False
        assert document["error"]["code"] == "ledger_not_found"
        assert str(mistyped) in line
        assert not mistyped.exists()  # and nothing was created by looking

    revoked, line = janus.failure("verify", granted["bundle"], "--ledger", url)
    assert revoked["error"]["code"] == "revoked" and line.startswith("janus: error: ")
    assert janus.ok("audit", "verify", "--ledger", url) == {"valid": True, "entries": 3}


def test_a_file_that_is_not_a_ledger_is_refused_unchanged(janus: Janus) -> None:
    other = janus.tmp / "notes.db"
    other.write_bytes(b"")
    document, _ = janus.failure("audit", "verify", "--ledger", str(other))
    assert document["error"]["code"] == "ledger_not_found" and document["valid"] is False
    assert other.read_bytes() == b""  # reading wrote nothing (no tables, no WAL switch)


def test_does_not_verify_is_reported_like_any_failure(
    janus: Janus, granted: dict[str, str]
) -> None:
    """One rule: `janus: error: …` on stderr, exit 1; --json adds valid: false."""
    assert janus.run(*grant_args(granted, "--out", granted["bundle"])).returncode == 0
    bundle = json.loads(Path(granted["bundle"]).read_text())
    head, payload, signature = bundle["chain"][0].split(".")
    bundle["chain"][0] = f"{head}.{payload}.{signature[:-4]}AAAA"
    tampered = janus.tmp / "tampered.json"
    tampered.write_text(json.dumps(bundle))

    text = janus.run("verify", str(tampered))
    assert text.returncode == 1 and text.stdout == ""
    assert text.stderr.startswith("janus: error: ") and len(text.stderr.splitlines()) == 1
    document, _ = janus.failure("verify", str(tampered))
    assert document["valid"] is False
    assert document["error"]["code"] in {"bad_signature", "bad_format"}
    assert {"code", "type", "message", "link"} <= set(document["error"])

    missing, _ = janus.failure("verify", str(janus.tmp / "no-such-bundle.json"))
    assert missing["valid"] is False and missing["error"]["code"] == "bad_request"
