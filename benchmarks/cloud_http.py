"""Benchmark: authorised ``sign`` requests per second through the cloud agent's HTTP API.

Why these measurements:

* Every ``POST /v1/grants/{id}/actions/sign/payment`` to ``janus cloud serve`` is a
  full authorised use: the agent looks the grant up, signs a fresh invocation with the
  grant's key, verifies it under the capability chain (cached after the first time),
  records the use durably in the ledger (SQLite, WAL, ``synchronous=FULL``, group
  commit), signs the payload and returns evidence.  The question is what that costs
  compared with the HTTP stack alone, so the same load is run side by side against a
  *bare* endpoint on the same stack: a minimal Starlette app on uvicorn, started the
  way ``janus cloud serve`` starts its own (``uvicorn.run(app, host, port, log_level,
  access_log=False)``, one process, so uvloop and httptools when installed), with one
  POST route on the same path that reads and parses the same JSON body and returns a
  small JSON object.  Target: janus/bare >= 0.4 in requests/s.
* A third target, *unauthorised signing*, is the same app whose handler signs the
  payload (canonical JSON, Ed25519 through the libsodium call Janus uses for software
  keys) and returns the signature: janus/sign is what authorisation, the durable ledger
  write and the evidence cost over the signature itself (no target).
* A fourth, *unauthorised evidence*, does everything a use does except authorise and
  record it: it signs an invocation (Janus's claims) and the payload and answers with
  evidence in Janus's format and the real grant's bundle.  evidence/bare is the most
  Janus could reach with authorisation and the ledger free; janus/evidence is what
  they cost (target: janus/evidence >= 0.7).
* Both servers are real processes on 127.0.0.1; the cloud agent is the one the demo
  runs (``agent.cloud.process.CloudProcess``), owned by an edge identity whose root key
  is in a SoftHSM token made for the run, and the grant was made by ``EdgeAgent.grant``.
* Load: ``wrk`` if installed (``-t2 -c32 -d10s --latency``, a Lua script for the POST
  body and a ``done`` hook that prints exact counts and percentiles), otherwise a
  minimal asyncio HTTP/1.1 client with one keep-alive stream per connection, in this
  process (slower than wrk, so the bare figure is partly the client's limit).  httpx's
  AsyncClient is available with ``--generator httpx`` but managed only 100-300
  requests/s here, too slow to load the bare endpoint.  Same generator, body and
  connections for every target, rotating which goes first; medians of ``--repeat``.
  The client shares the machine's cores with the server, as it would in any loopback
  test.
* Correctness is checked, not assumed: a sample response must be 200 with evidence
  that verifies offline back to the token's root key; each run's 2xx count is compared
  with the server's own count (``/metrics``); at the end the ledger's use count for
  the capability must equal every 200 the server sent.

Run it as::

    .venv/bin/python benchmarks/cloud_http.py [--seconds 10] [--connections 32]
        [--repeat 3] [--json OUT] [--profile]

(about 3 minutes with the defaults on 2 vCPUs; ``--profile`` adds two py-spy recordings of
the cloud agent under the same load, about 40 s, and needs ``pip install py-spy``.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
import httpx
from harness import median, positive_int, progress

# Benchmark the checkout this file lives in, not whatever janus_hsm is installed.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.cloud.process import ServerProcess  # noqa: E402
from hardware.postgres import free_port  # noqa: E402

DEFAULT_SECONDS = 10
DEFAULT_CONNECTIONS = 32
DEFAULT_REPEAT = 3
WARMUP_SECONDS = 2
WRK_THREADS = 2
# wrk's default (2 s) would count slow answers as errors; no answer in a run is older
# than the run itself, so a timeout of at least the run's length counts none.
CLIENT_TIMEOUT = 60
SETTLE_SECONDS = 0.5  # before checking that the server is idle after a run
DRAIN_LIMIT = 120.0  # longest wait for a server to finish its queue after a run
TARGET_RATIO = 0.4
# Janus / unauthorised evidence: what authorisation and the durable ledger write may cost.
EVIDENCE_TARGET = 0.7
HOST = "127.0.0.1"
SOFTHSM_LABEL = "bench-http"
PROFILE_RATE = 100  # py-spy samples per second
CODE_UNDER_TEST = ("agent", "policies", "janus_hsm", "hardware")

RESOURCE = "janus:payments/eur"
ACTION = "sign/payment"
PAYMENT = {"amount": 1234, "currency": "EUR", "to": "alice"}
BODY = json.dumps({"resource": RESOURCE, "request": PAYMENT}, separators=(",", ":"))
CAVEATS = ({"field": "amount", "le": 10000},)
GRANT_USES = 10_000_000
GRANT_TTL = 3600
ROUTE = "/v1/grants/{grant_id}/actions/{action:path}"  # the cloud agent's own pattern

# Written to the edge state dir before EdgeAgent.init, which keeps an existing policy.
EDGE_POLICY = f"""\
# Issuance policy for the HTTP benchmark: one long, large sign/payment grant.
version = 1

[defaults]
max_ttl = "1h"
max_uses = {GRANT_USES}
max_depth = 0

[[rule]]
name = "bench-payments"
audiences = ["*"]
abilities = [{{ can = "sign/payment", with = "janus:payments/*" }}]
max_ttl = "1h"
max_uses = {GRANT_USES}
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "JANUS-BENCH-WRK {{\\"requests\\": %.0f, \\"duration_us\\": %.0f, \\"connect\\": %.0f, " ..
    "\\"read\\": %.0f, \\"write\\": %.0f, \\"status\\": %.0f, \\"timeout\\": %.0f, " ..
    "\\"p50_us\\": %.0f, \\"p90_us\\": %.0f, \\"p99_us\\": %.0f, \\"max_us\\": %.0f}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
WRK_MARKER = "JANUS-BENCH-WRK "


# ------------------------------------------------------------------- the bare server


def serve_bare(port: int, mode: str, fixture: Path | None = None) -> None:
    """A baseline on the cloud agent's stack: ``echo`` has nothing behind the route;
    ``sign`` signs the payload, unauthorised (what a signing service without Janus
    would do: the same libsodium Ed25519 call Janus makes for a software key);
    ``evidence`` answers as Janus does, unauthorised: see ``evidence`` below."""
    import hashlib

    import nacl.bindings
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from janus_hsm.public_keys import b64url_encode, to_did_key

    public, secret = nacl.bindings.crypto_sign_keypair()
    signature_bytes = nacl.bindings.crypto_sign_BYTES

    def ed25519(message: bytes) -> bytes:
        return nacl.bindings.crypto_sign(message, secret)[:signature_bytes]

    def compact(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {
                "action": request.path_params["action"],
                "grant_id": request.path_params["grant_id"],
                "amount": body["request"]["amount"],
            }
        )

    async def sign(request: Request) -> JSONResponse:
        body = await request.json()
        payload = body["request"]
        signature = ed25519(compact(payload).encode())
        return JSONResponse(
            {
                "action": request.path_params["action"],
                "payload": payload,
                "alg": "EdDSA",
                "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
            }
        )

    # ``evidence``: the part of an authorised use that no authorisation logic can take
    # away, with nothing else.  It makes and signs an invocation (the claims Janus
    # signs: holder, capability, action, resource, the request's digest, a nonce, times,
    # audience), signs the payload, and returns evidence in Janus's format with the real
    # grant's bundle (pre-rendered, spliced as the cloud agent does).  It checks
    # nothing and records nothing: no caveats, no chain, no ledger, no durable write.
    # Janus at this baseline's speed would mean authorisation and the ledger were free.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    # The grant's bundle and capability id, from the cloud agent's sample answer.
    grant = json.loads(fixture.read_text()) if fixture is not None else {}
    bundle_text = compact(grant.get("bundle", {}))
    capability = grant.get("capability", "urn:bench")

    did = to_did_key(Ed25519PublicKey.from_public_bytes(public))
    kid = f"{did}#{did.removeprefix('did:key:')}"
    header = b64url_encode(compact({"alg": "EdDSA", "kid": kid, "typ": "janus-inv+jws"}).encode())
    counted = [0]

    async def evidence(request: Request) -> Response:
        body = await request.json()
        payload, action = body["request"], request.path_params["action"]
        canonical = compact(payload).encode()
        now = int(time.time())
        claims = {
            "iss": did,
            "cap": capability,
            "can": action,
            "with": body["resource"],
            "dig": b64url_encode(hashlib.sha256(canonical).digest()),
            "nonce": b64url_encode(os.urandom(16)),
            "iat": now,
            "exp": now + 60,
            "aud": did,
        }
        signing_input = f"{header}.{b64url_encode(compact(claims).encode())}"
        invocation = f"{signing_input}.{b64url_encode(ed25519(signing_input.encode()))}"
        counted[0] += 1
        outer = compact(
            {
                "action": action,
                "grant_id": request.path_params["grant_id"],
                "uses": {capability: counted[0]},
            }
        )
        inner = compact(
            {
                "typ": "janus-evidence/1",
                "payload": payload,
                "signer": did,
                "alg": "EdDSA",
                "signature": b64url_encode(ed25519(canonical)),
                "invocation": invocation,
            }
        )
        text = f'{outer[:-1]},"evidence":{inner[:-1]},"bundle":{bundle_text}}}}}'
        return Response(text.encode(), media_type="application/json")

    handlers = {"echo": echo, "sign": sign, "evidence": evidence}
    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route(ROUTE, handlers[mode], methods=["POST"]),
        ]
    )
    # As agent/cli/cloud.py runs the cloud agent (its default log level is "warning").
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


class BareProcess(ServerProcess):
    """This script run with --serve-bare PORT [--bare-mode MODE], as a subprocess."""

    def __init__(self, log_dir: Path, mode: str = "echo", fixture: Path | None = None) -> None:
        port = free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
        argv += ["--bare-mode", mode]
        if fixture is not None:
            argv += ["--bare-fixture", str(fixture)]
        super().__init__(argv, port=port, log_path=log_dir / f"bare-{mode}-{port}.log")


# ----------------------------------------------------------------------- the load


@dataclass
class LoadResult:
    """One timed run of the load generator against one target."""

    target: str
    seconds: float  # measured by the generator
    requests: int  # completed responses
    ok: int  # 2xx responses
    non_2xx: int
    errors: dict[str, int]  # socket errors and timeouts, by kind
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu: float = float("nan")  # CPU seconds of the server per wall second
    # The same, of the main thread alone (the event loop); the rest is other threads
    # (for the cloud agent: the ledger's writer and the thread pool).
    server_cpu_loop: float = float("nan")
    drain_seconds: float = 0.0  # until the server was idle after the load stopped
    server_ok: int | None = None  # 200s the server counted (cloud agent only)
    server_other: dict[str, int] = field(default_factory=dict)  # its non-200s by status

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "requests_per_s": self.rps}


class Wrk:
    name = "wrk"

    def __init__(self, workdir: Path, connections: int) -> None:
        path = shutil.which("wrk")
        if path is None:
            raise RuntimeError("wrk is not installed")
        self.path = path
        self.connections = connections
        self.threads = min(WRK_THREADS, connections)
        self.script = workdir / "post.lua"
        self.script.write_text(WRK_SCRIPT.format(body=BODY))
        done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
        first = (done.stdout + done.stderr).splitlines()[0]
        self.version = first.split(" Copyright")[0].strip()

    def describe(self) -> str:
        return (
            f"wrk -t{self.threads} -c{self.connections} -d<s>s --latency --timeout "
            f"{CLIENT_TIMEOUT}s -s post.lua URL  ({self.version})"
        )

    def run(self, target: str, url: str, seconds: int) -> LoadResult:
        args = [
            self.path,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            f"{CLIENT_TIMEOUT}s",
            "-s",
            str(self.script),
            url,
        ]
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith(WRK_MARKER)), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
        data = json.loads(line[len(WRK_MARKER) :])
        errors = {k: int(data[k]) for k in ("connect", "read", "write", "timeout") if data[k]}
        return LoadResult(
            target=target,
            seconds=data["duration_us"] / 1e6,
            requests=int(data["requests"]),
            ok=int(data["requests"]) - int(data["status"]),
            non_2xx=int(data["status"]),
            errors=errors,
            p50_ms=data["p50_us"] / 1e3,
            p90_ms=data["p90_us"] / 1e3,
            p99_ms=data["p99_us"] / 1e3,
            max_ms=data["max_us"] / 1e3,
        )

    def start(self, url: str, seconds: int) -> subprocess.Popen[bytes]:
        """Load in the background (for profiling); the caller waits for it."""
        return subprocess.Popen(
            [
                self.path,
                f"-t{self.threads}",
                f"-c{self.connections}",
                f"-d{seconds}s",
                "--timeout",
                f"{CLIENT_TIMEOUT}s",
                "-s",
                str(self.script),
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def load_result(
    target: str,
    elapsed: float,
    latencies: list[float],
    statuses: collections.Counter[int],
    errors: collections.Counter[str],
) -> LoadResult:
    latencies.sort()
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return LoadResult(
        target=target,
        seconds=elapsed,
        requests=len(latencies),
        ok=ok,
        non_2xx=len(latencies) - ok,
        errors=dict(errors),
        p50_ms=percentile(latencies, 50) * 1e3,
        p90_ms=percentile(latencies, 90) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        max_ms=(latencies[-1] if latencies else float("nan")) * 1e3,
    )


class AsyncioLoad:
    """The fallback: one asyncio stream per connection, keep-alive, one request in flight
    on each.  It speaks just enough HTTP/1.1 for this request (both servers answer with
    a Content-Length).  Requests in flight at the deadline are waited for and counted."""

    name = "asyncio"

    def __init__(self, workdir: Path, connections: int) -> None:
        self.connections = connections
        self.version = f"Python {platform.python_version()} asyncio streams"

    def describe(self) -> str:
        return (
            f"asyncio HTTP/1.1 keep-alive client in the benchmark process, "
            f"{self.connections} connections  ({self.version})"
        )

    def run(self, target: str, url: str, seconds: int) -> LoadResult:
        return asyncio.run(self._run(target, url, seconds))

    async def _run(self, target: str, url: str, seconds: float) -> LoadResult:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port or 80
        body = BODY.encode()
        request = (
            f"POST {parsed.raw_path.decode()} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        latencies: list[float] = []
        statuses: collections.Counter[int] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        started = time.perf_counter()
        deadline = started + seconds

        async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = next(
                (
                    int(x.split(b":", 1)[1])
                    for x in lines
                    if x.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is None:
                raise ValueError("response without Content-Length")
            await reader.readexactly(length)
            return status

        async def worker() -> None:
            stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if stream is None:
                        stream = await asyncio.open_connection(host, port)
                    status = await asyncio.wait_for(exchange(*stream), CLIENT_TIMEOUT)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    errors[type(exc).__name__] += 1
                    if stream is not None:
                        stream[1].close()
                    stream = None
                    continue
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
            if stream is not None:
                stream[1].close()

        await asyncio.gather(*(worker() for _ in range(self.connections)))
        elapsed = time.perf_counter() - started
        return load_result(target, elapsed, latencies, statuses, errors)


class HttpxLoad:
    """asyncio + httpx, ``connections`` requests in flight (only with --generator httpx:
    on these machines httpx's AsyncClient managed 100-300 requests/s against the bare
    endpoint, which measures the client rather than the server)."""

    name = "httpx"

    def __init__(self, workdir: Path, connections: int) -> None:
        self.connections = connections
        self.version = f"httpx {httpx.__version__}"

    def describe(self) -> str:
        return (
            f"asyncio + httpx.AsyncClient in the benchmark process, {self.connections} "
            f"connections  ({self.version})"
        )

    def run(self, target: str, url: str, seconds: int) -> LoadResult:
        return asyncio.run(self._run(target, url, seconds))

    async def _run(self, target: str, url: str, seconds: float) -> LoadResult:
        limits = httpx.Limits(
            max_connections=self.connections, max_keepalive_connections=self.connections
        )
        content = BODY.encode()
        headers = {"content-type": "application/json"}
        latencies: list[float] = []
        statuses: collections.Counter[int] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        async with httpx.AsyncClient(limits=limits, timeout=CLIENT_TIMEOUT) as client:
            started = time.perf_counter()
            deadline = started + seconds

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    try:
                        response = await client.post(url, content=content, headers=headers)
                    except httpx.HTTPError as exc:
                        errors[type(exc).__name__] += 1
                        continue
                    latencies.append(time.perf_counter() - t0)
                    statuses[response.status_code] += 1

            await asyncio.gather(*(worker() for _ in range(self.connections)))
            elapsed = time.perf_counter() - started
        return load_result(target, elapsed, latencies, statuses, errors)


LoadGenerator = Wrk | AsyncioLoad | HttpxLoad


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int, *, thread: int | None = None) -> float:
    """User + system CPU time of a process, all its threads (or one thread of it)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- the cloud agent


@dataclass
class JanusTarget:
    url: str  # the action URL
    base: str  # the cloud agent
    pid: int
    grant_id: str
    capability: str  # the leaf capability's id: its use count is the ledger's tally
    owner: str


def server_counts(base: str) -> tuple[dict[str, int], int]:
    """From /metrics: the act route's responses by status, and sign/payment uses."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    statuses: dict[str, int] = {}
    uses = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "janus_cloud_requests_total" and sample.labels.get("route") == "act":
                statuses[sample.labels["status"]] = int(sample.value)
            elif (
                sample.name == "janus_cloud_capability_uses_total"
                and sample.labels.get("action") == ACTION
            ):
                uses = int(sample.value)
    return statuses, uses


def post_payment(url: str) -> httpx.Response:
    return httpx.post(
        url, content=BODY.encode(), headers={"content-type": "application/json"}, timeout=30
    )


def check_baseline(mode: str, url: str, janus_bytes: int) -> None:
    """One request before timing: the baseline answers as it should."""
    response = post_payment(url)
    body = response.json() if response.status_code == 200 else {}
    if mode == "sign":
        good = body.get("payload") == PAYMENT and len(body.get("signature", "")) == 86
    elif mode == "evidence":
        evidence = body.get("evidence", {})
        good = (
            evidence.get("payload") == PAYMENT
            and len(evidence.get("signature", "")) == 86
            and evidence.get("invocation", "").count(".") == 2
            # The same answer as the cloud agent's, give or take its DIDs and counts.
            and abs(len(response.content) - janus_bytes) < 0.1 * janus_bytes
        )
    else:
        good = body.get("amount") == PAYMENT["amount"]
    if not good:
        raise RuntimeError(f"{mode} baseline: {response.status_code} {response.text[:200]}")


def check_sample(target: JanusTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """One request before timing: 200, with evidence that verifies to the token's key.

    Returns what to report, and the evidence (the evidence baseline answers with its
    bundle)."""
    from agent.evidence import verify_evidence

    response = post_payment(target.url)
    if response.status_code != 200:
        raise RuntimeError(f"sample sign request: {response.status_code} {response.text}")
    body = response.json()
    evidence = body.get("evidence")
    if not isinstance(evidence, dict):
        raise RuntimeError(f"sample sign request returned no evidence: {body}")
    verified = verify_evidence(evidence, root=target.owner)
    if verified.principal != target.owner or evidence["payload"] != PAYMENT:
        raise RuntimeError("the sample evidence does not verify back to the owner's root key")
    report = {
        "status": response.status_code,
        "response_bytes": len(response.content),
        "evidence_verified": True,
        "uses": body.get("uses"),
    }
    return report, evidence


@contextlib.contextmanager
def janus_service(
    workdir: Path, variants: dict[str, Path] | None = None
) -> Iterator[tuple[JanusTarget, Any, dict[str, JanusTarget]]]:
    """SoftHSM token, edge identity, a real cloud agent, and a large grant to it.

    ``variants``: name -> a copy of the source tree; each also gets a cloud agent run
    from that tree (``python -m agent`` in it, so its modules are the ones imported)
    and a grant of its own from the same edge identity."""
    from hardware.softhsm import ensure_token

    token = ensure_token(workdir / "token", SOFTHSM_LABEL)
    token.activate()  # before anything loads the PKCS#11 module: SoftHSM reads it once

    from agent.cloud.process import CloudProcess
    from agent.edge.agent import EdgeAgent
    from policies.abilities import Ability

    edge_dir = workdir / "edge"
    edge_dir.mkdir(mode=0o700)
    (edge_dir / "policy.toml").write_text(EDGE_POLICY)
    edge, _ = EdgeAgent.init(edge_dir, token.uri())
    cloud = CloudProcess(workdir / "cloud", owner=edge.did)
    others: dict[str, Any] = {}

    def target(process: Any) -> JanusTarget:
        granted = edge.grant(
            process.url,
            [Ability(RESOURCE, ACTION, CAVEATS)],
            ttl_seconds=GRANT_TTL,
            uses=GRANT_USES,
        )
        if granted["status"] != "active":
            raise RuntimeError(f"the grant is not active: {granted}")
        grant_id = granted["grant_id"]
        return JanusTarget(
            url=f"{process.url}/v1/grants/{grant_id}/actions/{ACTION}",
            base=process.url,
            pid=process.process.pid,
            grant_id=grant_id,
            capability=granted["capability"],
            owner=edge.did,
        )

    try:
        here = Path.cwd()
        for name, tree in (variants or {}).items():
            os.chdir(tree)  # `python -m agent` imports from its working directory
            try:
                others[name] = CloudProcess(workdir / f"cloud-{name}", owner=edge.did)
            finally:
                os.chdir(here)
        yield target(cloud), cloud, {name: target(p) for name, p in others.items()}
    except BaseException:
        progress("--- cloud agent log ---\n" + cloud.output())
        raise
    finally:
        cloud.stop()
        for process in others.values():
            process.stop()


# ----------------------------------------------------------------------- running


def wait_idle(pid: int, base: str | None) -> float:
    """Wait until the server has finished the requests still queued when the load stopped.

    The generator stops at its deadline, but the server goes on with what it had
    accepted (for a slow server, up to one request per connection, each queued behind
    the others); the next run must not share the machine with that work.  Idle means
    a quiet half second: under 10% of a core and, for the cloud agent, no new answers.
    """
    started = time.monotonic()
    time.sleep(SETTLE_SECONDS)
    while time.monotonic() - started < DRAIN_LIMIT:
        cpu, answered = cpu_seconds(pid), total_answers(base)
        time.sleep(0.5)
        if (cpu_seconds(pid) - cpu) < 0.05 and total_answers(base) == answered:
            break
    else:
        progress(f"  the server was still busy {DRAIN_LIMIT:.0f} s after the load stopped")
    return time.monotonic() - started


def total_answers(base: str | None) -> int:
    return sum(server_counts(base)[0].values()) if base else 0


def measure(
    generator: LoadGenerator, target: str, url: str, pid: int, seconds: int, base: str | None
) -> LoadResult:
    before = server_counts(base) if base else None
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    loop_before = cpu_seconds(pid, thread=pid)  # the main thread's id is the process's
    result = generator.run(target, url, seconds)
    # Server CPU during the load only (not while it drains its queue afterwards).
    wall = time.monotonic() - wall_before
    result.server_cpu = (cpu_seconds(pid) - cpu_before) / wall
    result.server_cpu_loop = (cpu_seconds(pid, thread=pid) - loop_before) / wall
    result.drain_seconds = wait_idle(pid, base)
    if base and before is not None:
        after = server_counts(base)
        deltas = {s: n - before[0].get(s, 0) for s, n in after[0].items()}
        result.server_ok = deltas.pop("200", 0)
        result.server_other = {s: n for s, n in deltas.items() if n}
    return result


def run_rounds(
    generator: LoadGenerator,
    baselines: dict[str, tuple[str, int]],
    janus: JanusTarget,
    seconds: int,
    repeat: int,
    variants: dict[str, JanusTarget] | None = None,
) -> dict[str, list[LoadResult]]:
    """``repeat`` rounds of one run per target, rotating which goes first.

    ``baselines``: target name -> (URL, server pid); ``variants``: more cloud agents,
    measured as ``janus:NAME``.
    """

    def baseline(name: str, url: str, pid: int) -> Callable[[int], LoadResult]:
        return lambda s: measure(generator, name, url, pid, s, None)

    sides = {name: baseline(name, url, pid) for name, (url, pid) in baselines.items()}

    def cloud(name: str, target: JanusTarget) -> Callable[[int], LoadResult]:
        return lambda s: measure(generator, name, target.url, target.pid, s, target.base)

    sides["janus"] = cloud("janus", janus)
    for name, other in (variants or {}).items():
        sides[f"janus:{name}"] = cloud(f"janus:{name}", other)
    progress(f"warming up the servers ({WARMUP_SECONDS} s each)")
    for run in sides.values():
        run(WARMUP_SECONDS)
    runs: dict[str, list[LoadResult]] = {name: [] for name in sides}
    names = list(sides)
    clouds = [n for n in names if n.startswith("janus")]
    for rep in range(repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        if rep % 2:
            # The cloud agents run back to back: alternate which of them goes first, or
            # one is always measured right after another's load (worth about 7% here).
            slots = iter(reversed([n for n in order if n in clouds]))
            order = [next(slots) if n in clouds else n for n in order]
        for side in order:
            result = sides[side](seconds)
            runs[side].append(result)
            progress(
                f"  {rep + 1}/{repeat} {side:<8} {result.rps:>9,.0f} req/s  "
                f"p99 {result.p99_ms:8.2f} ms  non-2xx {result.non_2xx}  "
                f"server CPU {result.server_cpu:.2f}"
            )
    return runs


def check_ledger(janus: JanusTarget, runs: list[LoadResult], connections: int) -> dict[str, Any]:
    """After the runs: the ledger's use count must equal every 200 the server sent."""
    statuses_before, uses_before = server_counts(janus.base)
    probe = post_payment(janus.url)
    if probe.status_code != 200:
        raise RuntimeError(f"final probe: {probe.status_code} {probe.text}")
    ledger_uses = int(probe.json()["uses"][janus.capability])
    statuses, metric_uses = server_counts(janus.base)
    served_200 = statuses.get("200", 0)
    client_ok = sum(r.ok for r in runs)
    server_ok = sum(r.server_ok or 0 for r in runs)
    in_flight = [(r.server_ok or 0) - r.ok for r in runs]
    report = {
        "ledger_uses": ledger_uses,
        "server_200_total": served_200,
        "metric_uses_total": metric_uses,
        "ledger_matches_server": ledger_uses == served_200 == metric_uses,
        "timed_runs_client_2xx": client_ok,
        "timed_runs_server_200": server_ok,
        # wrk stops counting at its deadline; requests then in flight still complete.
        "in_flight_at_cutoff": in_flight,
        "client_counts_consistent": all(0 <= n <= connections for n in in_flight),
        "server_non_200_total": {s: n for s, n in statuses.items() if s != "200"},
        "probe_before": {"server_200": statuses_before.get("200", 0), "uses": uses_before},
    }
    return report


def profile_janus(
    generator: LoadGenerator, janus: JanusTarget, seconds: int, workdir: Path
) -> dict[str, Any] | None:
    """py-spy the cloud agent under the same load: GIL holders, then all active threads."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        progress("py-spy not found (.venv/bin/pip install py-spy): no profile")
        return None
    modes = {"gil": ["--gil"], "active": []}
    out: dict[str, Any] = {}
    for mode, extra in modes.items():
        raw = workdir / f"profile-{mode}.txt"
        record = _pyspy_args(pyspy, janus.pid, seconds, raw, extra)
        if isinstance(generator, Wrk):
            load = generator.start(janus.url, seconds + 3)
            time.sleep(1.0)  # connections open, the server busy
            subprocess.run(record, stdout=subprocess.DEVNULL, check=False)
            load.wait()
            wait_idle(janus.pid, janus.base)
        else:
            # The fallback clients run in this process: py-spy records alongside them.
            recorder = subprocess.Popen(record, stdout=subprocess.DEVNULL)
            generator.run("janus", janus.url, seconds + 2)
            recorder.wait()
            wait_idle(janus.pid, janus.base)
        if not raw.exists():
            progress(f"py-spy wrote no profile ({mode}); is ptrace allowed here?")
            return None
        out[mode] = summarise_profile(raw.read_text(), seconds)
        progress(f"profiled the cloud agent ({mode}): {out[mode]['samples']} samples")
    return out


def _pyspy_args(pyspy: str, pid: int, seconds: int, raw: Path, extra: list[str]) -> list[str]:
    return [
        pyspy,
        "record",
        "-d",
        str(seconds),
        "-r",
        str(PROFILE_RATE),
        "-p",
        str(pid),
        "-o",
        str(raw),
        "--format",
        "raw",
        "--nonblocking",
        *extra,
    ]


# What a request is made of: a sample goes to the first (outermost) of these on its
# stack; failing that, to the first of GENERIC; failing that, to the event loop.
BUCKETS = (
    ("_active", "agent/cloud/service.py", "grant lookup (_active: store read, Bundle.parse)"),
    ("invoke", "policies/invocation.py", "invocation signed with the grant key"),
    ("invoke_local", "policies/invocation.py", "invocation signed with the grant key"),
    ("verify", "policies/verify.py", "verification (Verifier.verify, chain cached)"),
    ("spend", "policies/ledger/", "ledger spend (SQLite group commit)"),
    # The writer thread of the event loop's group commit (policies/ledger/aio.py).
    ("spend_many", "policies/ledger/", "ledger spend (SQLite group commit)"),
    ("_sign", "agent/cloud/service.py", "payload signature + evidence"),
    ("sweep", "agent/cloud/service.py", "sweep after the action"),
)
GENERIC = (
    ("act", "agent/cloud/service.py", "rest of CloudAgent.act"),
    ("act_async", "agent/cloud/service.py", "rest of CloudAgent.act"),
    ("run", "agent/cloud/http.py", "HTTP handler: body, JSON, metrics, response"),
)
OTHER = "event loop, uvicorn, starlette, thread hand-off"


def _frame(text: str) -> tuple[str, str]:
    """'func (path:line)' -> (func, path relative to the checkout or site-packages)."""
    name, _, rest = text.partition(" (")
    path = rest.rsplit(":", 1)[0] if rest else ""
    for prefix in (str(ROOT) + "/", "site-packages/"):
        if prefix in path:
            path = path.split(prefix, 1)[1]
    return name, path


def _bucket(frames: list[tuple[str, str]]) -> str:
    for table in (BUCKETS, GENERIC):
        for name, path in frames:
            # py-spy names methods Class.method and closures outer.<locals>.inner.
            short = name.rsplit(".", 1)[-1]
            match = next((b for f, p, b in table if short == f and p in path), None)
            if match is not None:
                return match
    return OTHER


def summarise_profile(text: str, seconds: int) -> dict[str, Any]:
    buckets: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        buckets[_bucket(frames)] += count
        for label in {f"{name} ({path})" for name, path in frames}:
            inclusive[label] += count
        name, path = frames[-1]
        own[f"{name} ({path})"] += count

    def share(counter: collections.Counter[str], n: int, keep: Any = None) -> list[list[Any]]:
        rows = [(k, v) for k, v in counter.most_common() if keep is None or keep(k)]
        return [[k, round(v / total, 4)] for k, v in rows[:n]] if total else []

    project = ("agent/", "policies/", "janus_hsm/")
    return {
        "samples": total,
        # With --gil: the fraction of wall time some thread of the server held the GIL.
        "samples_per_expected": round(total / (PROFILE_RATE * seconds), 3),
        "buckets": share(buckets, len(buckets)),
        "inclusive_project": share(inclusive, 25, lambda k: any(f"({p}" in k for p in project)),
        "self_top": share(own, 20),
    }


# ------------------------------------------------------------------------- output


def summarise(
    bare: list[LoadResult],
    janus: list[LoadResult],
    sign: list[LoadResult] | None = None,
    evidence: list[LoadResult] | None = None,
) -> dict[str, Any]:
    ratios = [j.rps / b.rps for b, j in zip(bare, janus, strict=True)]
    p99_ratios = [j.p99_ms / b.p99_ms for b, j in zip(bare, janus, strict=True)]
    ratio = median(ratios)

    def side(runs: list[LoadResult]) -> dict[str, Any]:
        return {
            "requests_per_s": median([r.rps for r in runs]),
            "answers_per_run": median([float(r.ok) for r in runs]),
            "p50_ms": median([r.p50_ms for r in runs]),
            "p90_ms": median([r.p90_ms for r in runs]),
            "p99_ms": median([r.p99_ms for r in runs]),
            "server_cpu": median([r.server_cpu for r in runs]),
            # CPU time per answered request: all threads, and the event loop's thread.
            "cpu_us_per_request": median([1e6 * r.server_cpu / r.rps for r in runs]),
            "loop_cpu_us_per_request": median([1e6 * r.server_cpu_loop / r.rps for r in runs]),
            "non_2xx": sum(r.non_2xx for r in runs),
            "errors": sum(sum(r.errors.values()) for r in runs),
        }

    extra: dict[str, Any] = {}
    if sign:
        to_sign = [j.rps / p.rps for p, j in zip(sign, janus, strict=True)]
        extra = {
            "sign": side(sign),
            "ratio_to_sign": median(to_sign),
            "ratio_to_sign_min": min(to_sign),
            "ratio_to_sign_max": max(to_sign),
        }
    if evidence:
        to_evidence = [j.rps / e.rps for e, j in zip(evidence, janus, strict=True)]
        ceiling = [e.rps / b.rps for b, e in zip(bare, evidence, strict=True)]
        extra |= {
            "evidence": side(evidence),
            "ratio_to_evidence": median(to_evidence),
            "ratio_to_evidence_min": min(to_evidence),
            "ratio_to_evidence_max": max(to_evidence),
            # Janus's best case: authorisation and the ledger at no cost.
            "evidence_to_bare": median(ceiling),
            "evidence_to_bare_min": min(ceiling),
            "evidence_to_bare_max": max(ceiling),
            "evidence_target": EVIDENCE_TARGET,
            "evidence_met": median(to_evidence) >= EVIDENCE_TARGET,
        }
    return {
        "bare": side(bare),
        "janus": side(janus),
        **extra,
        "ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "p99_ratio": median(p99_ratios),
        "target": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
    }


def compare_variant(
    runs: list[LoadResult],
    janus: list[LoadResult],
    evidence: list[LoadResult],
    ledger: dict[str, Any],
) -> dict[str, Any]:
    """A variant's runs against the same rounds of the evidence baseline and of Janus."""
    to_evidence = [v.rps / e.rps for v, e in zip(runs, evidence, strict=True)]
    to_janus = [v.rps / j.rps for v, j in zip(runs, janus, strict=True)]
    return {
        "requests_per_s": median([r.rps for r in runs]),
        "p99_ms": median([r.p99_ms for r in runs]),
        "cpu_us_per_request": median([1e6 * r.server_cpu / r.rps for r in runs]),
        "loop_cpu_us_per_request": median([1e6 * r.server_cpu_loop / r.rps for r in runs]),
        "ratio_to_evidence": median(to_evidence),
        "ratio_to_evidence_range": [min(to_evidence), max(to_evidence)],
        "ratio_to_janus": median(to_janus),
        "ratio_to_janus_range": [min(to_janus), max(to_janus)],
        "ledger": ledger,
    }


def variant_arg(text: str) -> tuple[str, Path]:
    name, sep, tree = text.partition("=")
    if not sep or not name or not (Path(tree) / "agent" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR with DIR a source tree: {text!r}")
    return name, Path(tree).resolve()


def environment(generator: LoadGenerator) -> dict[str, Any]:
    commit: str | None = None
    dirty: list[str] | None = None
    with contextlib.suppress(OSError):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        commit = done.stdout.strip() or None
        # Uncommitted changes to the code under test, if any, make the commit inexact.
        done = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", *CODE_UNDER_TEST],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            dirty = [line[3:] for line in done.stdout.splitlines() if line.strip()]
    version = harness.version
    return {
        **harness.machine(),
        "git_commit": commit,
        "code_under_test_modified": dirty,
        "uvicorn": version("uvicorn"),
        "starlette": version("starlette"),
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "httpx": version("httpx"),
        "cryptography": version("cryptography"),
        "sqlite": sqlite3.sqlite_version,
        "generator": generator.name,
        "generator_version": generator.version,
    }


def describe_changes(env: dict[str, Any]) -> str:
    changed = env["code_under_test_modified"]
    if not changed:
        return ""
    if not isinstance(changed, list):  # older results stored only a flag
        return " + uncommitted changes"
    if len(changed) <= 3:
        return f" + uncommitted changes to {', '.join(changed)}"
    return f" + uncommitted changes to {len(changed)} files (listed in the JSON)"


def fmt_ratio(value: float) -> str:
    """Two decimals, or two significant digits for the small ratios a slow side gives."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def render(result: dict[str, Any]) -> str:
    env, params, summary = result["environment"], result["parameters"], result["summary"]
    lines = [
        "Cloud agent HTTP: authorised sign/payment requests vs a bare endpoint, same stack",
        f"{env['date_utc']}  {env['os']}  {env['cpu_count']} CPUs  Python {env['python']}  "
        f"uvicorn {env['uvicorn']}  starlette {env['starlette']}  uvloop {env['uvloop']}  "
        f"httptools {env['httptools']}  SQLite {env['sqlite']}",
        f"code: commit {(env['git_commit'] or '?')[:12]}" + describe_changes(env),
        f"load generator: {result['generator']}",
        f"{params['repeat']} runs x {params['seconds']} s per target, {params['connections']} "
        "connections, alternating which goes first; medians. Ratio = median of the "
        "per-pair ratios (range in brackets).",
        f"load average at start / end: {env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}",
        "",
    ]
    header = (
        f"{'target':<26}{'req/s':>10}{'2xx/run':>9}{'p50 ms':>10}{'p99 ms':>10}{'server CPU':>12}"
        f"{'non-2xx':>9}{'errors':>8}"
    )
    lines += [header, "-" * len(header)]
    for key, label in (
        ("bare", "bare Starlette endpoint"),
        ("sign", "unauthorised signing"),
        ("evidence", "unauthorised evidence"),
        ("janus", "Janus sign/payment"),
    ):
        if key not in summary:  # results from before the signing baseline
            continue
        row = summary[key]
        lines.append(
            f"{label:<26}{row['requests_per_s']:>10,.1f}{row['answers_per_run']:>9,.0f}"
            f"{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}{row['server_cpu']:>12.2f}"
            f"{row['non_2xx']:>9}"
            f"{row['errors']:>8}"
        )
    lines += [
        "",
        f"janus/bare requests/s: {fmt_ratio(summary['ratio'])}x "
        f"[{fmt_ratio(summary['ratio_min'])}-{fmt_ratio(summary['ratio_max'])}]   target >= "
        f"{summary['target']:.1f}x   met: {'yes' if summary['met'] else 'NO'}",
        f"janus/bare p99 latency: {summary['p99_ratio']:.1f}x",
    ]
    if "ratio_to_sign" in summary:
        lines.append(
            f"janus/unauthorised signing requests/s: {fmt_ratio(summary['ratio_to_sign'])}x "
            f"[{fmt_ratio(summary['ratio_to_sign_min'])}-"
            f"{fmt_ratio(summary['ratio_to_sign_max'])}]   (what authorisation, the ledger "
            "and evidence cost over the signature itself; no target)"
        )
    if "ratio_to_evidence" in summary:
        lines += [
            f"unauthorised evidence/bare requests/s: {fmt_ratio(summary['evidence_to_bare'])}x "
            f"[{fmt_ratio(summary['evidence_to_bare_min'])}-"
            f"{fmt_ratio(summary['evidence_to_bare_max'])}]   (the best Janus could do with "
            "authorisation and the ledger free)",
            f"janus/unauthorised evidence requests/s: {fmt_ratio(summary['ratio_to_evidence'])}x "
            f"[{fmt_ratio(summary['ratio_to_evidence_min'])}-"
            f"{fmt_ratio(summary['ratio_to_evidence_max'])}]   target >= "
            f"{summary.get('evidence_target', EVIDENCE_TARGET):.1f}x   met: "
            f"{'yes' if summary.get('evidence_met') else 'NO'}   (what authorisation and the "
            "durable ledger write cost)",
        ]
    cpu_rows = [
        (label, summary[key])
        for key, label in (
            ("bare", "bare"),
            ("evidence", "unauthorised evidence"),
            ("janus", "Janus"),
        )
        if key in summary and "cpu_us_per_request" in summary[key]
    ]
    if cpu_rows:
        lines.append(
            "server CPU per request (all threads / event-loop thread, µs): "
            + ", ".join(
                f"{label} {row['cpu_us_per_request']:.0f} / {row['loop_cpu_us_per_request']:.0f}"
                for label, row in cpu_rows
            )
        )
    for name, v in result.get("variants", {}).items():
        lo, hi = v["ratio_to_evidence_range"]
        jlo, jhi = v["ratio_to_janus_range"]
        lines.append(
            f"variant {name}: {v['requests_per_s']:,.1f} req/s, /unauthorised evidence "
            f"{fmt_ratio(v['ratio_to_evidence'])}x [{fmt_ratio(lo)}-{fmt_ratio(hi)}], /janus "
            f"{fmt_ratio(v['ratio_to_janus'])}x [{fmt_ratio(jlo)}-{fmt_ratio(jhi)}], CPU µs per "
            f"request {v['cpu_us_per_request']:.0f} / {v['loop_cpu_us_per_request']:.0f}, "
            f"ledger {'consistent' if v['ledger']['ledger_matches_server'] else 'MISMATCH'}"
        )
    lines += [
        "server CPU = CPU seconds of the server process per wall second (all threads).",
        "Latency is of answered requests only: the ones still queued when a run ends (up to",
        "one per connection) are not counted, so for a slow server p99 is a lower bound.",
    ]
    ledger = result["ledger"]
    lines += [
        "",
        f"ledger: {ledger['ledger_uses']:,} uses counted = {ledger['server_200_total']:,} "
        f"responses 200 (metrics uses {ledger['metric_uses_total']:,}): "
        f"{'consistent' if ledger['ledger_matches_server'] else 'MISMATCH'}; "
        f"server non-200: {ledger['server_non_200_total'] or 'none'}",
        f"timed runs: generator counted {ledger['timed_runs_client_2xx']:,} 2xx, server "
        f"{ledger['timed_runs_server_200']:,} (in flight at each cutoff: "
        f"{ledger['in_flight_at_cutoff']})",
    ]
    profile = result.get("profile")
    if profile:
        for mode, title in (
            ("gil", "where the GIL goes (py-spy --gil)"),
            ("active", "where active threads are (py-spy, all non-idle threads)"),
        ):
            data = profile.get(mode)
            if not data:
                continue
            lines += ["", f"Profile of the cloud agent under the same load: {title}"]
            if mode == "gil":
                lines.append(
                    f"  GIL held in {data['samples_per_expected']:.0%} of samples "
                    "(1.0 = the process's Python is saturated)"
                )
            lines.append("  by part of the request:")
            lines += [f"    {share:>6.1%}  {name}" for name, share in data["buckets"]]
            lines.append("  project functions, inclusive:")
            lines += [
                f"    {share:>6.1%}  {name}" for name, share in data["inclusive_project"][:15]
            ]
            lines.append("  top functions, self:")
            lines += [f"    {share:>6.1%}  {name}" for name, share in data["self_top"][:12]]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Authorised sign requests/s through the cloud agent vs a bare endpoint."
    )
    parser.add_argument(
        "--seconds",
        type=positive_int,
        default=DEFAULT_SECONDS,
        help=f"duration of one run, whole seconds (default {DEFAULT_SECONDS})",
    )
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=DEFAULT_CONNECTIONS,
        help=f"concurrent connections (default {DEFAULT_CONNECTIONS})",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=DEFAULT_REPEAT,
        help=f"runs per target; medians are reported (default {DEFAULT_REPEAT})",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    parser.add_argument(
        "--generator",
        choices=["auto", "wrk", "asyncio", "httpx"],
        default="auto",
        help="load generator (default: wrk if installed, else the asyncio client)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, record the cloud agent under load with py-spy and summarise",
    )
    parser.add_argument(
        "--variant",
        type=variant_arg,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure a cloud agent run from the source tree in DIR (e.g. a copy with"
        " a change being tried), side by side; repeatable",
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--bare-mode", choices=["echo", "sign", "evidence"], default="echo", help=argparse.SUPPRESS
    )
    parser.add_argument("--bare-fixture", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare, args.bare_mode, args.bare_fixture)
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="janus-bench-http-") as tmp:
        workdir = Path(tmp)
        generator: LoadGenerator
        if args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk")):
            generator = Wrk(workdir, args.connections)
        elif args.generator == "httpx":
            generator = HttpxLoad(workdir, args.connections)
        else:
            if args.generator == "auto":
                progress("wrk is not installed: falling back to the asyncio client")
            generator = AsyncioLoad(workdir, args.connections)
        progress(f"load generator: {generator.describe()}")
        env = environment(generator)
        progress("setting up: SoftHSM token, edge identity, cloud agent, grant")
        with janus_service(workdir, dict(args.variant)) as (janus, cloud, variants):
            sample, evidence = check_sample(janus)
            progress(f"sample request: 200 with evidence that verifies ({janus.url})")
            fixture = workdir / "evidence-fixture.json"
            fixture.write_text(
                json.dumps({"bundle": evidence["bundle"], "capability": janus.capability})
            )
            baselines: dict[str, tuple[str, int]] = {}
            servers: list[BareProcess] = []
            try:
                for mode in ("bare", "sign", "evidence"):
                    server = BareProcess(workdir, "echo" if mode == "bare" else mode, fixture)
                    servers.append(server)
                    url = f"{server.url}/v1/grants/{janus.grant_id}/actions/{ACTION}"
                    check_baseline(mode, url, sample["response_bytes"])
                    baselines[mode] = (url, server.process.pid)
                progress(
                    f"timing: {len(baselines) + 1} targets x {args.repeat} runs x "
                    f"{args.seconds} s, {args.connections} connections"
                )
                runs = run_rounds(generator, baselines, janus, args.seconds, args.repeat, variants)
            finally:
                for server in servers:
                    server.stop()
            bare, sign, janus_runs = runs["bare"], runs["sign"], runs["janus"]
            floor = runs["evidence"]
            ledger = check_ledger(janus, janus_runs, args.connections)
            variant_results = {
                name: compare_variant(
                    runs[f"janus:{name}"],
                    janus_runs,
                    floor,
                    check_ledger(t, runs[f"janus:{name}"], args.connections),
                )
                for name, t in variants.items()
            }
            if not ledger["ledger_matches_server"]:
                progress("--- cloud agent log ---\n" + cloud.output())
            profile = None
            if args.profile:
                progress("profiling the cloud agent under load with py-spy")
                profile = profile_janus(generator, janus, args.seconds, workdir)
    env["loadavg_end"] = list(os.getloadavg())
    result: dict[str, Any] = {
        "benchmark": "cloud_http",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/cloud_http.py", *sys.argv[1:]]
            if argv is None
            else ["benchmarks/cloud_http.py", *argv]
        ),
        "parameters": {
            "seconds": args.seconds,
            "connections": args.connections,
            "repeat": args.repeat,
            "warmup_seconds": WARMUP_SECONDS,
            "body": BODY,
            "grant": {"uses": GRANT_USES, "ttl_seconds": GRANT_TTL, "caveats": list(CAVEATS)},
        },
        "generator": generator.describe(),
        "environment": env,
        "sample": sample,
        "summary": summarise(bare, janus_runs, sign, floor),
        "variants": variant_results,
        "runs": {
            "bare": [r.as_dict() for r in bare],
            "sign": [r.as_dict() for r in sign],
            "evidence": [r.as_dict() for r in floor],
            "janus": [r.as_dict() for r in janus_runs],
            **{f"janus:{n}": [r.as_dict() for r in runs[f"janus:{n}"]] for n in variants},
        },
        "ledger": ledger,
        "profile": profile,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print(render(result))
    print(f"\n(whole run: {result['wall_seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {args.json}")
    consistent = [ledger] + [v["ledger"] for v in variant_results.values()]
    if not all(c["ledger_matches_server"] and c["client_counts_consistent"] for c in consistent):
        print("the ledger's count does not match the responses: see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
