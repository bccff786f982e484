"""Revocation propagation between cloud-agent instances on one event bus.

Usage::

    python benchmarks/revocation_propagation.py [--instances 3 5] [--samples 60]
        [--backend postgresql nats] [--missed 50] [--json OUT]

For each backend (a private PostgreSQL cluster, a single-node ``nats-server`` with
JetStream) and each instance count, that many real ``janus cloud serve --event-bus``
processes run on 127.0.0.1, each with its own state directory and SQLite ledger.  Per
sample, the owner grants a fresh capability ``P`` that each instance's grant key holds
a child of; the clock starts just before ``POST /v1/revocations`` of ``P`` at the first
instance and stops, per other instance, when that instance reports the grant's key
destroyed (``GET /v1/grants/{id}``, polled every millisecond: the key is destroyed in
the same step that stores the revocation, so from then on every use is refused).
The latency of a sample is the slowest instance's; p50/p99 are over samples.

Catch-up: one instance is stopped, ``--missed`` revocations are posted meanwhile, and
it is started again; reported are its own catch-up time (``catch_up_seconds`` of
``/healthz``: reading what it missed) and the wall time from the restart to serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import harness
import httpx

from agent.cloud.process import CloudProcess
from agent.protocol import KEYREQ_TYP, sign_request
from hardware.nats_server import NatsServer
from hardware.postgres import start_cluster
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.capability import Bundle
from policies.issue import grant
from policies.policy import IssuancePolicy
from policies.revocation import sign_revocation

ABILITY = Ability("janus:payments/eur", "sign/payment")
SPEND_USES = 10_000_000
# The built-in policy, with room for the throughput runs' uses.
MANY_USES = IssuancePolicy(
    (replace(IssuancePolicy.permissive().rules[0], max_uses=SPEND_USES),), source="<bench>"
)


class Owner:
    """The owner's root and an operator key that holds each shared capability ``P``."""

    def __init__(self, directory: Path) -> None:
        self.keys = SoftwareProvider.open(
            f"soft:dir={directory}", passphrase_source=lambda: "bench", allow_extractable=True
        )
        self.root = self.keys.generate(self.keys.key_uri("root"), Algorithm.EdDSA)
        self.operator = self.keys.generate(self.keys.key_uri("operator"), Algorithm.EdDSA)

    def shared(self, *, uses: int = 100, home: str | None = None) -> Bundle:
        return grant(
            self.root,
            audience=self.operator.did,
            abilities=[ABILITY],
            ttl_seconds=3600,
            uses=uses,
            depth=1,
            home=home,
            policy=MANY_USES,
        )

    def install(self, url: str, agent_did: str, shared: Bundle) -> str:
        request = sign_request(self.root, typ=KEYREQ_TYP, audience=agent_did, now=int(time.time()))
        created = httpx.post(f"{url}/v1/grants", json={"request": request}, timeout=30).json()
        child = grant(
            self.operator,
            audience=created["did"],
            abilities=[ABILITY],
            ttl_seconds=1800,
            uses=shared.leaf.limits.uses,
            proof=shared,
            policy=MANY_USES,
        )
        put = httpx.put(
            f"{url}/v1/grants/{created['grant_id']}/bundle", content=child.to_json(), timeout=30
        )
        put.raise_for_status()
        return str(created["grant_id"])

    def revocation(self, shared: Bundle, signer: KeyHandle | None = None) -> str:
        return sign_revocation(
            signer or self.root, revoked_id=shared.leaf.id, now=int(time.time()), reason="bench"
        )


@contextlib.contextmanager
def bus(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "nats":
        server = NatsServer(store=workdir / "nats")
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    cluster = start_cluster()
    try:
        yield cluster.dsn()
    finally:
        cluster.stop()


def caught_up(instance: CloudProcess, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = httpx.get(f"{instance.url}/healthz").json()["bus"]
        if state["caught_up"]:
            return state
        time.sleep(0.005)
    raise RuntimeError(f"{instance.url} did not catch up in {timeout:g} s")


async def _destroyed(client: httpx.AsyncClient, url: str, grant_id: str, start: float) -> float:
    while True:
        answer = await client.get(f"{url}/v1/grants/{grant_id}")
        if answer.json()["status"] == "destroyed":
            return time.perf_counter() - start
        await asyncio.sleep(0.001)


async def _sample(urls: list[str], grants: list[str], record: str) -> tuple[float, float]:
    """(until refused at every other instance, until the posting instance answered)."""
    async with httpx.AsyncClient(timeout=30) as client:
        start = time.perf_counter()
        posted = await client.post(f"{urls[0]}/v1/revocations", json={"record": record})
        answered = time.perf_counter() - start
        if posted.status_code != 200 or posted.json().get("published") is not True:
            raise RuntimeError(f"revocation not published: {posted.text}")
        waits = [
            _destroyed(client, url, grant_id, start)
            for url, grant_id in zip(urls[1:], grants[1:], strict=True)
        ]
        return max(await asyncio.gather(*waits)), answered


async def _spends(url: str, grant_id: str, seconds: float, concurrency: int) -> float:
    """Uses per second of one grant at one instance, ``concurrency`` clients at once."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                answer = await client.post(
                    f"{url}/v1/grants/{grant_id}/actions/sign/payment",
                    json={"resource": "janus:payments/eur", "request": {"amount": 1}},
                )
                if answer.status_code != 200:
                    raise RuntimeError(f"a use was refused: {answer.text}")
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def spends(
    owner: Owner, urls: list[str], dids: list[str], seconds: float, repeat: int
) -> dict[str, Any]:
    """Uses/s of a capability counted locally against one whose home is another instance."""
    local = owner.shared(uses=SPEND_USES)
    homed = owner.shared(uses=SPEND_USES, home=dids[0])
    local_grant = owner.install(urls[0], dids[0], local)
    forwarded_grant = owner.install(urls[1], dids[1], homed)
    runs: dict[str, list[float]] = {"local": [], "forwarded": []}
    for _ in range(repeat):
        runs["local"].append(asyncio.run(_spends(urls[0], local_grant, seconds, 16)))
        runs["forwarded"].append(asyncio.run(_spends(urls[1], forwarded_grant, seconds, 16)))
    local_median = statistics.median(runs["local"])
    forwarded_median = statistics.median(runs["forwarded"])
    return {
        "seconds": seconds,
        "concurrency": 16,
        "local_per_s": round(local_median, 1),
        "forwarded_per_s": round(forwarded_median, 1),
        "ratio": round(forwarded_median / local_median, 3),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(
    backend: str,
    count: int,
    samples: int,
    missed: int,
    workdir: Path,
    spend_seconds: float | None,
) -> dict[str, Any]:
    owner = Owner(workdir / "owner")
    with bus(backend, workdir) as url:
        instances = [
            CloudProcess(
                workdir / f"cloud-{n}", owner=owner.root.did, extra_args=["--event-bus", url]
            )
            for n in range(count)
        ]
        try:
            for instance in instances:
                caught_up(instance)
            urls = [i.url for i in instances]
            dids = [httpx.get(f"{u}/v1/did").json()["did"] for u in urls]
            latencies, answers = [], []
            with ThreadPoolExecutor(max_workers=count) as pool:
                for n in range(samples):
                    shared = owner.shared()
                    grants = list(pool.map(owner.install, urls, dids, [shared] * count))
                    latency, answered = asyncio.run(_sample(urls, grants, owner.revocation(shared)))
                    latencies.append(latency)
                    answers.append(answered)
                    if n % 10 == 9:
                        harness.progress(f"  {backend} x{count}: {n + 1}/{samples}")
                spent = None
                if spend_seconds is not None:
                    harness.progress(f"  {backend} x{count}: spends, local and forwarded")
                    spent = spends(owner, urls, dids, spend_seconds, 3)
                # Catch-up: the last instance is away while `missed` revocations pass.
                away = instances[-1]
                away.stop()
                for _ in range(missed):
                    shared = owner.shared()
                    owner.install(urls[0], dids[0], shared)
                    httpx.post(
                        f"{urls[0]}/v1/revocations",
                        json={"record": owner.revocation(shared)},
                        timeout=30,
                    ).raise_for_status()
                started = time.perf_counter()
                back = CloudProcess(
                    away.state_dir, owner=owner.root.did, extra_args=["--event-bus", url]
                )
                instances[-1] = back
                state = caught_up(back)
                serving = time.perf_counter() - started
        finally:
            for instance in instances:
                instance.stop()
    ms = [x * 1000 for x in latencies]
    posted_ms = [x * 1000 for x in answers]
    return {
        "backend": backend,
        "instances": count,
        "samples": samples,
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        # The revocation applied at the posting instance and durable on the bus.
        "posted_p50_ms": round(statistics.median(posted_ms), 2),
        "spends": spent,
        "catch_up": {
            "missed_revocations": missed,
            "catch_up_seconds": round(float(state["catch_up_seconds"]), 3),
            "restart_to_serving_seconds": round(serving, 3),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=harness.positive_int, nargs="+", default=[3, 5])
    parser.add_argument("--samples", type=harness.positive_int, default=60)
    parser.add_argument("--missed", type=harness.positive_int, default=50)
    parser.add_argument(
        "--backend", nargs="+", choices=["postgresql", "nats"], default=["postgresql", "nats"]
    )
    parser.add_argument(
        "--spend-seconds",
        type=harness.positive_float,
        default=5.0,
        help="per run of the local / forwarded spends comparison, at the smallest "
        "instance count (default 5; 3 runs each, medians)",
    )
    parser.add_argument("--no-spends", action="store_true", help="skip that comparison")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": harness.machine(), "runs": []}
    for backend in args.backend:
        for count in args.instances:
            if count < 2:
                parser.error("--instances: at least 2 (one posts, the others enforce)")
            harness.progress(f"{backend}, {count} instances…")
            with tempfile.TemporaryDirectory(prefix="janus-bench-revocation-") as tmp:
                spend_seconds = (
                    None if args.no_spends or count != min(args.instances) else args.spend_seconds
                )
                run_result = run(
                    backend, count, args.samples, args.missed, Path(tmp), spend_seconds
                )
            result["runs"].append(run_result)
            print(
                f"{backend:10} x{count}: posted p50 {run_result['posted_p50_ms']:6.2f} ms  "
                f"p50 {run_result['p50_ms']:7.2f} ms  "
                f"p99 {run_result['p99_ms']:7.2f} ms  max {run_result['max_ms']:7.2f} ms  "
                f"catch-up {run_result['catch_up']['catch_up_seconds']:.3f} s "
                f"(restart to serving {run_result['catch_up']['restart_to_serving_seconds']:.3f} s)"
            )
            if run_result["spends"]:
                spent = run_result["spends"]
                print(
                    f"{backend:10} x{count}: uses/s local {spent['local_per_s']:.0f}, "
                    f"forwarded to the home {spent['forwarded_per_s']:.0f} "
                    f"(ratio {spent['ratio']:.2f})"
                )
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        harness.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
