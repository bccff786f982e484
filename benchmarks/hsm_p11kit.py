"""Benchmark: signing through the HSM service's p11-kit RPC front vs python-pkcs11 direct.

Why these measurements:

* A stock PKCS#11 application reaches a service key through ``p11-kit-client.so``: two
  round trips over a unix socket per signature (C_SignInit, C_Sign), the front's
  decoding, and the engine's decision, which is made durable in the audit log before
  the token signs.  The question is what that costs next to the best a program holding
  the token itself can do: python-pkcs11 with one logged-in session and the key handle
  found once, on the same SoftHSM token and the same key.  Target: RPC/direct >= 0.3.
* To tell the front's cost from the engine's, the same signature is also timed through
  ``engine.perform`` called in the service process (no socket, no RPC).
* Two signing paths: raw CKM_ECDSA over a SHA-256 digest (what pkcs11-tool ``-m ECDSA``
  sends), and CKM_ECDSA_SHA256 over a 64-byte message (the key's Janus default; SoftHSM
  2.6 has no hashing ECDSA, so direct is hashlib + CKM_ECDSA there too).
* The forced audit makes every decision durable (an fsync) before the token signs; the
  engine commits every decision pending at that moment in one transaction (group
  commit), so throughput depends on how many clients sign at once.  Each path is
  measured at 1, 4 and 16 concurrent callers (``--clients``): *direct* with that many
  threads on the one session, *engine* with that many threads, *RPC* with that many
  client processes (one connection each), aggregate signatures per second.
* The RPC client runs in its own (spawned) process, as a real client would, driven
  through python-pkcs11 on p11-kit-client.so; measurements of the three paths are
  interleaved, so load on the shared machine hits all of them alike.

It is a benchmark, not a test: it prints a table (and writes JSON with ``--json``) and
fails only when an operation fails.  Run it as::

    .venv/bin/python benchmarks/hsm_p11kit.py [--seconds S] [--repeat N] [--json OUT]
        [--clients 1,4,16] [--state-parent DIR] [--audit-sync full|os]

It creates its own SoftHSM2 token and service state in a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import pkcs11  # noqa: E402
import pkcs11.exceptions  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from pkcs11 import KeyType, Mechanism, ObjectClass  # noqa: E402

from agent.hsm_service.config import load_config  # noqa: E402
from agent.hsm_service.engine import HsmEngine, OperationRequest  # noqa: E402
from agent.hsm_service.p11kit import serve_unix  # noqa: E402
from hardware.softhsm import ensure_token  # noqa: E402
from hardware.token_container import P11_KIT_PREFIX  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.pkcs11 import Pkcs11Provider  # noqa: E402
from janus_hsm.public_keys import to_did_key  # noqa: E402

LABEL = "bench-p11kit"
KEY = "bench-signer"
MESSAGE = b"m" * 64
DIGEST = hashlib.sha256(MESSAGE).digest()
BATCH = 8
TARGET = 0.3
CLIENT_MODULE = P11_KIT_PREFIX / "lib" / "pkcs11" / "p11-kit-client.so"
OLD_CLIENT_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")


def _key_session(module: str, token_label: str, pin: str | None) -> tuple[Any, Any]:
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=token_label)
    try:
        session = token.open(user_pin=pin) if pin is not None else token.open()
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        session = token.open()  # the service's engine, in this process, logged in already
    key = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=KEY)
    return session, key


def _rpc_operations(key: Any) -> dict[str, Callable[[], object]]:
    return {
        "CKM_ECDSA (digest)": lambda: key.sign(DIGEST, mechanism=Mechanism.ECDSA),
        "CKM_ECDSA_SHA256": lambda: key.sign(MESSAGE, mechanism=Mechanism.ECDSA_SHA256),
    }


def rpc_worker(channel: Connection, module: str, address: str) -> None:
    """The client process: python-pkcs11 on p11-kit-client.so, timing on request."""
    os.environ["P11_KIT_SERVER_ADDRESS"] = address
    _session, key = _key_session(module, "janus-hsm", None)
    operations = _rpc_operations(key)
    for op in operations.values():
        op()
    while True:
        request = channel.recv()
        if request is None:
            return
        name, seconds = request
        channel.send(harness.ops_per_second(operations[name], seconds, BATCH))


def main() -> int:
    parser = harness.add_run_arguments(
        argparse.ArgumentParser(description=__doc__), seconds=0.5, repeat=7
    )
    parser.add_argument(
        "--state-parent",
        type=Path,
        help="where to make the service's state directory (default: the temporary "
        "directory); /dev/shm takes the disk's fsync out, leaving the front's own cost",
    )
    parser.add_argument(
        "--clients",
        type=_levels,
        default=(1, 4, 16),
        help="concurrent callers to measure at, comma-separated (default 1,4,16)",
    )
    parser.add_argument(
        "--audit-sync",
        choices=("full", "os"),
        default="full",
        help="the service's [service] audit-sync (default full: each decision fsynced "
        "before the token acts; os: written to the OS only, see docs/hsm-service.md)",
    )
    parser.add_argument(
        "--mechanism",
        action="append",
        choices=("CKM_ECDSA (digest)", "CKM_ECDSA_SHA256"),
        help="the signing paths to measure (default: both)",
    )
    args = parser.parse_args()
    module = CLIENT_MODULE if CLIENT_MODULE.exists() else OLD_CLIENT_MODULE
    with tempfile.TemporaryDirectory(prefix="janus-bench-p11kit-") as tmp:
        token = ensure_token(Path(tmp, "softhsm"), LABEL)
        token.activate()
        provider = Pkcs11Provider.open(token.uri())
        provider.generate(f"pkcs11:object={KEY}", Algorithm.ES256)
        client = to_did_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        state_dir = Path(
            tempfile.mkdtemp(prefix="janus-bench-p11kit-", dir=args.state_parent or tmp)
        )
        config_path = Path(tmp, "hsm.toml")
        config_path.write_text(
            textwrap.dedent(
                f"""\
                [service]
                state-dir = "{state_dir}"
                audit-sync = "{args.audit_sync}"

                [[token]]
                module = "{token.module_path}"
                token = "{LABEL}"
                pin-source = "file:{token.pin_file}"

                [key.{KEY}]
                uri = "pkcs11:token={LABEL};object={KEY}"
                operations = ["sign"]
                clients = ["{client}"]

                [p11kit]
                clients = [{{ uid = {os.getuid()}, client = "{client}" }}]
                """
            )
        )
        config = load_config(config_path)
        engine = HsmEngine.open(config, sign_heads=False)
        server = serve_unix(engine, Path(tmp, "p11kit.sock"), config)
        context = mp.get_context("spawn")
        channels, workers = [], []
        for _ in range(max(args.clients)):
            ours, theirs = context.Pipe()
            worker = context.Process(
                target=rpc_worker,
                args=(theirs, str(module), f"unix:path={server.path}"),
                daemon=True,
            )
            worker.start()
            channels.append(ours)
            workers.append(worker)
        try:
            _session, key = _key_session(
                token.module_path, LABEL, token.pin_file.read_text().strip()
            )
            direct = {
                "CKM_ECDSA (digest)": lambda: key.sign(DIGEST, mechanism=Mechanism.ECDSA),
                "CKM_ECDSA_SHA256": lambda: key.sign(
                    hashlib.sha256(MESSAGE).digest(), mechanism=Mechanism.ECDSA
                ),
            }
            engine_ops = {
                "CKM_ECDSA (digest)": lambda: engine.perform(
                    OperationRequest(client, "sign", KEY, DIGEST, int(Mechanism.ECDSA))
                ),
                "CKM_ECDSA_SHA256": lambda: engine.perform(
                    OperationRequest(client, "sign", KEY, MESSAGE, None)
                ),
            }
            names = args.mechanism or list(direct)
            result = measure(
                {n: direct[n] for n in names},
                {n: engine_ops[n] for n in names},
                channels,
                [worker.pid or 0 for worker in workers],
                args.clients,
                args.seconds,
                args.repeat,
            )
        finally:
            for channel, worker in zip(channels, workers, strict=True):
                channel.send(None)
                worker.join(timeout=10)
            server.close()
            engine.close()
            provider.close()
            shutil.rmtree(state_dir, ignore_errors=True)
    result["environment"] = {
        **harness.machine(),
        "python_pkcs11": harness.version("python-pkcs11"),
        "p11_kit_client": str(module),
        "state_parent": str(args.state_parent or tempfile.gettempdir()),
        "audit_sync": args.audit_sync,
        "uses_of_the_key": "unlimited (the decision and audit entry are written per call)",
    }
    report(result)
    if args.json:
        harness.write_json(args.json, result)
    return 0


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers") from None
    if not levels or levels[0] < 1 or levels[-1] > 64:
        raise argparse.ArgumentTypeError("between 1 and 64 clients")
    return levels


def threaded_rate(operation: Callable[[], object], seconds: float, threads: int) -> float:
    """Aggregate operations per second with ``threads`` threads calling at once."""
    if threads == 1:
        return harness.ops_per_second(operation, seconds, BATCH)
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


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of processes ``pids`` so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def with_cpu(run: Callable[[], float], pids: Sequence[int] = ()) -> tuple[float, float, float]:
    """``run()``'s rate, and the CPU time per operation (µs) it cost this process and
    the processes ``pids``: on a machine where every path is short of CPU, CPU per
    signature decides the ratio, not latency."""
    own, others = time.process_time(), _cpu_seconds(pids)
    started = time.perf_counter()
    rate = run()
    operations = rate * (time.perf_counter() - started)
    return (
        rate,
        (time.process_time() - own) / operations * 1e6,
        (_cpu_seconds(pids) - others) / operations * 1e6,
    )


def rpc_rate(workers: list[Connection], name: str, seconds: float) -> float:
    """Aggregate signatures per second of ``workers`` client processes signing at once."""
    for worker in workers:
        worker.send((name, seconds))
    return float(sum(worker.recv() for worker in workers))


def measure(
    direct: Mapping[str, Callable[[], object]],
    engine_ops: Mapping[str, Callable[[], object]],
    workers: list[Connection],
    pids: list[int],
    levels: tuple[int, ...],
    seconds: float,
    repeat: int,
) -> dict[str, Any]:
    """Each (path, clients) cell ``repeat`` times, the paths alternated within a round
    so that load on the shared machine hits all of them alike; medians."""
    rows: dict[str, Any] = {}
    for name in direct:
        for clients in levels:
            samples: dict[str, list[float]] = {
                k: [] for k in ("direct", "engine", "rpc", "direct_cpu", "server_cpu", "client_cpu")
            }
            for i in range(repeat):
                harness.progress(f"{name}, {clients} client(s): {i + 1}/{repeat}")
                rate, cpu, _ = with_cpu(partial(threaded_rate, direct[name], seconds, clients))
                samples["direct"].append(rate)
                samples["direct_cpu"].append(cpu)
                samples["engine"].append(threaded_rate(engine_ops[name], seconds, clients))
                rate, server, client = with_cpu(
                    partial(rpc_rate, workers[:clients], name, seconds), pids[:clients]
                )
                samples["rpc"].append(rate)
                samples["server_cpu"].append(server)
                samples["client_cpu"].append(client)
            d, e, r = (harness.median(samples[k]) for k in ("direct", "engine", "rpc"))
            ratios = [rr / dd for rr, dd in zip(samples["rpc"], samples["direct"], strict=True)]
            rows[f"{name}, {clients} client(s)"] = {
                "mechanism": name,
                "clients": clients,
                "direct_ops_per_s": d,
                "engine_ops_per_s": e,
                "rpc_ops_per_s": r,
                "ratio_rpc_over_direct": harness.median(ratios),
                "ratio_engine_over_direct": e / d,
                "cpu_us_per_signature": {
                    "direct": harness.median(samples["direct_cpu"]),
                    "rpc_service": harness.median(samples["server_cpu"]),
                    "rpc_client": harness.median(samples["client_cpu"]),
                },
                "target_met": harness.median(ratios) >= TARGET,
                "samples": samples,
            }
    return {"seconds": seconds, "repeat": repeat, "target": TARGET, "operations": rows}


def report(result: dict[str, Any]) -> None:
    print(
        f"{'ES256 sign':<20} {'clients':>7} {'direct ops/s':>12} {'engine ops/s':>13}"
        f" {'RPC ops/s':>10} {'RPC/direct':>11}  target {TARGET:.2f}x"
        "   CPU µs/sig: direct, RPC service + client"
    )
    for row in result["operations"].values():
        cpu = row["cpu_us_per_signature"]
        verdict = "met" if row["target_met"] else "not met"
        print(
            f"{row['mechanism']:<20} {row['clients']:>7} {row['direct_ops_per_s']:>12,.0f}"
            f" {row['engine_ops_per_s']:>13,.0f} {row['rpc_ops_per_s']:>10,.0f}"
            f" {row['ratio_rpc_over_direct']:>10.2f}x  {verdict:<7}"
            f"   {cpu['direct']:>4.0f}, {cpu['rpc_service']:.0f} + {cpu['rpc_client']:.0f}"
        )
    met = [
        f"{r['mechanism']} at {r['clients']}"
        for r in result["operations"].values()
        if r["target_met"]
    ]
    print(f"target RPC/direct >= {TARGET:.2f}x met: {', '.join(met) if met else 'nowhere'}")


if __name__ == "__main__":
    sys.exit(main())
