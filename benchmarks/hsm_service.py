"""Signing through the HSM service over HTTP vs python-pkcs11 on the same SoftHSM token.

What it answers
* **HTTP vs direct.** ES256 signatures per second of a ``janus hsm serve`` process on
  loopback, asked by :class:`agent.hsm_service.client.HsmClient` (each request a fresh
  invocation signed by the client's Ed25519 key, verified and counted in the
  service's client ledger, the decision appended durably to the audit log, then the
  token signs), against python-pkcs11 calling ``C_Sign`` in this process (one
  logged-in session, the key handle found once) on the same token.  Measured with 1
  and 4 concurrent clients, interleaved, medians of ``--repeat`` runs.
  Target: the service >= 0.25x direct.
* **Quorum check.** What a 2-of-3 quorum adds to one decision: ``HsmEngine.perform``
  of a sign in this process, with and without two approvals (WebAuthn assertions
  made beforehand by software authenticators: the approvers' touch is not the
  service's time).

Run it as::

    .venv/bin/python benchmarks/hsm_service.py [--seconds S] [--repeat N] [--json OUT]
        [--state-parent DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import pkcs11  # noqa: E402
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction  # noqa: E402
from fido2.server import Fido2Server  # noqa: E402
from fido2.webauthn import (  # noqa: E402
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from agent.cloud.process import ServerProcess  # noqa: E402
from agent.hsm_service.client import HsmClient, new_nonce  # noqa: E402
from agent.hsm_service.config import load_config  # noqa: E402
from agent.hsm_service.engine import HsmEngine, OperationRequest  # noqa: E402
from hardware.fido2_authenticator import ScriptedPresence, SoftwareAuthenticator  # noqa: E402
from hardware.softhsm import SoftHSMToken, ensure_token  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.pkcs11 import Pkcs11Provider  # noqa: E402
from janus_hsm.backends.software import SoftwareProvider  # noqa: E402
from policies.abilities import Ability  # noqa: E402
from policies.approvals import Approval, Approver, ApproverSet, request_approval  # noqa: E402
from policies.issue import grant  # noqa: E402
from policies.policy import IssuancePolicy  # noqa: E402

LABEL = "janus-bench-hsm"
RP_ID = "approvals.janus.invalid"
ORIGIN = f"https://{RP_ID}"
MESSAGE = b"x" * 64
CLIENT_POLICY = """
version = 1
[[rule]]
name = "bench"
audiences = ["*"]
abilities = [{ can = "hsm/*", with = "*" }]
max_ttl = "1d"
max_uses = 100000000
"""


class _Person(UserInteraction):
    def prompt_up(self) -> None:
        pass


def operator(name: str) -> tuple[Approver, Fido2Client]:
    """A registered approver with a software authenticator (as the tests make them)."""
    device = SoftwareAuthenticator(presence=ScriptedPresence(), presence_timeout=0.2)
    client = Fido2Client(device, DefaultClientDataCollector(ORIGIN), _Person())
    server = Fido2Server(PublicKeyCredentialRpEntity(id=RP_ID, name="bench"))
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=name.encode(), name=name, display_name=name),
        resident_key_requirement=ResidentKeyRequirement.DISCOURAGED,
        user_verification=UserVerificationRequirement.DISCOURAGED,
    )
    credential = server.register_complete(state, client.make_credential(options.public_key))
    data = credential.credential_data
    assert data is not None
    return Approver(name, data.credential_id, data.public_key, RP_ID), client


def write_config(tmp: Path, token: SoftHSMToken, admin: str, client: str, approvers: Path) -> Path:
    pin_env = "JANUS_BENCH_HSM_PIN"
    os.environ[pin_env] = token.pin_file.read_text().strip()
    config = tmp / "hsm.toml"
    config.write_text(
        f"""
[service]
state-dir = {json.dumps(str(tmp / "state"))}
name = "bench-hsm"
administrators = [{json.dumps(admin)}]
approvers = {json.dumps(str(approvers))}

[[token]]
name = "main"
module = {json.dumps(token.module_path)}
token = {json.dumps(token.label)}
pin-source = "env:{pin_env}"

[key.bench-sign]
uri = "pkcs11:token={token.label};object=bench-sign"
operations = ["sign"]
clients = [{json.dumps(client)}]

[key.bench-quorum]
uri = "pkcs11:token={token.label};object=bench-quorum"
operations = ["sign"]
clients = [{json.dumps(client)}]
quorum = {{ m = 2, approvers = ["alice", "bob", "carol"] }}
"""
    )
    return config


def direct_signer(token: SoftHSMToken) -> Callable[[], object]:
    """python-pkcs11 on the token: one logged-in session, the key found once."""
    lib = pkcs11.lib(token.module_path)
    session = lib.get_token(token_label=token.label).open(
        user_pin=token.pin_file.read_text().strip()
    )
    key: Any = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="bench-sign")
    # SoftHSM's CKM_ECDSA over a SHA-256 computed here, as Janus's PKCS#11 backend does
    # (SoftHSM builds without CKM_ECDSA_SHA256 are common).
    return lambda: key.sign(hashlib.sha256(MESSAGE).digest(), mechanism=pkcs11.Mechanism.ECDSA)


def rate(operation: Callable[[], object], seconds: float, threads: int) -> float:
    """Operations per second with ``threads`` callers at once."""
    if threads == 1:
        return harness.ops_per_second(operation, seconds)
    counts = [0] * threads
    stop = threading.Event()

    def run(index: int) -> None:
        while not stop.is_set():
            operation()
            counts[index] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def _http_signer(clients: list[HsmClient]) -> Callable[[], object]:
    """A sign request over HTTP; each calling thread keeps one client of its own."""
    local = threading.local()
    handed = iter(clients * 2)
    lock = threading.Lock()

    def sign() -> object:
        client = getattr(local, "client", None)
        if client is None:
            with lock:
                client = local.client = next(handed)
        return client.sign("bench-sign", MESSAGE)

    return sign


def measure_http(
    token: SoftHSMToken,
    url: str,
    clients: list[HsmClient],
    seconds: float,
    repeat: int,
) -> dict[str, Any]:
    direct = direct_signer(token)
    rows: dict[str, Any] = {}
    for threads in (1, 4, 16):
        samples: dict[str, list[float]] = {"direct": [], "http": [], "ratio": []}
        over_http = _http_signer(clients[:threads])
        for i in range(repeat):
            harness.progress(f"sign, {threads} client(s): {i + 1}/{repeat}")
            d = rate(direct, seconds, threads)
            h = rate(over_http, seconds, threads)
            samples["direct"].append(d)
            samples["http"].append(h)
            samples["ratio"].append(h / d)
        rows[f"{threads} client(s)"] = {
            "direct_ops_per_s": harness.median(samples["direct"]),
            "http_ops_per_s": harness.median(samples["http"]),
            "ratio_http_over_direct": harness.median(samples["ratio"]),
            "samples": samples,
        }
    return rows


def measure_quorum(
    config: Path,
    client: str,
    operators: list[tuple[Approver, Fido2Client]],
    count: int,
    repeat: int,
) -> dict[str, Any]:
    """perform() of a sign with and without a 2-of-3 quorum, in this process."""
    engine = HsmEngine.open(load_config(config), sign_heads=False)
    try:
        samples: dict[str, list[float]] = {"plain_ms": [], "quorum_ms": []}
        for i in range(repeat):
            harness.progress(f"quorum: {i + 1}/{repeat} (preparing {count} approval pairs)")
            expires = int(time.time()) + 3000
            prepared: list[OperationRequest] = []
            for _ in range(count):
                request = OperationRequest(
                    client=client,
                    operation="sign",
                    key="bench-quorum",
                    payload=MESSAGE,
                    nonce=new_nonce(),
                    expires=expires,
                )
                claims = engine.approval_claims(request, expires=expires)
                approvals: list[Approval] = [
                    request_approval(c, a, claims, rp_id=RP_ID, origin=ORIGIN)
                    for a, c in operators[:2]
                ]
                prepared.append(
                    OperationRequest(**{**request.__dict__, "approvals": tuple(approvals)})
                )
            plain = OperationRequest(
                client=client, operation="sign", key="bench-sign", payload=MESSAGE
            )
            started = time.perf_counter()
            for _ in range(count):
                engine.perform(plain)
            samples["plain_ms"].append((time.perf_counter() - started) / count * 1e3)
            started = time.perf_counter()
            for request in prepared:
                engine.perform(request)
            samples["quorum_ms"].append((time.perf_counter() - started) / count * 1e3)
        plain_ms = harness.median(samples["plain_ms"])
        quorum_ms = harness.median(samples["quorum_ms"])
        return {
            "operations_per_run": count,
            "plain_ms": plain_ms,
            "quorum_ms": quorum_ms,
            "quorum_added_ms": quorum_ms - plain_ms,
            "samples": samples,
        }
    finally:
        engine.close()


def main() -> int:
    parser = harness.add_run_arguments(
        argparse.ArgumentParser(description=__doc__), seconds=2.0, repeat=5
    )
    parser.add_argument("--quorum-ops", type=harness.positive_int, default=50)
    parser.add_argument(
        "--state-parent",
        type=Path,
        metavar="DIR",
        help="where the token, ledgers and audit log live (e.g. /dev/shm: no fsync cost)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="janus-bench-hsm-", dir=args.state_parent) as tmp_text:
        tmp = Path(tmp_text)
        token = ensure_token(tmp / "token", LABEL)
        token.activate()
        provider = Pkcs11Provider.open(token.uri())
        for label in ("bench-sign", "bench-quorum"):
            provider.generate(f"pkcs11:token={LABEL};object={label}", Algorithm.ES256)
        provider.close()
        soft = SoftwareProvider.open(
            f"soft:dir={tmp / 'clients'}", passphrase_source=lambda: "bench", allow_extractable=True
        )
        admin = soft.generate("soft:object=admin", Algorithm.EdDSA)
        holder = soft.generate("soft:object=client", Algorithm.EdDSA)
        operators = [operator(name) for name in ("alice", "bob", "carol")]
        approvers = tmp / "approvers.json"
        ApproverSet(tuple(a for a, _ in operators)).save(approvers)
        config = write_config(tmp, token, admin.did, holder.did, approvers)
        bundle = grant(
            admin,
            audience=holder.did,
            abilities=[Ability("*", "hsm/*")],
            ttl_seconds=3600,
            uses=100_000_000,
            policy=IssuancePolicy.loads(CLIENT_POLICY),
        )
        argv = [
            sys.executable, "-m", "agent", "hsm", "serve", "--config", str(config),
            "--port", "0", "--json",
        ]  # fmt: skip
        server = ServerProcess(argv, port=None, log_path=tmp / "hsm.log", env=dict(os.environ))
        try:
            clients = [HsmClient(server.url, holder, bundle) for _ in range(16)]
            http = measure_http(token, server.url, clients, args.seconds, args.repeat)
        finally:
            server.stop()
        quorum = measure_quorum(config, holder.did, operators, args.quorum_ops, args.repeat)
    result = {
        "environment": {
            **harness.machine(),
            "python_pkcs11": harness.version("python-pkcs11"),
            "uvicorn": harness.version("uvicorn"),
        },
        "state_parent": str(args.state_parent or tempfile.gettempdir()),
        "seconds": args.seconds,
        "repeat": args.repeat,
        "sign": http,
        "quorum": quorum,
        "key": "ES256 on SoftHSM2; client key Ed25519 (software)",
    }
    report(result)
    if args.json:
        harness.write_json(args.json, result)
    return 0


def report(result: dict[str, Any]) -> None:
    print(f"{'ES256 sign':<14} {'direct ops/s':>13} {'HTTP ops/s':>11} {'ratio':>7}")
    for name, row in result["sign"].items():
        print(
            f"{name:<14} {row['direct_ops_per_s']:>13,.0f} {row['http_ops_per_s']:>11,.0f} "
            f"{row['ratio_http_over_direct']:>6.2f}x  (target >= 0.25x)"
        )
    q = result["quorum"]
    print(
        f"quorum 2-of-3: perform() {q['plain_ms']:.2f} ms without, {q['quorum_ms']:.2f} ms "
        f"with approvals: +{q['quorum_added_ms']:.2f} ms per decision"
    )


if __name__ == "__main__":
    sys.exit(main())
