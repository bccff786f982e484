"""Benchmark: DIDComm v2 pack+unpack of a 1 KiB message, Janus vs didcomm-python 0.3.2.

What it answers
* **Janus vs didcomm-python, software keys.** One operation is "pack a 1 KiB plaintext
  for one recipient, then unpack it", for anoncrypt (ECDH-ES+A256KW, A256CBC-HS512)
  and authcrypt (ECDH-1PU+A256KW, A256CBC-HS512), on X25519 and on P-256.  Janus uses
  real software-keystore KeyHandles (the cloud agent's kind of key); didcomm-python
  0.3.2 (the DIF reference implementation's Python port, PyPI ``didcomm``) runs in its
  own virtualenv - it pins pydantic < 2 - as a subprocess that stays up for the whole
  run and is told, one measurement at a time, what to time; its DID documents and
  secrets live in its in-memory resolvers, and its timed loop runs inside one
  coroutine so its async API costs it no event-loop start per call.  Measurements are
  interleaved (A B, B A, …) so drift on a busy machine hits both.  Target: Janus at
  least 2x faster (janus ops/s ÷ didcomm-python ops/s >= 2).
* **Recipient key in SoftHSM.** The same Janus pack+unpack with the recipient's key
  generated inside a SoftHSM2 token (ECDH by the token: one C_DeriveKey for
  anoncrypt, two for authcrypt), reported as a ratio to the software-key figure.  For
  information; there is no target.

Before timing, every side's output is checked by the other where that is possible:
didcomm-python unpacks an envelope Janus packed and Janus unpacks one didcomm-python
packed, for each case (interoperability, not just speed).

It is a benchmark, not a test: it prints a table (and, with ``--json OUT``, writes every
sample) and fails only when an operation fails.  Run it as::

    .venv/bin/python benchmarks/didcomm.py [--seconds S] [--repeat N] [--json OUT]
        [--didcomm-python /tmp/didcomm-venv/bin/python]

The didcomm-python interpreter is made on first use if missing (``python3 -m venv``,
then ``pip install didcomm==0.3.2``), which needs the package index.  The SoftHSM token
is made in a temporary directory and deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, x25519  # noqa: E402
from harness import median, progress  # noqa: E402

from agent.didcomm import (  # noqa: E402
    A256CBC_HS512,
    Message,
    NamedKey,
    Recipient,
    pack_anoncrypt,
    pack_authcrypt,
    unpack,
)
from agent.didcomm._encoding import b64e  # noqa: E402
from agent.didcomm.keys import public_to_jwk  # noqa: E402
from hardware.softhsm import SoftHSMToken, ensure_token  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.pkcs11 import Pkcs11Provider  # noqa: E402
from janus_hsm.backends.software import SoftwareProvider  # noqa: E402
from janus_hsm.provider import KeyHandle  # noqa: E402

DEFAULT_SECONDS = 0.5
DEFAULT_REPEAT = 11
WARMUP_SECONDS = 0.3
BATCH = 8
MESSAGE_SIZE = 1024
TARGET_VS_DIDCOMM_PYTHON = 2.0
DIDCOMM_PYTHON_VERSION = "0.3.2"
DEFAULT_DIDCOMM_VENV = Path(tempfile.gettempdir()) / "didcomm-venv"
MESSAGE_TYPE = "https://example.com/protocols/bench/1.0/message"
PASSPHRASE = "didcomm benchmark"  # noqa: S105 - a throw-away keystore's passphrase

CASES = (
    ("anoncrypt", "X25519"),
    ("anoncrypt", "P-256"),
    ("authcrypt", "X25519"),
    ("authcrypt", "P-256"),
)

Operation = Callable[[], object]


def ops_per_second(operation: Operation, seconds: float) -> float:
    return harness.ops_per_second(operation, seconds, BATCH)


# --------------------------------------------------------------------- didcomm-python

# The worker runs in didcomm-python's own virtualenv.  It reads one JSON command per
# line and answers one JSON line: "setup" (keys and DID docs for one case), "pack",
# "unpack" (for the interoperability check) and "run" (time pack+unpack).
WORKER = textwrap.dedent(
    r"""
    import asyncio, json, platform, sys, time
    from importlib import metadata
    from didcomm.common.algorithms import AnonCryptAlg, AuthCryptAlg
    from didcomm.common.resolvers import ResolversConfig
    from didcomm.did_doc.did_doc import DIDDoc
    from didcomm.did_doc.did_resolver_in_memory import DIDResolverInMemory
    from didcomm.message import Message
    from didcomm.pack_encrypted import PackEncryptedConfig, pack_encrypted
    from didcomm.secrets.secrets_resolver_in_memory import SecretsResolverInMemory
    from didcomm.secrets.secrets_util import jwk_to_secret
    from didcomm.unpack import unpack

    BATCH = 8
    state = {}  # per case: resolvers, message, kids, config

    def doc(did, jwks):
        methods = [
            {"id": j["kid"], "type": "JsonWebKey2020", "controller": did,
             "publicKeyJwk": {k: v for k, v in j.items() if k not in ("d", "kid")}}
            for j in jwks
        ]
        return DIDDoc.deserialize({
            "@context": ["https://www.w3.org/ns/did/v1"], "id": did,
            "verificationMethod": methods,
            "keyAgreement": [m["id"] for m in methods],
            "authentication": [],
        })

    def setup(cmd):
        alice, bob = cmd["alice"], cmd["bob"]  # private JWKs with kids
        docs = [doc(cmd["alice_did"], [alice]), doc(cmd["bob_did"], [bob])]
        authcrypt = cmd["mode"] == "authcrypt"

        def message(text):
            return Message(
                id="bench-1", type=cmd["type"], body={"text": text},
                frm=cmd["alice_did"] if authcrypt else None, to=[cmd["bob_did"]],
            )

        # Pad the body so the plaintext JSON is exactly cmd["size"] bytes, as for Janus.
        bare = len(json.dumps(message("").as_dict(), separators=(",", ":")))
        state[cmd["case"]] = {
            "resolvers": ResolversConfig(
                secrets_resolver=SecretsResolverInMemory(
                    [jwk_to_secret(alice), jwk_to_secret(bob)]
                ),
                did_resolver=DIDResolverInMemory(docs),
            ),
            "to": bob["kid"],
            "frm": alice["kid"] if authcrypt else None,
            "message": message("x" * (cmd["size"] - bare)),
            "config": PackEncryptedConfig(
                enc_alg_anon=AnonCryptAlg.A256CBC_HS512_ECDH_ES_A256KW,
                enc_alg_auth=AuthCryptAlg.A256CBC_HS512_ECDH_1PU_A256KW,
                forward=False, protect_sender_id=False,
            ),
        }
        return {"ok": True}

    async def pack_once(case):
        result = await pack_encrypted(
            case["resolvers"], case["message"], to=case["to"], frm=case["frm"],
            pack_config=case["config"],
        )
        return result.packed_msg

    async def timed(case, seconds):
        count = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(BATCH):
                packed = await pack_once(case)
                await unpack(case["resolvers"], packed)
            count += BATCH
            now = time.perf_counter()
            if now >= deadline:
                return count / (now - start)

    async def unpack_given(case, envelope):
        result = await unpack(case["resolvers"], envelope)
        meta = result.metadata
        return {"body": result.message.body, "authenticated": meta.authenticated,
                "anonymous_sender": meta.anonymous_sender}

    def main():
        loop = asyncio.new_event_loop()
        print(json.dumps({"ready": True, "didcomm": metadata.version("didcomm"),
                          "python": platform.python_version()}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "setup":
                    out = setup(cmd)
                elif cmd["cmd"] == "pack":
                    out = {"envelope": loop.run_until_complete(pack_once(state[cmd["case"]]))}
                elif cmd["cmd"] == "unpack":
                    out = loop.run_until_complete(
                        unpack_given(state[cmd["case"]], cmd["envelope"])
                    )
                elif cmd["cmd"] == "run":
                    out = {"rate": loop.run_until_complete(
                        timed(state[cmd["case"]], cmd["seconds"])
                    )}
                elif cmd["cmd"] == "stop":
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    return
                else:
                    out = {"error": "unknown command"}
            except Exception as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(out), flush=True)

    main()
    """
)


def ensure_didcomm_python(python: Path) -> Path:
    """didcomm-python's interpreter, its virtualenv made on first use."""
    if python.exists():
        return python
    venv = python.parent.parent
    progress(f"making a virtualenv for didcomm-python {DIDCOMM_PYTHON_VERSION} in {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"didcomm=={DIDCOMM_PYTHON_VERSION}"],
        check=True,
    )
    return python


class DidcommPython:
    """The didcomm-python worker process, kept up for the whole run."""

    def __init__(self, python: Path) -> None:
        # Its stderr goes to a file, shown only if it fails: authlib (which didcomm-python
        # uses) prints a deprecation notice about itself on import.
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [str(python), "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        hello = self._read()
        self.version = hello["didcomm"]
        self.python = hello["python"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            raise RuntimeError(f"didcomm-python worker died (exit {self.process.poll()}):\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"didcomm-python: {answer['error']}")
        return answer

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
        self.stderr.close()


# --------------------------------------------------------------------------- timing


@dataclass
class Pair:
    """Two sides of one comparison; the ratio is a / b per repetition."""

    name: str
    a: Callable[[float], float]
    b: Callable[[float], float]
    a_samples: list[float] = field(default_factory=list)
    b_samples: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [x / y for x, y in zip(self.a_samples, self.b_samples, strict=True)]

    def summary(self, a: str, b: str, target: float | None) -> dict[str, Any]:
        """Medians, the ratio and every sample; ``a``/``b`` name the sides in the JSON."""
        ratio = median(self.ratios)
        out: dict[str, Any] = {
            "case": self.name,
            f"{a}_ops_per_s": median(self.a_samples),
            f"{b}_ops_per_s": median(self.b_samples),
            f"{a}_us_per_op": 1e6 / median(self.a_samples),
            f"{b}_us_per_op": 1e6 / median(self.b_samples),
            "ratio": ratio,
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            f"{a}_samples": self.a_samples,
            f"{b}_samples": self.b_samples,
        }
        if target is not None:
            out["target"] = target
            out["met"] = ratio >= target
        return out


def run_pairs(pairs: list[Pair], seconds: float, repeat: int, label: str) -> None:
    for pair in pairs:
        pair.a(min(WARMUP_SECONDS, seconds))
        pair.b(min(WARMUP_SECONDS, seconds))
    for rep in range(repeat):
        for pair in pairs:
            sides = [("a", pair.a), ("b", pair.b)]
            if rep % 2:
                sides.reverse()
            for side, measure in sides:
                gc.collect()
                rate = measure(seconds)
                (pair.a_samples if side == "a" else pair.b_samples).append(rate)
        progress(f"  repetition {rep + 1}/{repeat} of {label} done")


# ------------------------------------------------------------------------------ setup


def one_kib_message(frm: str | None, to: str) -> Message:
    """A message whose plaintext JSON is exactly MESSAGE_SIZE bytes."""
    base = Message(id="bench-1", type=MESSAGE_TYPE, body={"text": ""}, from_=frm, to=(to,))
    pad = MESSAGE_SIZE - len(base.to_json().encode())
    return Message(id="bench-1", type=MESSAGE_TYPE, body={"text": "x" * pad}, from_=frm, to=(to,))


def private_jwk(
    private: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey, kid: str
) -> dict[str, str]:
    """A private JWK for didcomm-python's in-memory secrets resolver."""
    jwk = public_to_jwk(private.public_key())
    if isinstance(private, x25519.X25519PrivateKey):
        jwk["d"] = b64e(private.private_bytes_raw())
    else:
        jwk["d"] = b64e(private.private_numbers().private_value.to_bytes(32, "big"))
    return {**jwk, "kid": kid}


class SoftKey:
    """A cryptography private key seen as DIDComm sees a KeyHandle (exchange only).

    Used only for the interoperability check, where both implementations must hold the
    same private keys; the timed Janus runs use real keystore and token KeyHandles.
    """

    def __init__(self, private: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey) -> None:
        self.private = private

    def public_key(self) -> Any:
        return self.private.public_key()

    def exchange(self, peer: Any) -> bytes:
        if isinstance(self.private, x25519.X25519PrivateKey):
            return self.private.exchange(peer)
        return self.private.exchange(ec.ECDH(), peer)


def new_private(crv: str) -> ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey:
    if crv == "X25519":
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def case_name(mode: str, crv: str) -> str:
    return f"{mode} {crv}"


def setup_didcomm_python(worker: DidcommPython, mode: str, crv: str, name: str) -> dict[str, Any]:
    """Give the worker keys and DID docs for one case; return them for the check."""
    alice, bob = new_private(crv), new_private(crv)
    alice_did, bob_did = "did:example:alice", "did:example:bob"
    worker.call(
        cmd="setup",
        case=name,
        mode=mode,
        type=MESSAGE_TYPE,
        size=MESSAGE_SIZE,
        alice=private_jwk(alice, f"{alice_did}#key-1"),
        bob=private_jwk(bob, f"{bob_did}#key-1"),
        alice_did=alice_did,
        bob_did=bob_did,
    )
    return {"alice": alice, "bob": bob, "alice_did": alice_did, "bob_did": bob_did}


def check_interop(worker: DidcommPython, mode: str, crv: str, name: str) -> None:
    """didcomm-python unpacks what Janus packs and the other way round, same keys."""
    keys = setup_didcomm_python(worker, mode, crv, name)
    alice_kid, bob_kid = f"{keys['alice_did']}#key-1", f"{keys['bob_did']}#key-1"
    alice, bob = SoftKey(keys["alice"]), SoftKey(keys["bob"])
    resolver = {alice_kid: alice.public_key()}.get

    theirs = worker.call(cmd="pack", case=name)["envelope"]
    unpacked = unpack(theirs, [NamedKey(bob_kid, bob)], sender_resolver=resolver)
    if unpacked.metadata.mode != mode:
        raise RuntimeError(
            f"Janus read didcomm-python's {name} envelope as {unpacked.metadata.mode}"
        )

    message = Message(
        id="interop-1",
        type=MESSAGE_TYPE,
        body={"text": "from Janus"},
        from_=keys["alice_did"] if mode == "authcrypt" else None,
        to=(keys["bob_did"],),
    )
    recipient = Recipient(bob_kid, bob.public_key())
    if mode == "anoncrypt":
        ours = pack_anoncrypt(message, [recipient], enc=A256CBC_HS512)
    else:
        ours = pack_authcrypt(message, [recipient], NamedKey(alice_kid, alice))
    read = worker.call(cmd="unpack", case=name, envelope=ours)
    if read["body"] != {"text": "from Janus"} or read["authenticated"] != (mode == "authcrypt"):
        raise RuntimeError(f"didcomm-python read Janus's {name} envelope wrongly: {read}")
    # Leave the worker with the keys it will be timed with (fresh ones, same algorithms).
    setup_didcomm_python(worker, mode, crv, name)


@dataclass
class JanusCase:
    mode: str
    crv: str
    sender: KeyHandle
    recipient: KeyHandle

    def operation(self) -> Operation:
        to = [self.recipient.did]
        keys = [self.recipient]
        message = one_kib_message(
            self.sender.did if self.mode == "authcrypt" else None, self.recipient.did
        )
        if len(message.to_json().encode()) != MESSAGE_SIZE:
            raise RuntimeError("the benchmark message is not 1 KiB")
        sender = self.sender
        if self.mode == "anoncrypt":
            return lambda: unpack(pack_anoncrypt(message, to, enc=A256CBC_HS512), keys)
        return lambda: unpack(pack_authcrypt(message, to, sender), keys)


def rate_of(operation: Operation) -> Callable[[float], float]:
    return lambda seconds: ops_per_second(operation, seconds)


# --------------------------------------------------------------------------- output


def environment(worker: DidcommPython, token: SoftHSMToken) -> dict[str, Any]:
    return {
        **harness.machine(),
        "cryptography": harness.version("cryptography"),
        "pynacl": harness.version("pynacl"),
        "didcomm_python": worker.version,
        "didcomm_python_interpreter": worker.python,
        "softhsm_module": token.module_path,
    }


def render(result: dict[str, Any]) -> str:
    env, params = result["environment"], result["parameters"]
    lines = [
        "DIDComm v2 pack+unpack of a 1 KiB message, one recipient",
        f"{env['date_utc']}  {env['os']}  {env['cpu_count']} CPUs  Python {env['python']}  "
        f"cryptography {env['cryptography']}  didcomm-python {env['didcomm_python']}",
        f"{params['repeat']} repetitions x {params['seconds']:g} s per measurement, "
        "interleaved; medians. Ratio = median of per-repetition ratios (range in brackets).",
        f"load average at start / end: {env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}",
        "",
        "1. Janus (software keystore keys) vs didcomm-python 0.3.2 (in-memory secrets)",
    ]
    header = (
        f"{'case':<20}{'janus us/op':>12}{'d-p us/op':>12}{'janus/d-p':>11}"
        f"{'range':>14}{'target':>9}{'met':>5}"
    )
    lines += [header, "-" * len(header)]
    for row in result["vs_didcomm_python"]:
        lines.append(
            f"{row['case']:<20}{row['janus_us_per_op']:>12.0f}"
            f"{row['didcomm_python_us_per_op']:>12.0f}"
            f"{row['ratio']:>10.2f}x{fmt_range(row):>14}{'>=' + format(row['target'], 'g'):>8}x"
            f"{'yes' if row['met'] else 'NO':>5}"
        )
    lines += [
        "",
        "2. Recipient key in SoftHSM vs in the software keystore (Janus both sides)",
    ]
    header = f"{'case':<20}{'token us/op':>12}{'soft us/op':>12}{'token/soft':>11}{'range':>14}"
    lines += [header, "-" * len(header)]
    for row in result["softhsm_vs_software"]:
        lines.append(
            f"{row['case']:<20}{row['softhsm_us_per_op']:>12.0f}{row['software_us_per_op']:>12.0f}"
            f"{row['ratio']:>10.2f}x{fmt_range(row):>14}"
        )
    lines += [
        "",
        "us/op are the inverse of the median ops/s. 'token/soft' is throughput with the",
        "recipient key in SoftHSM divided by throughput with it in the keystore (< 1 means",
        "slower): the token does 1 ECDH per anoncrypt unpack and 2 per authcrypt unpack.",
    ]
    return "\n".join(line.rstrip() for line in lines)


def fmt_range(row: dict[str, Any]) -> str:
    return f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DIDComm pack+unpack: Janus vs didcomm-python, and SoftHSM vs software."
    )
    harness.add_run_arguments(parser, seconds=DEFAULT_SECONDS, repeat=DEFAULT_REPEAT)
    parser.add_argument(
        "--didcomm-python",
        type=Path,
        default=DEFAULT_DIDCOMM_VENV / "bin" / "python",
        metavar="PYTHON",
        help="interpreter of a virtualenv with didcomm==0.3.2 (made if missing)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def keys_and_token() -> Iterator[tuple[dict[str, KeyHandle], dict[str, KeyHandle], SoftHSMToken]]:
    with tempfile.TemporaryDirectory(prefix="janus-bench-didcomm-") as tmp:
        token = ensure_token(Path(tmp) / "softhsm", "bench-didcomm")
        token.activate()
        software = SoftwareProvider.open(
            f"soft:dir={Path(tmp) / 'keys'}",
            passphrase_source=lambda: PASSPHRASE,
            allow_extractable=True,
        )
        hsm = Pkcs11Provider.open(token.uri())
        try:
            soft: dict[str, KeyHandle] = {}
            for name, alg in (("x25519", Algorithm.X25519), ("p256", Algorithm.ES256)):
                for who in ("alice", "bob"):
                    handle = software.generate(software.key_uri(f"{name}-{who}"), alg)
                    handle.unlock()  # scrypt once, not inside the timing
                    soft[f"{name}-{who}"] = handle
            tokens: dict[str, KeyHandle] = {
                "x25519": hsm.generate(token.uri(object="bob-x25519"), Algorithm.X25519),
                "p256": hsm.generate(token.uri(object="bob-p256"), Algorithm.ES256),
            }
            yield soft, tokens, token
        finally:
            hsm.close()
            software.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    python = ensure_didcomm_python(args.didcomm_python)
    worker = DidcommPython(python)
    try:
        with keys_and_token() as (soft, tokens, token):
            progress("checking that each implementation reads the other's envelopes")
            for mode, crv in CASES:
                check_interop(worker, mode, crv, case_name(mode, crv))
            env = environment(worker, token)

            versus: list[Pair] = []
            hsm_pairs: list[Pair] = []
            for mode, crv in CASES:
                name = case_name(mode, crv)
                key = "x25519" if crv == "X25519" else "p256"
                software_case = JanusCase(mode, crv, soft[f"{key}-alice"], soft[f"{key}-bob"])
                token_case = JanusCase(mode, crv, soft[f"{key}-alice"], tokens[key])
                janus_soft = software_case.operation()
                janus_token = token_case.operation()
                janus_soft()
                janus_token()

                def theirs(seconds: float, name: str = name) -> float:
                    return float(worker.call(cmd="run", case=name, seconds=seconds)["rate"])

                versus.append(Pair(name, rate_of(janus_soft), theirs))
                hsm_pairs.append(Pair(name, rate_of(janus_token), rate_of(janus_soft)))

            progress("1. Janus vs didcomm-python")
            run_pairs(versus, args.seconds, args.repeat, "Janus vs didcomm-python")
            progress("2. SoftHSM recipient vs software recipient")
            run_pairs(hsm_pairs, args.seconds, args.repeat, "SoftHSM vs software")
            env["loadavg_end"] = list(os.getloadavg())
    finally:
        worker.close()

    result = {
        "benchmark": "didcomm",
        "parameters": {
            "seconds": args.seconds,
            "repeat": args.repeat,
            "message_bytes": MESSAGE_SIZE,
            "enc": A256CBC_HS512,
            "recipients": 1,
        },
        "environment": env,
        "vs_didcomm_python": [
            p.summary("janus", "didcomm_python", TARGET_VS_DIDCOMM_PYTHON) for p in versus
        ],
        "softhsm_vs_software": [p.summary("softhsm", "software", None) for p in hsm_pairs],
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.json, result)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
