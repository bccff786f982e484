"""Benchmark: what the Janus PKCS#11 key provider costs over raw python-pkcs11.

Why these measurements:

* Every Janus signature and key agreement goes through ``Pkcs11Provider`` /
  ``Pkcs11KeyHandle``: a custody check, one process-wide lock per PKCS#11 module, a
  reused logged-in session, a cached object handle and a little Python conversion.
  The question is what that wrapper costs, so each operation is timed *side by side*
  against the best you can do with python-pkcs11 directly (one reused logged-in
  session, the key handle found once) on the same token and the same key, in the same
  process, interleaved A, B, B, A, ... so that drift on a busy machine hits both.
  The target is janus/raw >= 0.9.
* python-pkcs11 initialises modules with ``C_Initialize(NULL)``, which switches
  SoftHSM's own locking off, so Janus serialises every call into a module.  Throughput
  across cores therefore has to come from processes (spawned, because PKCS#11 state
  does not survive fork).  The scaling part measures 1 vs 2 worker processes (target
  2-proc/1-proc >= 1.6 on 2 cores) and, for information, 1 vs 2 threads in one
  process, which the module lock serialises by design (expect ~1x).
* A 2-process ratio means little on its own on a shared machine, so the same workers
  also measure it for raw python-pkcs11 (what SoftHSM allows) and for work with no
  PKCS#11 at all, software ECDSA and a pure-Python loop (what the machine allows at
  that moment).  The software ECDSA rate also tells how fast this machine is compared
  with the figures in shared/notes.

It is a benchmark, not a test: it prints a table (and writes JSON with ``--json``) and
only fails when an operation itself fails.  Run it as::

    .venv/bin/python benchmarks/pkcs11_provider.py [--seconds S] [--repeat N] [--json OUT]

(``make bench`` runs it with the defaults, about 2 minutes on 2 vCPUs.)  It creates its
own SoftHSM2 token in a temporary directory and never touches the machine's default
token directory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Benchmark the checkout this file lives in, not whatever janus_hsm is installed.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Importing these does not load the PKCS#11 module; SOFTHSM2_CONF is set before that.
import harness  # noqa: E402
import pkcs11  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: E402
    Prehashed,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from harness import median, progress  # noqa: E402
from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass  # noqa: E402
from pkcs11._pkcs11 import DeriveMixin  # type: ignore[attr-defined]  # noqa: E402

from hardware.softhsm import SoftHSMToken, ensure_token  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.pkcs11 import Pkcs11KeyHandle, Pkcs11Provider  # noqa: E402

DEFAULT_SECONDS = 0.5
DEFAULT_REPEAT = 11
WARMUP_SECONDS = 0.3
BATCH = 32  # operations between two clock reads
SOFTHSM_LABEL = "bench"
BARRIER_TIMEOUT = 120.0

TARGET_JANUS_VS_RAW = 0.9
TARGET_TWO_PROCESSES = 1.6

# The derived Z is a session object that is read back and destroyed (as Janus does).
ECDH_TEMPLATE = {
    Attribute.TOKEN: False,
    Attribute.SENSITIVE: False,
    Attribute.EXTRACTABLE: True,
}

Operation = Callable[[], object]


def ops_per_second(operation: Operation, seconds: float) -> float:
    return harness.ops_per_second(operation, seconds, BATCH)


# --------------------------------------------------------------------------- timing


@dataclass
class Comparison:
    """One operation, timed through Janus (A) and through raw python-pkcs11 (B)."""

    name: str
    janus: Operation
    raw: Operation
    janus_samples: list[float] = field(default_factory=list)
    raw_samples: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """janus/raw for each repetition (the two runs of a pair are adjacent in time)."""
        return [a / b for a, b in zip(self.janus_samples, self.raw_samples, strict=True)]

    def summary(self) -> dict[str, Any]:
        ratio = median(self.ratios)
        return {
            "operation": self.name,
            "janus_ops_per_s": median(self.janus_samples),
            "raw_ops_per_s": median(self.raw_samples),
            "ratio": ratio,
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            "target": TARGET_JANUS_VS_RAW,
            "met": ratio >= TARGET_JANUS_VS_RAW,
            "janus_samples": self.janus_samples,
            "raw_samples": self.raw_samples,
        }


def run_comparisons(comparisons: list[Comparison], seconds: float, repeat: int) -> None:
    for c in comparisons:  # warm caches, allocators and the token's session state
        ops_per_second(c.janus, min(WARMUP_SECONDS, seconds))
        ops_per_second(c.raw, min(WARMUP_SECONDS, seconds))
    for rep in range(repeat):
        for c in comparisons:
            # Alternate which side goes first so neither always runs "second".
            sides = [("janus", c.janus), ("raw", c.raw)]
            if rep % 2:
                sides.reverse()
            for side, operation in sides:
                gc.collect()
                rate = ops_per_second(operation, seconds)
                (c.janus_samples if side == "janus" else c.raw_samples).append(rate)
        progress(f"  repetition {rep + 1}/{repeat} of the janus-vs-raw comparisons done")


# ------------------------------------------------------------------ raw python-pkcs11


def read_pin(token: SoftHSMToken) -> str:
    return token.pin_file.read_text(encoding="utf-8").rstrip("\r\n")


def open_raw_session(token: SoftHSMToken, provider: Pkcs11Provider) -> Any:
    """A logged-in python-pkcs11 session of our own on the token (the raw baseline)."""
    lib = pkcs11.lib(os.path.realpath(token.module_path))
    if lib is not provider.token_session.module.lib:
        # A second instance of the module would not share Janus's lock or login.
        raise RuntimeError(f"python-pkcs11 loaded {token.module_path} twice")
    pk_token = lib.get_token(token_label=token.label)
    try:
        return pk_token.open(user_pin=read_pin(token))
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        # Login state is per token per process: Janus's session logged it in already.
        return pk_token.open()


def raw_private_key(session: Any, key_id: bytes) -> Any:
    keys = list(
        session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id})
    )
    if len(keys) != 1:
        raise RuntimeError(f"expected one private key with id {key_id.hex()}, found {len(keys)}")
    return keys[0]


def raw_derive(private: Any, peer_point: bytes) -> bytes:
    # python-pkcs11 gives EC keys a derive_key method; SoftHSM keeps X25519 keys as
    # EC_EDWARDS, which lack it, so those call the mixin explicitly (as Janus does).
    derive_key = (
        private.derive_key
        if isinstance(private, DeriveMixin)
        else (lambda *args, **kwargs: DeriveMixin.derive_key(private, *args, **kwargs))
    )
    secret = derive_key(
        KeyType.GENERIC_SECRET,
        256,
        mechanism=Mechanism.ECDH1_DERIVE,
        mechanism_param=(KDF.NULL, None, peer_point),
        template=ECDH_TEMPLATE,
    )
    try:
        return bytes(secret[Attribute.VALUE])
    finally:
        secret.destroy()


# ------------------------------------------------------------------------ scaling


def python_work() -> int:
    """A fixed slice of pure-Python work: the machine's own scaling, without PKCS#11."""
    total = 0
    for i in range(200):
        total += i * i
    return total


def _worker(
    token: SoftHSMToken,
    label: str,
    digest: bytes,
    conn: Any,
    barriers: dict[int, Any],
) -> None:
    """A spawned process: its own module instance, provider, session and key lookup."""
    token.activate()  # before this process loads the PKCS#11 module
    try:
        uri = token.uri(object=label)
        provider = Pkcs11Provider.open(uri)
        # The raw session logs in first; Janus then shares the login (and says so).
        raw_session = open_raw_session(token, provider)
        handle = provider.find(uri)
        assert isinstance(handle, Pkcs11KeyHandle)
        raw_key = raw_private_key(raw_session, handle.key_id)
        handle.sign_digest(digest)
        raw_key.sign(digest, mechanism=Mechanism.ECDSA)
        software_key = ec.generate_private_key(ec.SECP256R1())
        prehashed = ec.ECDSA(Prehashed(hashes.SHA256()))
        workloads: dict[str, Operation] = {
            "janus": lambda: handle.sign_digest(digest),
            "raw": lambda: raw_key.sign(digest, mechanism=Mechanism.ECDSA),
            "software": lambda: software_key.sign(digest, prehashed),
            "python": python_work,
        }
        conn.send(("ready", os.getpid()))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, workload, parties, seconds = message
            barriers[parties].wait(BARRIER_TIMEOUT)
            conn.send(("rate", ops_per_second(workloads[workload], seconds)))
        raw_session.close()
        provider.close()
    except Exception as exc:  # report, so the parent does not wait forever
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerPool:
    """Spawned signer processes, started once and reused for every repetition."""

    def __init__(self, token: SoftHSMToken, label: str, digest: bytes, size: int = 2) -> None:
        ctx = mp.get_context("spawn")  # PKCS#11 state does not survive fork
        # Barrier n: the parent plus workers 0..n-1 start their clocks together.
        self.barriers = {n: ctx.Barrier(n + 1) for n in range(1, size + 1)}
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        try:
            for _ in range(size):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker,
                    args=(token, label, digest, child_end, self.barriers),
                    daemon=True,
                )
                process.start()
                child_end.close()
                self.conns.append(parent_end)
                self.processes.append(process)
                # One at a time: SoftHSM's file object store rewrites token.object on
                # C_Login and unlocks it before writing, so a second process reading the
                # token at that moment intermittently sees no initialised token or gets
                # CKR_GENERAL_ERROR.  Signing afterwards only reads, which is safe.
                self._expect(len(self.conns) - 1, "ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, index: int, kind: str) -> Any:
        conn, process = self.conns[index], self.processes[index]
        try:
            if not conn.poll(BARRIER_TIMEOUT):
                raise RuntimeError(
                    f"benchmark worker {index} did not answer in {BARRIER_TIMEOUT} s"
                )
            got, value = conn.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(
                f"benchmark worker {index} died (exit code {process.exitcode})"
            ) from None
        if got == "error":
            raise RuntimeError(f"benchmark worker {index} failed: {value}")
        if got != kind:
            raise RuntimeError(f"benchmark worker {index} sent {got!r}, expected {kind!r}")
        return value

    def run(self, workload: str, processes: int, seconds: float) -> float:
        """Total ops/s of ``processes`` workers running ``workload`` from a shared start."""
        for conn in self.conns[:processes]:
            conn.send(("run", workload, processes, seconds))
        self.barriers[processes].wait(BARRIER_TIMEOUT)
        return sum(float(self._expect(i, "rate")) for i in range(processes))

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)


def threads_ops_per_second(operation: Operation, threads: int, seconds: float) -> float:
    """Total ops/s of ``threads`` threads in this process calling ``operation``."""
    barrier = threading.Barrier(threads)
    rates: list[float] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            barrier.wait(BARRIER_TIMEOUT)
            rates.append(ops_per_second(operation, seconds))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=body) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return sum(rates)


@dataclass(frozen=True)
class ScalingPair:
    """One workload measured with 1 and with 2 workers; the ratio is 2-worker / 1-worker."""

    key: str
    one: str
    two: str
    role: str  # "target", "info" or "ceiling"


SCALING_PAIRS = (
    ScalingPair("janus_processes", "Janus, 1 process", "Janus, 2 processes", "target"),
    ScalingPair(
        "janus_threads", "Janus, 1 thread (one process)", "Janus, 2 threads (one process)", "info"
    ),
    ScalingPair(
        "raw_processes", "raw python-pkcs11, 1 process", "raw python-pkcs11, 2 processes", "info"
    ),
    ScalingPair(
        "software_processes",
        "software ECDSA (cryptography), 1 proc",
        "software ECDSA (cryptography), 2 proc",
        "ceiling",
    ),
    ScalingPair(
        "python_processes",
        "pure-Python loop, 1 process",
        "pure-Python loop, 2 processes",
        "ceiling",
    ),
)


def scaling_runners(
    pool: WorkerPool, janus_sign: Operation, seconds: float
) -> dict[str, Callable[[], float]]:
    def processes(workload: str, n: int) -> Callable[[], float]:
        return lambda: pool.run(workload, n, seconds)

    def threads(n: int) -> Callable[[], float]:
        return lambda: threads_ops_per_second(janus_sign, n, seconds)

    workloads = {
        "janus_processes": "janus",
        "raw_processes": "raw",
        "software_processes": "software",
        "python_processes": "python",
    }
    runners: dict[str, Callable[[], float]] = {}
    for pair in SCALING_PAIRS:
        if pair.key == "janus_threads":
            runners[pair.one], runners[pair.two] = threads(1), threads(2)
        else:
            workload = workloads[pair.key]
            runners[pair.one] = processes(workload, 1)
            runners[pair.two] = processes(workload, 2)
    return runners


def run_scaling(
    pool: WorkerPool, janus_sign: Operation, seconds: float, repeat: int
) -> dict[str, list[float]]:
    runners = scaling_runners(pool, janus_sign, seconds)
    warmup = scaling_runners(pool, janus_sign, min(WARMUP_SECONDS, seconds))
    for pair in SCALING_PAIRS:
        warmup[pair.two]()
    names = [name for pair in SCALING_PAIRS for name in (pair.one, pair.two)]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeat):
        for name in names if rep % 2 == 0 else reversed(names):
            gc.collect()
            samples[name].append(runners[name]())
        progress(f"  repetition {rep + 1}/{repeat} of the scaling runs done")
    return samples


def scaling_summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    rows = []
    for pair in SCALING_PAIRS:
        ratios = [a / b for a, b in zip(samples[pair.two], samples[pair.one], strict=True)]
        row: dict[str, Any] = {
            "key": pair.key,
            "role": pair.role,
            "one": pair.one,
            "two": pair.two,
            "one_ops_per_s": median(samples[pair.one]),
            "two_ops_per_s": median(samples[pair.two]),
            "ratio": median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "one_samples": samples[pair.one],
            "two_samples": samples[pair.two],
        }
        if pair.role == "target":
            row["target"] = TARGET_TWO_PROCESSES
            row["met"] = row["ratio"] >= TARGET_TWO_PROCESSES
        rows.append(row)
    return {"pairs": rows}


# -------------------------------------------------------------------------- setup


@dataclass
class Keys:
    es256: Pkcs11KeyHandle
    eddsa: Pkcs11KeyHandle
    x25519: Pkcs11KeyHandle


def check_results(keys: Keys, raw: dict[str, Any], digest: bytes, message: bytes) -> None:
    """Make sure both sides compute correct results before timing them."""
    es_public = keys.es256.public_key()
    assert isinstance(es_public, ec.EllipticCurvePublicKey)
    for signature in (
        keys.es256.sign_digest(digest),
        bytes(raw["es256"].sign(digest, mechanism=Mechanism.ECDSA)),
    ):
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        es_public.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    ed_public = keys.eddsa.public_key()
    assert isinstance(ed_public, ed25519.Ed25519PublicKey)
    ed_public.verify(keys.eddsa.sign(message), message)
    ed_public.verify(bytes(raw["eddsa"].sign(message, mechanism=Mechanism.EDDSA)), message)
    for handle, peer, name in (
        (keys.es256, raw["p256_peer"], "es256"),
        (keys.x25519, raw["x25519_peer"], "x25519"),
    ):
        expected = (
            peer.exchange(ec.ECDH(), handle.public_key())
            if name == "es256"
            else (peer.exchange(handle.public_key()))
        )
        if handle.exchange(peer.public_key()) != expected:
            raise RuntimeError(f"Janus ECDH with the {name} key gave a wrong shared secret")
        if raw_derive(raw[name], raw[f"{name}_point"]) != expected:
            raise RuntimeError(f"raw ECDH with the {name} key gave a wrong shared secret")


def environment(token: SoftHSMToken) -> dict[str, Any]:
    softhsm = None
    util = shutil.which("softhsm2-util")
    if util:
        done = subprocess.run([util, "--version"], capture_output=True, text=True, check=False)
        softhsm = done.stdout.strip() or None
    lib = pkcs11.lib(os.path.realpath(token.module_path))
    return {
        **harness.machine(),
        "python_pkcs11": harness.version("python-pkcs11"),
        "cryptography": harness.version("cryptography"),
        "softhsm": softhsm,
        "module": token.module_path,
        "module_library_version": "{}.{}".format(*lib.library_version),
    }


@contextlib.contextmanager
def bench_token() -> Iterator[SoftHSMToken]:
    with tempfile.TemporaryDirectory(prefix="janus-bench-") as tmp:
        token = ensure_token(tmp, SOFTHSM_LABEL)
        token.activate()  # SOFTHSM2_CONF is read once per process, at C_Initialize
        yield token


# ------------------------------------------------------------------------- output


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_range(low: float, high: float) -> str:
    return f"[{low:.2f}-{high:.2f}]"


def render(result: dict[str, Any]) -> str:
    env, params = result["environment"], result["parameters"]
    lines = [
        "Janus PKCS#11 provider vs raw python-pkcs11, SoftHSM2 token",
        f"{env['date_utc']}  {env['os']}  {env['cpu_count']} CPUs  Python {env['python']}  "
        f"python-pkcs11 {env['python_pkcs11']}  SoftHSM {env['softhsm'] or '?'}",
        f"{params['repeat']} repetitions x {params['seconds']:g} s per measurement, "
        "interleaved; medians. Ratio = median of the per-repetition ratios "
        "(range in brackets).",
        f"load average at start / end: {env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}",
        "",
        "1. One operation, one thread: Janus handle vs raw python-pkcs11 "
        "(reused logged-in session, key handle found once)",
    ]
    header = (
        f"{'operation':<36}{'janus ops/s':>12}{'raw ops/s':>12}{'janus/raw':>11}"
        f"{'range':>14}{'target':>9}{'met':>5}"
    )
    lines += [header, "-" * len(header)]
    for row in result["comparisons"]:
        target = f">={row['target']:.2f}x"
        lines.append(
            f"{row['operation']:<36}{fmt_rate(row['janus_ops_per_s']):>12}"
            f"{fmt_rate(row['raw_ops_per_s']):>12}{row['ratio']:>10.2f}x"
            f"{fmt_range(row['ratio_min'], row['ratio_max']):>14}"
            f"{target:>9}{'yes' if row['met'] else 'NO':>5}"
        )
    scaling = result["scaling"]
    if scaling is not None:
        header = (
            f"{'configuration':<40}{'ops/s':>10}{'2 vs 1':>9}{'range':>14}{'target':>9}{'met':>5}"
        )
        lines += [
            "",
            "2. Scaling: total ops/s of all workers (ES256 digest signing unless said)",
            header,
            "-" * len(header),
        ]
        for row in scaling["pairs"]:
            if row["role"] == "target":
                target = f">={row['target']:.1f}x"
                met = "yes" if row["met"] else "NO"
            else:
                target, met = row["role"], ""
            span = fmt_range(row["ratio_min"], row["ratio_max"])
            lines += [
                f"{row['one']:<40}{fmt_rate(row['one_ops_per_s']):>10}",
                f"{row['two']:<40}{fmt_rate(row['two_ops_per_s']):>10}"
                f"{row['ratio']:>8.2f}x{span:>14}{target:>9}{met:>5}",
            ]
        lines += [
            "",
            "Processes are spawned workers, each with its own module instance, provider and",
            "session. 'raw python-pkcs11' is the same workers signing without Janus: what",
            "SoftHSM itself allows. The 'ceiling' rows need no PKCS#11 at all: what 2 processes",
            "get from this machine at that moment for crypto (software ECDSA) and for plain",
            "Python; on a shared machine, or vCPUs that are hyperthreads of one core, they are",
            "below 2x. Read the Janus ratio against them.",
            "Threads do not add throughput, by design: python-pkcs11 initialises the module",
            "with C_Initialize(NULL), which turns SoftHSM's own locking off (concurrent calls",
            "crash it), so Janus holds one lock per module and serialises every call into it.",
            "Expect ~1x or somewhat less (the threads hand the lock and the GIL back and forth).",
            "Use processes (spawned, one provider each) to use more cores.",
        ]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Janus PKCS#11 provider vs raw python-pkcs11 on a private SoftHSM2 token."
    )
    harness.add_run_arguments(parser, seconds=DEFAULT_SECONDS, repeat=DEFAULT_REPEAT)
    parser.add_argument(
        "--no-scaling", action="store_true", help="skip the process/thread scaling part"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    digest = os.urandom(32)  # an ES256 digest: ECDSA signs what it is given
    message = os.urandom(64)
    with bench_token() as token:
        uri = token.uri()
        progress(f"token {token.label!r} in {token.state_dir}; opening {token.module_path}")
        provider = Pkcs11Provider.open(uri)
        raw_session = open_raw_session(token, provider)
        try:
            keys = Keys(
                es256=provider.generate(token.uri(object="bench-es256"), Algorithm.ES256),
                eddsa=provider.generate(token.uri(object="bench-eddsa"), Algorithm.EdDSA),
                x25519=provider.generate(token.uri(object="bench-x25519"), Algorithm.X25519),
            )
            p256_peer = ec.generate_private_key(ec.SECP256R1())
            x25519_peer = x25519.X25519PrivateKey.generate()
            p256_peer_public = p256_peer.public_key()
            x25519_peer_public = x25519_peer.public_key()
            raw: dict[str, Any] = {
                "es256": raw_private_key(raw_session, keys.es256.key_id),
                "eddsa": raw_private_key(raw_session, keys.eddsa.key_id),
                "x25519": raw_private_key(raw_session, keys.x25519.key_id),
                "p256_peer": p256_peer,
                "x25519_peer": x25519_peer,
                # The encodings Janus hands the token: SEC1 uncompressed / raw 32 bytes.
                "es256_point": p256_peer_public.public_bytes(
                    Encoding.X962, PublicFormat.UncompressedPoint
                ),
                "x25519_point": x25519_peer_public.public_bytes(Encoding.Raw, PublicFormat.Raw),
            }
            check_results(keys, raw, digest, message)
            env = environment(token)

            es256, eddsa, x25519_key = keys.es256, keys.eddsa, keys.x25519
            raw_es, raw_ed, raw_x = raw["es256"], raw["eddsa"], raw["x25519"]
            es_point, x_point = raw["es256_point"], raw["x25519_point"]
            comparisons = [
                Comparison(
                    "ECDSA P-256 sign (32-byte digest)",
                    lambda: es256.sign_digest(digest),
                    lambda: raw_es.sign(digest, mechanism=Mechanism.ECDSA),
                ),
                Comparison(
                    "Ed25519 sign (64 bytes)",
                    lambda: eddsa.sign(message),
                    lambda: raw_ed.sign(message, mechanism=Mechanism.EDDSA),
                ),
                Comparison(
                    "ECDH P-256 (derive, read, destroy)",
                    lambda: es256.exchange(p256_peer_public),
                    lambda: raw_derive(raw_es, es_point),
                ),
                Comparison(
                    "X25519 (derive, read, destroy)",
                    lambda: x25519_key.exchange(x25519_peer_public),
                    lambda: raw_derive(raw_x, x_point),
                ),
            ]
            progress(
                f"comparing Janus and raw python-pkcs11: {len(comparisons)} operations x 2 "
                f"sides x {args.repeat} x {args.seconds:g} s"
            )
            run_comparisons(comparisons, args.seconds, args.repeat)

            scaling = None
            if not args.no_scaling:
                progress("starting 2 spawned worker processes")
                pool = WorkerPool(token, "bench-es256", digest)
                try:
                    progress(
                        f"scaling: {2 * len(SCALING_PAIRS)} configurations x {args.repeat} x "
                        f"{args.seconds:g} s"
                    )
                    samples = run_scaling(
                        pool, lambda: es256.sign_digest(digest), args.seconds, args.repeat
                    )
                finally:
                    pool.close()
                scaling = scaling_summary(samples)
        finally:
            raw_session.close()
            provider.close()
    env["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "pkcs11_provider",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/pkcs11_provider.py", *sys.argv[1:]]
            if argv is None
            else ["benchmarks/pkcs11_provider.py", *argv]
        ),
        "parameters": {"seconds": args.seconds, "repeat": args.repeat, "batch": BATCH},
        "environment": env,
        "comparisons": [c.summary() for c in comparisons],
        "scaling": scaling,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print(render(result))
    print(f"\n(whole run: {result['wall_seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.json, result)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
