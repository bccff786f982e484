"""The main job, ``make demo``: the whole Janus story on a SoftHSM token, narrated.

SoftHSM token → edge root identity → a real cloud-agent process on 127.0.0.1 →
a grant "sign payments of at most 100 EUR, 5 uses, 10 minutes" → five payments signed,
a 6th and one of 200 EUR refused → an independent verifier checks a payment back to
the hardware root → a message sent while the owner was offline is held, then picked
up and decrypted with the token → revocation stops the cloud agent at once.  Then two
owners talk through services that see only ciphertext, and three cloud-agent instances
on a NATS event bus enforce one revocation and one use limit together, refusing limited
uses when the bus is gone for longer than the staleness bound.

Every step checks that what it claims actually happened; the demo exits non-zero as
soon as one does not.  It is idempotent: the token and the root keys are created on
the first run and reused afterwards (the later chapters start afresh on every run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from agent.cloud.bus_link import RECONNECT_GAP
from agent.cloud.process import CloudProcess
from agent.didcomm import Message, pack_anoncrypt, wrap_forward
from agent.edge.agent import EdgeAgent
from agent.errors import AgentError
from agent.protocol import KEYREQ_TYP, sign_request
from hardware.nats_server import NatsServer, NatsUnavailable
from hardware.softhsm import ensure_token
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11.export_probe import probe_export
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.errors import JanusHSMError
from policies.abilities import Ability
from policies.capability import Bundle
from policies.caveats import parse_caveats
from policies.errors import PolicyError
from policies.issue import grant
from policies.revocation import sign_revocation

PAYMENTS_CAVEATS = '[{"field": "amount", "le": 10000}, {"field": "currency", "eq": "EUR"}]'


class DemoFailure(Exception):
    pass


# What a step can raise besides a failed check: each says what went wrong (the edge
# agent's refusals carry the cloud agent's HTTP status and error code).
TYPED_ERRORS = (AgentError, PolicyError, JanusHSMError, httpx.HTTPError)


def describe(exc: Exception) -> str:
    if isinstance(exc, DemoFailure):
        return str(exc)
    # The edge agent sets ``status`` on the error it raises for a cloud agent's refusal.
    status = vars(exc).get("status")
    answered = f" (the cloud agent answered HTTP {status})" if status is not None else ""
    return f"{type(exc).__name__}: {exc}{answered}"


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailure(what)
    print(f"    ok: {what}", flush=True)


def check_answer(
    response: httpx.Response, statuses: int | tuple[int, ...], what: str, *, code: str = ""
) -> None:
    """``check`` for an HTTP answer: a failure says what the agent answered, not only
    that the step failed (the status, and the body that carries the error's code)."""
    expected = (statuses,) if isinstance(statuses, int) else statuses
    answered = response.status_code in expected and (not code or _code(response) == code)
    if not answered:
        raise DemoFailure(
            f"{what}: the cloud agent answered HTTP {response.status_code} {_body(response)}"
        )
    print(f"    ok: {what}", flush=True)


def _code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _body(response: httpx.Response, limit: int = 2000) -> str:
    text = response.text
    return text if len(text) <= limit else text[:limit] + "…"


def pay(cloud_url: str, grant_id: str, amount_cents: int) -> httpx.Response:
    return httpx.post(
        f"{cloud_url}/v1/grants/{grant_id}/actions/sign/payment",
        json={
            "resource": "janus:payments/eur",
            "request": {"amount": amount_cents, "currency": "EUR", "to": "alice"},
        },
        timeout=30,
    )


def run(state_dir: Path) -> None:
    step(1, f"SoftHSM token in the project's own state directory ({state_dir})")
    token = ensure_token(state_dir, "janus")
    token.activate()  # before the PKCS#11 module is loaded: SoftHSM reads it once
    print(f"    token 'janus', config {token.conf_path}; PIN in {token.pin_file} (0600)")
    check(token.pin_file.stat().st_mode & 0o777 == 0o600, "the PIN file is private")

    step(2, "Edge root identity, generated inside the token")
    edge, created = EdgeAgent.init(state_dir / "edge", token.uri())
    print(f"    {'generated' if created else 'found existing'} root key {edge.root.uri}")
    print(f"    identity: {edge.did}")
    props = edge.root.properties
    check(props.custody_grade, "root key: sensitive, never extractable, generated on the token")
    attempts = probe_export(edge.root)  # type: ignore[arg-type]
    check(
        all(a.refused for a in attempts),
        f"all {len(attempts)} export routes refused "
        f"({', '.join(a.route for a in attempts[:3])}, …)",
    )

    step(3, "A real cloud-agent process on 127.0.0.1, accepting only this owner's grants")
    cloud = CloudProcess(state_dir / "cloud", owner=edge.did)
    try:
        agent_did = httpx.get(f"{cloud.url}/v1/did").json()["did"]
        print(f"    cloud agent {agent_did} at {cloud.url} (pid {cloud.process.pid})")
        check_answer(httpx.get(f"{cloud.url}/healthz"), 200, "the cloud agent is up")
        _story(cloud, edge, state_dir)
    except (DemoFailure, *TYPED_ERRORS):
        print("\n--- cloud agent log ---\n" + cloud.output(), file=sys.stderr)
        raise
    finally:
        cloud.stop()
    relationships_chapter(state_dir / "relationships")
    event_bus_chapter(state_dir / "event-bus", edge)


def _story(cloud: CloudProcess, edge: EdgeAgent, state_dir: Path) -> None:
    caveats = tuple(json.loads(PAYMENTS_CAVEATS))
    parse_caveats(caveats)
    payments = Ability("janus:payments/eur", "sign/payment", caveats)

    step(4, "Grant: sign payments of at most 100 EUR, 5 uses, 10 minutes")
    granted = edge.grant(cloud.url, [payments], ttl_seconds=600, uses=5)
    grant_id = granted["grant_id"]
    print(f"    the cloud agent made a fresh key for this grant: {granted['key']}")
    print("    the token signed the capability; the cloud agent installed it")
    check(granted["status"] == "active", "the grant is active")

    step(5, "The cloud agent signs payments under the capability")
    evidence = None
    for n, amount in enumerate((1250, 4999, 10000, 800), start=1):
        response = pay(cloud.url, grant_id, amount)
        check_answer(response, 200, f"payment {n} of {amount / 100:.2f} EUR signed")
        evidence = response.json()["evidence"]
    big = pay(cloud.url, grant_id, 20000)
    check_answer(
        big,
        403,
        f"a payment of 200.00 EUR is refused ({_code(big)}: amount over the caveat)",
        code="caveat_failed",
    )
    fifth = pay(cloud.url, grant_id, 4200)
    check_answer(fifth, 200, "payment 5 of 42.00 EUR signed")
    evidence = fifth.json()["evidence"]
    sixth = pay(cloud.url, grant_id, 100)
    check_answer(sixth, (410, 429), f"a 6th payment is refused ({_code(sixth)}: uses exhausted)")
    shown = httpx.get(f"{cloud.url}/v1/grants/{grant_id}")
    check_answer(shown, 200, "the grant's state is shown")
    status = shown.json()
    check(
        status["status"] == "destroyed",
        f"the grant's key was destroyed by the cloud agent ({status['reason']})",
    )

    step(6, "An independent verifier checks a payment back to the hardware root, offline")
    evidence_file = state_dir / "payment-evidence.json"
    evidence_file.write_text(json.dumps(evidence, indent=1))
    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "edge",
            "verify",
            str(evidence_file),
            "--root",
            edge.did,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    result = json.loads(verified.stdout or "{}")
    print(
        f"    `janus edge verify {evidence_file.name} --root <owner did>` →"
        f" {'valid' if result.get('valid') else verified.stderr.strip()}"
    )
    check(
        verified.returncode == 0
        and result.get("principal") == edge.did
        and result["payload"]["amount"] == 4200,
        "the signature, invocation and capability chain verify to the token's key",
    )

    step(7, "A message sent to the owner while it is offline is held by the cloud agent")
    edge.grant(cloud.url, [Ability("janus:mailbox", "msg/receive")], ttl_seconds=600, uses=100)
    routing_key = httpx.get(f"{cloud.url}/v1/did").json()["routing_key"]
    text = f"Invoice 2026-{uuid.uuid4().hex[:6]} is ready"
    message = Message(
        id=str(uuid.uuid4()),
        type="https://janus.dev/messages/1.0/note",
        body={"text": text},
        to=(edge.agreement.did,),
    )
    envelope = wrap_forward(
        pack_anoncrypt(message, [edge.agreement.did]),
        to=edge.agreement.did,
        routing_keys=[routing_key],
    )
    posted = httpx.post(
        f"{cloud.url}/v1/didcomm",
        content=envelope.encode(),
        headers={"content-type": "application/didcomm-encrypted+json"},
    )
    check_answer(
        posted, 202, "a sender's DIDComm message (encrypted to the owner's token key) is held"
    )
    picked = edge.pickup(cloud.url)
    texts = [m["message"]["body"].get("text") for m in picked if "message" in m]
    print(f"    picked up and decrypted with ECDH inside the token: {texts}")
    check(text in texts, "the owner reads the message; the cloud agent never could")
    check(edge.pickup(cloud.url) == [], "acknowledged messages are deleted from the cloud agent")

    step(8, "Revocation stops the cloud agent at once")
    second = edge.grant(cloud.url, [payments], ttl_seconds=600, uses=5)
    check_answer(pay(cloud.url, second["grant_id"], 500), 200, "a new grant signs a payment")
    revoked = edge.revoke(second["grant_id"], reason="demo")
    check(
        second["grant_id"] in revoked["destroyed"],
        "the token signed a revocation; the cloud agent destroyed the grant's key",
    )
    after = pay(cloud.url, second["grant_id"], 500)
    check_answer(after, 410, "the next payment is refused immediately")

    print("\nDone: hardware-rooted delegation worked as stated, and every limit held.")


# --- Relationships: two owners talk through services that see only ciphertext ---------


class Owner:
    """One owner of the relationships chapter: a token, an edge agent, a cloud agent.

    The owners' commands run as ``janus`` processes: each owner's SoftHSM has its own
    configuration, and SoftHSM reads it once per process.
    """

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.token = ensure_token(base / name / "softhsm", name)
        self.state = base / name / "edge"
        made = self.janus("edge", "init", "--token", self.token.uri(), "--name", name)
        self.did = str(made["did"])
        self.cloud = CloudProcess(
            base / name / "cloud",
            owner=self.did,
            extra_args=["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"],
        )

    def janus(self, *args: str, fails: bool = False) -> dict[str, Any]:
        """``janus ARGS --state-dir … --json``: its JSON answer (its error, with fails)."""
        argv = [sys.executable, "-m", "agent", *args, "--state-dir", str(self.state), "--json"]
        shown = " ".join(a if len(a) < 60 else a[:24] + "…" for a in args)
        print(f"    {self.name}$ janus {shown}", flush=True)
        done = subprocess.run(
            argv, env=self.token.environ(), capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        if done.returncode != (1 if fails else 0) or "Traceback" in done.stderr:
            raise DemoFailure(f"`janus {shown}` exited {done.returncode}: {done.stderr.strip()}")
        answer: dict[str, Any] = json.loads(done.stdout or "{}")
        if isinstance(answer, list):
            return {"items": answer}
        return answer.get("error", answer) if fails else answer

    def texts(self) -> list[str]:
        received = self.janus("rel", "receive")["messages"]
        return [str(m["message"]["body"].get("text")) for m in received]


def relationships_chapter(base: Path) -> None:
    # Each run starts this chapter afresh (tokens, identities, services): a rerun at any
    # interval finds nothing half-done from an earlier one.
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    step(9, "Two owners, Alex and Blair: each a SoftHSM token and a cloud agent acting as "
         "receiving and sending service")  # fmt: skip
    alex, blair = Owner("alex", base), Owner("blair", base)
    try:
        for who in (alex, blair):
            print(f"    {who.name}: {who.did}, services at {who.cloud.url}")
            who.janus("edge", "service", "add", who.cloud.url, "--role", "receiving")
            who.janus("edge", "service", "add", who.cloud.url, "--role", "sending")
        _relationships_story(alex, blair, base)
    except (DemoFailure, *TYPED_ERRORS):
        for who in (alex, blair):
            print(f"\n--- {who.name}'s cloud agent log ---\n" + who.cloud.output(), file=sys.stderr)
        raise
    finally:
        alex.cloud.stop()
        blair.cloud.stop()


def _relationships_story(alex: Owner, blair: Owner, base: Path) -> None:
    step(10, "Alex invites Blair with a file; Blair accepts it (one token ECDH each)")
    invitation = base / "invitation-for-blair.json"
    alex.janus("rel", "invite", "--name", "blair", "--out", str(invitation))
    blair.janus("rel", "accept", str(invitation), "--name", "alex")
    events = alex.janus("rel", "receive")["events"]
    check(
        any(e["event"] == "established" for e in events),
        "Alex's agent opened Blair's first message: the relationship exists on both sides",
    )
    blair.janus("rel", "receive")
    alex.janus("rel", "receive")
    a_number = alex.janus("rel", "show", "blair")["safety_number"]
    b_number = blair.janus("rel", "show", "alex")["safety_number"]
    print(f"    safety number: {a_number}")
    check(a_number == b_number, "both see the same safety number to compare in person")

    step(11, "Messages both ways, through Alex's and Blair's services")
    blair.janus("rel", "send", "alex", "--text", "Hi Alex, it is Blair")
    check(alex.texts() == ["Hi Alex, it is Blair"], "Alex reads Blair's message")
    alex.janus("rel", "send", "blair", "--text", "Hello Blair!")
    check(blair.texts() == ["Hello Blair!"], "Blair reads Alex's answer")

    step(12, "Blair's address rotates mid-conversation; delivery continues")
    blair.janus("rel", "rotate", "alex", "--grace", "0")  # policy: no grace period
    blair.janus("rel", "rotate", "alex")  # rotate now
    before = blair.janus("rel", "show", "alex")["addresses"]["own"]
    old_ids = {a["id"] for a in before if a["state"] != "announced"}
    print(f"    Blair announced a new address; she now picks up from {len(before)}")
    alex.janus("rel", "send", "blair", "--text", "sent before I heard of your new address")
    alex.janus("rel", "receive")  # learns it, confirms it
    alex.janus("rel", "send", "blair", "--text", "sent to your new address")
    got = blair.texts()
    check(
        got == ["sent before I heard of your new address", "sent to your new address"],
        "both messages arrived: the one to the old address and the one to the new",
    )
    blair.janus("rel", "receive")  # the grace period is over: the old address is retired
    after = blair.janus("rel", "show", "alex")["addresses"]["own"]
    check(
        len(after) == 1 and after[0]["id"] not in old_ids and after[0]["state"] == "current",
        "Blair's old address is retired at her service; the new one is current",
    )
    alex.janus("rel", "receive")
    alex.janus("rel", "send", "blair", "--text", "still talking")
    check(blair.texts() == ["still talking"], "the conversation goes on at the new address")

    step(13, "The sending service never had Blair's address")
    needles: list[bytes] = []
    for address_id in old_ids | {after[0]["id"]}:
        needles += [address_id.encode(), b64url.decode(address_id)]
    stored = [p for p in alex.cloud.state_dir.glob("sending.db*") if p.is_file()]
    found = [p.name for p in stored if any(n in p.read_bytes() for n in needles)]
    print(f"    searched {', '.join(p.name for p in stored)} of Alex's sending service")
    check(bool(stored) and not found, "no address id of Blair's, in text or bytes, is in it")

    step(14, "Blair blocks Alex: every address he knows is retired, delivery stops")
    blocked = blair.janus("rel", "block", "alex")
    print(f"    {blocked['retired']} address(es) retired at Blair's receiving service")
    refused = alex.janus("rel", "send", "blair", "--text", "are you there?", fails=True)
    print(f"    janus: error: {refused['message']}")
    check(refused["code"] == "peer_address_retired", "Alex's message has nowhere to go")
    print("\nDone: two owners talked through services that saw only ciphertext.")


# --- An event bus: three cloud-agent instances that agree without a shared database ---

#: The staleness bound the bus chapter's instances run with: short, so the demo is quick,
#: yet five heartbeats long, so a busy machine's late heartbeat does not look like an
#: outage (the chapter waits past RECONNECT_GAP anyway).
BUS_STALENESS = 5.0


class Instances:
    """The bus chapter's nats-server and cloud-agent instances, and the owner's operator
    key (a software key the owner delegates through, so one capability reaches every
    instance); ``stop`` stops whatever was started."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nats = NatsServer(store=base / "nats")
        self.clouds: list[CloudProcess] = []
        self.operator_keys = SoftwareProvider.open(
            f"soft:dir={base / 'operator'}",
            passphrase_source=lambda: "demo operator",
            allow_extractable=True,
        )
        self.operator = self.operator_keys.generate(
            self.operator_keys.key_uri("operator"), Algorithm.EdDSA
        )

    def start(self, owner: str) -> None:
        self.nats.start()

        def one(n: int) -> CloudProcess:
            return CloudProcess(
                self.base / f"cloud-{n}",
                owner=owner,
                extra_args=[
                    "--event-bus", self.nats.url, "--bus-staleness", f"{BUS_STALENESS:g}",
                ],
            )  # fmt: skip

        with ThreadPoolExecutor(max_workers=3) as pool:  # each waits for its /healthz
            started = [pool.submit(one, n) for n in (1, 2, 3)]
            for future in started:
                with contextlib.suppress(Exception):  # raised below, once all are known
                    self.clouds.append(future.result())
        for future in started:
            future.result()

    def logs(self) -> None:
        for n, cloud in enumerate(self.clouds, start=1):
            print(f"\n--- instance {n}'s log ---\n" + cloud.output(), file=sys.stderr)
        print("\n--- nats-server log ---\n" + self.nats.log_tail(40), file=sys.stderr)

    def stop(self) -> None:
        for cloud in self.clouds:
            cloud.stop()
        self.nats.stop()
        self.operator_keys.close()


def _bus_state(
    cloud: CloudProcess, ready: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Wait until the instance's ``/healthz`` bus state is ``ready``; that state."""
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = httpx.get(f"{cloud.url}/healthz", timeout=5).json()["bus"]
        if ready(state):
            return state
        if time.monotonic() > deadline:
            raise DemoFailure(f"{cloud.url}: {what} not reached in {timeout:g} s: {state}")
        time.sleep(0.05)


def _until_code(
    cloud: CloudProcess, grant_id: str, codes: tuple[str | None, ...], timeout: float
) -> tuple[httpx.Response, float]:
    """Pay until the answer's error code is one of ``codes`` (None: served); the last
    answer and the seconds it took."""
    started = time.monotonic()
    while True:
        answer = pay(cloud.url, grant_id, 100)
        got = None if answer.status_code == 200 else _code(answer)
        if got in codes or time.monotonic() - started > timeout:
            return answer, time.monotonic() - started
        time.sleep(0.02)


def event_bus_chapter(base: Path, edge: EdgeAgent) -> None:
    # Afresh on every run (bus store, instances, operator key): nothing half-done from
    # an earlier run is found, and the instances' consumers start at the stream's start.
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    step(15, "An event bus: a real nats-server with JetStream, three cloud-agent instances "
         "on it, each with its own keys and ledger")  # fmt: skip
    bus = Instances(base)
    try:
        try:
            bus.start(edge.did)
        except (NatsUnavailable, RuntimeError) as exc:  # a server that did not start
            raise DemoFailure(f"the bus or an instance did not start: {exc}") from None
        print(f"    nats-server {bus.nats.url} (store {bus.nats.store.name}/)")
        for n, cloud in enumerate(bus.clouds, start=1):
            state = _bus_state(cloud, lambda s: bool(s["caught_up"]), "caught up")
            check(
                state["caught_up"] is True,
                f"instance {n} at {cloud.url} read the bus before serving "
                f"(caught up in {state['catch_up_seconds']:.2f} s)",
            )
        _event_bus_story(bus, edge)
    except (DemoFailure, *TYPED_ERRORS):
        bus.logs()
        raise
    finally:
        bus.stop()


def _install(
    bus: Instances, edge: EdgeAgent, cloud: CloudProcess, parent: Bundle, uses: int
) -> str:
    """A grant at ``cloud`` whose capability the operator redelegates from ``parent``."""
    agent_did = httpx.get(f"{cloud.url}/v1/did").json()["did"]
    request = sign_request(edge.root, typ=KEYREQ_TYP, audience=agent_did, now=int(time.time()))
    created = httpx.post(f"{cloud.url}/v1/grants", json={"request": request})
    if created.status_code != 201:
        raise DemoFailure(
            f"a grant key at {cloud.url}: HTTP {created.status_code} {_body(created)}"
        )
    child = grant(
        bus.operator,
        audience=created.json()["did"],
        abilities=parent.leaf.abilities,
        ttl_seconds=300,
        uses=uses,
        proof=parent,
    )
    grant_id = str(created.json()["grant_id"])
    installed = httpx.put(f"{cloud.url}/v1/grants/{grant_id}/bundle", content=child.to_json())
    if installed.status_code != 200:
        raise DemoFailure(
            f"installing at {cloud.url}: HTTP {installed.status_code} {_body(installed)}"
        )
    return grant_id


def _event_bus_story(bus: Instances, edge: EdgeAgent) -> None:
    one, two, three = bus.clouds
    payments = Ability("janus:payments/eur", "sign/payment", tuple(json.loads(PAYMENTS_CAVEATS)))

    step(16, "The owner's token signs capability P for its operator key; the operator hands "
         "P on to a grant key at each instance")  # fmt: skip
    shared = grant(
        edge.root, audience=bus.operator.did, abilities=[payments], ttl_seconds=600,
        uses=100, depth=1, policy=edge.policy,
    )  # fmt: skip
    grants = [_install(bus, edge, cloud, shared, 100) for cloud in bus.clouds]
    print(f"    P = {shared.leaf.id}; grants {', '.join(grants)}")
    for n, (cloud, grant_id) in enumerate(zip(bus.clouds, grants, strict=True), start=1):
        check_answer(pay(cloud.url, grant_id, 100), 200, f"instance {n} signs a payment under P")

    step(17, "A capability limited to 2 uses, counted at its home, instance 1, used through "
         "instances 2 and 3")  # fmt: skip
    home = httpx.get(f"{one.url}/v1/did").json()["did"]
    counted = grant(
        edge.root, audience=bus.operator.did, abilities=[payments], ttl_seconds=600,
        uses=2, depth=1, home=home, policy=edge.policy,
    )  # fmt: skip
    at_two, at_three = (_install(bus, edge, cloud, counted, 2) for cloud in (two, three))
    print(f"    lim.home = instance 1 ({home}); grants at instances 2 and 3")
    first = pay(two.url, at_two, 100)
    check_answer(first, 200, "use 1 at instance 2, forwarded over the bus to the home ledger")
    second = pay(three.url, at_three, 100)
    check_answer(second, 200, "use 2 at instance 3, counted at the home too")
    print(f"    the home's count after use 2: {second.json()['uses'][counted.leaf.id]}")
    third = pay(two.url, at_two, 100)
    check_answer(
        third,
        (403, 410, 429),
        "a third use at instance 2 is refused by the home (uses_exhausted): "
        "the limit holds across instances",
        code="uses_exhausted",
    )

    step(18, "The owner revokes P at instance 1; instances 2 and 3 learn it over the bus")
    revocation = sign_revocation(
        edge.root, revoked_id=shared.leaf.id, now=int(time.time()), reason="demo"
    )
    started = time.monotonic()
    revoked = httpx.post(f"{one.url}/v1/revocations", json={"record": revocation}, timeout=30)
    check_answer(revoked, 200, "instance 1 stored the revocation")
    check(revoked.json()["destroyed"] == [grants[0]], "instance 1 destroyed its grant key under P")
    check(revoked.json()["published"] is True, "the bus acknowledged the revocation event")
    for n, cloud, grant_id in ((2, two, grants[1]), (3, three, grants[2])):
        answer, _ = _until_code(cloud, grant_id, ("grant_inactive", "revoked"), timeout=10)
        took = (time.monotonic() - started) * 1000
        check_answer(
            answer,
            (403, 410),
            f"instance {n} refuses P ({_code(answer)}) {took:.0f} ms after it was revoked",
        )

    step(19, f"The bus stops: after the {BUS_STALENESS:g} s staleness bound, limited uses are "
         "refused (failing closed); the bus restarts and service resumes")  # fmt: skip
    limited = edge.grant(two.url, [payments], ttl_seconds=600, uses=5)["grant_id"]
    check_answer(pay(two.url, limited, 100), 200, "instance 2 signs under a 5-use capability")
    bus.nats.stop()
    stopped = time.monotonic()
    # Waiting on /healthz, not on payments: each payment served would spend a use.
    _bus_state(two, lambda state: state["staleness"] > BUS_STALENESS, "staleness past the bound")
    stale = pay(two.url, limited, 100)
    check_answer(
        stale,
        503,
        f"{time.monotonic() - stopped:.1f} s after the bus stopped, instance 2 refuses it "
        "(revocation_state_stale)",
        code="revocation_state_stale",
    )
    # Away long enough to count as a lost contact: back, the instance catches up first.
    _bus_state(two, lambda state: state["staleness"] > RECONNECT_GAP + 0.5, "a lost contact")
    bus.nats.start()
    restarted = time.monotonic()
    _bus_state(
        two,
        lambda state: state["caught_up"] and state["staleness"] < BUS_STALENESS,
        "caught up again",
    )
    resumed = pay(two.url, limited, 100)
    check_answer(
        resumed,
        200,
        f"{time.monotonic() - restarted:.1f} s after the bus restarted, instance 2 caught up "
        "and serves it again",
    )

    print("\nDone: a revocation posted at one instance held at every instance, and without "
          "the bus, limited uses were refused rather than risked.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", default=".state/demo", type=Path)
    args = parser.parse_args(argv)
    try:
        run(args.state_dir.resolve())
    except (DemoFailure, *TYPED_ERRORS) as exc:
        print(f"\nDEMO FAILED: {describe(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
