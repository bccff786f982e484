"""SoftHSM loaded into the process vs the same SoftHSM in a container behind p11-kit's RPC.

What does a token across a process boundary cost per operation (signing, and ECDH,
which p11-kit's RPC carries from 0.25 on)?  Both tokens are driven through Janus key
handles (one logged-in session, cached key handles), in one
run, with local and remote measurements interleaved so that load on the machine hits
both alike.  Prints the ratio and the time the RPC adds per call.

Run: .venv/bin/python benchmarks/pkcs11_remote.py [--seconds S] [--repeat N] [--json OUT]
(needs the container image: `make container-image`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # type: ignore[import-not-found]
import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec

from hardware.softhsm import ensure_token
from hardware.token_container import P11_KIT_VERSION, TokenContainer, ensure_image, find_engine
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import MechanismUnsupportedError

LABEL = "janus-test"


def operations(provider: Pkcs11Provider, tag: str) -> dict[str, Callable[[], object] | str]:
    """The measured operations on one token; a string says why one cannot run there."""
    p256 = provider.generate(f"pkcs11:object=bench-{tag}-p256", Algorithm.ES256)
    p384 = provider.generate(f"pkcs11:object=bench-{tag}-p384", Algorithm.ES384)
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    message = b"x" * 64
    ops: dict[str, Callable[[], object] | str] = {
        "ES256 sign": lambda: p256.sign(message),
        "ES384 sign": lambda: p384.sign(message),
    }
    try:
        p256.exchange(peer)
        ops["ECDH P-256"] = lambda: p256.exchange(peer)
    except MechanismUnsupportedError as exc:
        ops["ECDH P-256"] = f"not available: {exc}"
    return ops


def main() -> int:
    parser = harness.add_run_arguments(
        argparse.ArgumentParser(description=__doc__), seconds=0.5, repeat=7
    )
    args = parser.parse_args()
    engine = find_engine()
    ensure_image(engine)
    with tempfile.TemporaryDirectory(prefix="janus-bench-remote-") as tmp:
        local = ensure_token(Path(tmp, "local"), LABEL)
        local.activate()
        container = TokenContainer.for_state_dir(
            engine, Path(tmp, "container"), (LABEL,), owned=True
        )
        container.up()
        try:
            os.environ["P11_KIT_SERVER_ADDRESS"] = container.address
            result = measure(
                Pkcs11Provider.open(local.uri()),
                Pkcs11Provider.open(container.token(LABEL).uri()),
                args.seconds,
                args.repeat,
            )
        finally:
            container.down()
    result["environment"] = {
        **harness.machine(),
        "engine": engine.name,
        "python_pkcs11": harness.version("python-pkcs11"),
        "p11_kit_client": pkcs11.lib(container.token(LABEL).module_path).library_description,
        # Built from Debian's source (hardware/container/build-p11-kit.sh), client and
        # server alike: bookworm's 0.24 cannot carry ECDH over the RPC.
        "p11_kit_version": P11_KIT_VERSION,
    }
    report(result)
    if args.json:
        harness.write_json(args.json, result)
    return 0


def measure(
    local: Pkcs11Provider, remote: Pkcs11Provider, seconds: float, repeat: int
) -> dict[str, Any]:
    here, there = operations(local, "local"), operations(remote, "remote")
    rows: dict[str, Any] = {}
    for name, local_op in here.items():
        remote_op = there[name]
        if isinstance(local_op, str) or isinstance(remote_op, str):
            rows[name] = {"skipped": remote_op if isinstance(remote_op, str) else local_op}
            continue
        samples: dict[str, list[float]] = {"local": [], "remote": []}
        for i in range(repeat):
            harness.progress(f"{name}: {i + 1}/{repeat}")
            samples["local"].append(harness.ops_per_second(local_op, seconds, 20))
            samples["remote"].append(harness.ops_per_second(remote_op, seconds, 20))
        local_rate, remote_rate = (
            harness.median(samples["local"]),
            harness.median(samples["remote"]),
        )
        rows[name] = {
            "local_ops_per_s": local_rate,
            "remote_ops_per_s": remote_rate,
            "ratio_local_over_remote": local_rate / remote_rate,
            "added_us_per_call": (1 / remote_rate - 1 / local_rate) * 1e6,
            "samples": samples,
        }
    return {"seconds": seconds, "repeat": repeat, "operations": rows}


def report(result: dict[str, Any]) -> None:
    print(f"{'operation':<12} {'local ops/s':>12} {'p11-kit ops/s':>14} {'ratio':>7} {'added':>9}")
    for name, row in result["operations"].items():
        if "skipped" in row:
            print(f"{name:<12} {row['skipped']}")
            continue
        print(
            f"{name:<12} {row['local_ops_per_s']:>12,.0f} {row['remote_ops_per_s']:>14,.0f} "
            f"{row['ratio_local_over_remote']:>6.2f}x {row['added_us_per_call']:>6.0f} µs"
        )


if __name__ == "__main__":
    sys.exit(main())
