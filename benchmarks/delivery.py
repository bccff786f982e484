"""Messages per second through a sending and a receiving service, against direct delivery.

Usage::

    python benchmarks/delivery.py [--seconds 5] [--repeat 3] [--messages 1000]
        [--size 256] [--concurrency 16] [--json OUT]

Two real cloud agents run on 127.0.0.1 (``janus cloud serve --receiving`` and
``janus cloud serve --sending``), owned by an edge identity in a SoftHSM token made for
the run.  Side by side:

- *direct*: clients POST sealed messages to the receiving service's delivery route
  (``/v1/receiving/deliveries``) for ``--seconds``; messages accepted per second.
- *end to end*: clients submit ``--messages`` messages to the sending service under a
  ``msg/submit`` grant (each a capability use, committed to the ledger and to the
  sending store before it is answered); the sending service forwards them to the
  receiving service; the time runs until the last one is held there.

Addresses are sealed before the clock starts (the sender's HPKE seal is not what is
measured).  The ratio end-to-end / direct is what the store-and-forward hop costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import httpx

SOFTHSM_LABEL = "janus-bench-delivery"
GRANT_USES = 1_000_000
EDGE_POLICY = f"""\
# Issuance policy for the delivery benchmark: one large msg/submit grant.
version = 1

[defaults]
max_ttl = "1h"
max_uses = {GRANT_USES}
max_depth = 0

[[rule]]
name = "bench-sending"
audiences = ["*"]
abilities = [{{ can = "msg/submit", with = "janus:sending" }}]
max_ttl = "1h"
max_uses = {GRANT_USES}
"""


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[dict[str, Any]]:
    from hardware.softhsm import ensure_token

    token = ensure_token(workdir / "token", SOFTHSM_LABEL)
    token.activate()

    from agent.cloud.process import CloudProcess
    from agent.edge.agent import EdgeAgent
    from agent.relationships.delivery import SENDING_RESOURCE, SUBMIT_ACTION
    from policies.abilities import Ability

    edge_dir = workdir / "edge"
    edge_dir.mkdir(mode=0o700)
    (edge_dir / "policy.toml").write_text(EDGE_POLICY)
    edge, _ = EdgeAgent.init(edge_dir, token.uri())
    receiving = CloudProcess(
        workdir / "receiving",
        owner=edge.did,
        extra_args=["--receiving", "--receiving-quota", "10000"],
    )
    sending = CloudProcess(
        workdir / "sending",
        owner=edge.did,
        extra_args=["--sending", "--sending-allow-host", "127.0.0.1"],
    )
    try:
        granted = edge.grant(
            sending.url,
            [Ability(SENDING_RESOURCE, SUBMIT_ACTION)],
            ttl_seconds=3600,
            uses=GRANT_USES,
        )
        yield {"edge": edge, "receiving": receiving, "sending": sending, "grant": granted}
    finally:
        sending.stop()
        receiving.stop()


def sealed_messages(receiving_url: str, held: Any, count: int, size: int) -> list[dict[str, str]]:
    from agent.relationships.delivery import ReceivingClient, delivery_body, seal_address

    key = ReceivingClient(receiving_url).service_key()
    bodies = []
    for _ in range(count):
        ciphertext = os.urandom(size)
        bodies.append(delivery_body(seal_address(key, held.address, ciphertext), ciphertext))
    return bodies


async def post_all(
    url: str, bodies: list[dict[str, Any]], concurrency: int, deadline: float | None
) -> int:
    """POST the bodies with ``concurrency`` clients; how many were accepted (2xx)."""
    accepted = 0
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal accepted
            while queue and (deadline is None or time.perf_counter() < deadline):
                body = queue.pop()
                response = await client.post(url, json=body)
                if response.status_code >= 300:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
                accepted += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


def count_held(receiving_url: str, edge: Any, held: Any) -> int:
    from agent.protocol import sign_request
    from agent.relationships.delivery import RECEIVING_TYP

    did = httpx.get(f"{receiving_url}/v1/did", timeout=10).json()["did"]
    request = sign_request(
        edge.root,
        typ=RECEIVING_TYP,
        audience=did,
        now=int(time.time()),
        op="pickup",
        pickup_id=held.pickup_id,
        limit=1,
    )
    answer = httpx.post(
        f"{receiving_url}/v1/receiving/pickup", json={"request": request}, timeout=30
    ).json()
    return len(answer["deliveries"]) + int(answer["remaining"])


def direct_run(env: dict[str, Any], args: argparse.Namespace) -> float:
    from agent.relationships.delivery import ReceivingClient

    receiving = env["receiving"]
    held = ReceivingClient(receiving.url).create_address(env["edge"].root, quota=10_000)
    # More than can be delivered in the time: the run stops at the deadline.
    bodies = sealed_messages(receiving.url, held, args.pool, args.size)
    started = time.perf_counter()
    accepted = asyncio.run(
        post_all(
            f"{receiving.url}/v1/receiving/deliveries",
            bodies,
            args.concurrency,
            started + args.seconds,
        )
    )
    elapsed = time.perf_counter() - started
    if accepted >= len(bodies):
        harness.progress("  (the pool ran out before the deadline: raise --pool)")
    return accepted / elapsed


def end_to_end_run(env: dict[str, Any], args: argparse.Namespace) -> float:
    from agent.relationships.delivery import ReceivingClient, submit_request
    from janus_hsm.public_keys import b64url_decode

    receiving, sending, edge = env["receiving"], env["sending"], env["edge"]
    held = ReceivingClient(receiving.url).create_address(edge.root, quota=10_000)
    grant_id = env["grant"]["grant_id"]
    bodies = []
    for body in sealed_messages(receiving.url, held, args.messages, args.size):
        request = submit_request(
            receiving.url, b64url_decode(body["sealed"]), b64url_decode(body["ciphertext"])
        )
        bodies.append({"grant_id": grant_id, "request": request})
    started = time.perf_counter()
    asyncio.run(post_all(f"{sending.url}/v1/sending/submissions", bodies, args.concurrency, None))
    submitted = time.perf_counter() - started
    while count_held(receiving.url, edge, held) < args.messages:
        if time.perf_counter() - started > 300:
            raise RuntimeError("the messages did not all arrive within 300 s")
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    harness.progress(f"  submitted in {submitted:.2f} s, all held after {elapsed:.2f} s")
    return float(args.messages / elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_run_arguments(parser, seconds=5.0, repeat=3)
    parser.add_argument("--messages", type=harness.positive_int, default=1000)
    parser.add_argument("--size", type=harness.positive_int, default=256)
    parser.add_argument("--concurrency", type=harness.positive_int, default=16)
    parser.add_argument("--pool", type=harness.positive_int, default=8000)
    args = parser.parse_args(argv)
    if args.messages > 10_000:
        parser.error("--messages: at most 10000 (one address's largest quota)")

    result: dict[str, Any] = {
        "benchmark": "delivery",
        **harness.machine(),
        "httpx": harness.version("httpx"),
        "pyhpke": harness.version("pyhpke"),
        "parameters": {
            "seconds": args.seconds,
            "repeat": args.repeat,
            "messages": args.messages,
            "size": args.size,
            "concurrency": args.concurrency,
        },
    }
    with tempfile.TemporaryDirectory(prefix="janus-bench-delivery-") as tmp:
        harness.progress("setting up: SoftHSM token, edge identity, receiving and sending agents")
        with services(Path(tmp)) as env:
            direct, e2e = [], []
            for n in range(args.repeat):
                harness.progress(f"run {n + 1}/{args.repeat}: direct delivery")
                direct.append(direct_run(env, args))
                harness.progress(f"  {direct[-1]:.0f} messages/s")
                harness.progress(f"run {n + 1}/{args.repeat}: through the sending service")
                e2e.append(end_to_end_run(env, args))
                harness.progress(f"  {e2e[-1]:.0f} messages/s")
    result["loadavg_end"] = list(os.getloadavg())
    direct_median, e2e_median = harness.median(direct), harness.median(e2e)
    result["results"] = {
        "direct_deliver_per_s": {"runs": direct, "median": direct_median},
        "end_to_end_per_s": {"runs": e2e, "median": e2e_median},
        "ratio_end_to_end_over_direct": e2e_median / direct_median,
    }
    print(f"{'path':<40} {'messages/s':>12}")
    print(f"{'direct: POST /v1/receiving/deliveries':<40} {direct_median:>12.0f}")
    print(f"{'end to end: submit -> forward -> held':<40} {e2e_median:>12.0f}")
    print(f"ratio end-to-end / direct: {e2e_median / direct_median:.2f}")
    if args.json:
        harness.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
