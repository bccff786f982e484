"""Benchmark: what verifying a Janus capability chain costs, and what the cache saves.

Why these measurements:

* Every use of a capability is verified: a 3-link chain (root ES256 -> EdDSA -> EdDSA
  -> holder) plus the holder's invocation is four signature checks.  The signatures are
  the irreducible part; everything else Janus does (the bundle's JSON, strict base64url
  and JSON for every JWS, did:key decoding, claim and caveat validation, linkage,
  attenuation, time, the request digest, caveat evaluation) is overhead on top.  So the
  first comparison is Janus's *uncached* verification (a fresh ``Verifier`` per call,
  nothing cached) against the bare cost of the same four signature checks made with
  ``cryptography`` directly: public keys already decoded, signing inputs already split,
  ECDSA signature already in DER, four ``verify`` calls and nothing else.
  Target: janus/raw >= 0.8.
* biscuit-python is the obvious off-the-shelf alternative for offline-attenuable
  tokens, so the same uncached verification is compared with parsing, verifying and
  authorizing a 2-block biscuit.  Target: Janus faster (ratio > 1).  For information,
  also a 1-link Janus chain plus invocation (two signature checks, as many as the
  biscuit's two blocks), and the four raw checks with PyNaCl's (libsodium's) Ed25519,
  the fastest signature checking Python offers here.  biscuit-python is
  *not* a project dependency: without ``biscuit_auth`` importable the comparison is
  skipped with a message (``pip install biscuit-python==0.4.0`` into the venv).
* A verifier sees the same chain many times with a new invocation each time, so
  ``Verifier`` caches what does not depend on time or state.  The third comparison is
  one long-lived verifier (chain cached after the first call) given a new invocation
  each call, against uncached verification.  Target: cached/uncached >= 3.  For
  information, the same with the bundle handed over already parsed (a ``Bundle``
  object), which shows how much of the cached path is parsing the bundle text again.

The timed part is verification only: every key is a software key (the project's
software keystore, as the tests use), because signing happens once, at set-up.  Which
device holds the root key changes nothing about verifying its signature.  Results that
fall short are explained by a per-component timing of the uncached path (always) and,
with ``--profile``, a cProfile listing.

It is a benchmark, not a test: it prints a table (and writes JSON with ``--json``) and
only fails when an operation itself fails.  Run it as::

    .venv/bin/python benchmarks/capabilities.py [--seconds S] [--repeat N] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc
import importlib
import io
import itertools
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Benchmark the checkout this file lives in, not whatever janus_hsm is installed.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import base58  # noqa: E402
import harness  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402
from harness import median, progress  # noqa: E402

from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.software import SoftwareProvider  # noqa: E402
from janus_hsm.provider import KeyHandle, raw_to_der  # noqa: E402
from janus_hsm.public_keys import b64url_decode  # noqa: E402
from policies import issue  # noqa: E402
from policies.abilities import Ability  # noqa: E402
from policies.capability import Bundle  # noqa: E402
from policies.caveats import check_request, parse_caveats  # noqa: E402
from policies.errors import SignatureInvalidError  # noqa: E402
from policies.invocation import Invocation, invoke, request_digest  # noqa: E402
from policies.jws import public_key_for, sha256_b64, strict_json, verify_signature  # noqa: E402
from policies.policy import IssuancePolicy  # noqa: E402
from policies.verify import Verifier  # noqa: E402


def optional_module(name: str) -> Any | None:
    """A module that only some comparisons need, or None if it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Neither is a project dependency: biscuit-python only for its comparison (skipped
# without it), PyNaCl only for an information row.
biscuit_auth = optional_module("biscuit_auth")
nacl_signing = optional_module("nacl.signing")

DEFAULT_SECONDS = 1.0
DEFAULT_REPEAT = 11
WARMUP_SECONDS = 0.3
BATCH = 8  # operations between two clock reads (an uncached verification is ~1-3 ms)
INVOCATION_POOL = 256  # distinct invocations (distinct nonces) cycled through
COMPONENT_SECONDS = 0.8  # per part, split over the rounds
COMPONENT_ROUNDS = 5
PROFILE_CALLS = 2000

TARGET_VS_RAW = 0.8
TARGET_VS_BISCUIT = 1.0  # "faster": the ratio must be above 1
TARGET_CACHED = 3.0

PASSPHRASE = "janus capability benchmark"  # noqa: S105 - a throwaway keystore
# A permissive issuance policy (as in tests/policies/test_capabilities.py): issuance
# is set-up here, not what is measured.
OPEN_POLICY = IssuancePolicy.loads(
    """
version = 1
[[rule]]
name = "benchmark"
audiences = ["*"]
abilities = [{ can = "*", with = "*" }]
max_ttl = "1d"
max_uses = "unlimited"
max_depth = 9
require = []
"""
)
ACTION = "sign/payment"
RESOURCE = "janus:payments/eur"
REQUEST: dict[str, Any] = {"amount": 9900, "currency": "EUR", "to": "alice"}

# The biscuit side: the same facts and restrictions, in Datalog.
BISCUIT_AUTHORITY = """
user("alice");
right("janus:payments/eur", "sign/payment");
right("janus:payments/usd", "sign/payment");
"""
BISCUIT_ATTENUATION = 'check if operation("sign/payment"), resource("janus:payments/eur");'
BISCUIT_AUTHORIZER = """
resource("janus:payments/eur");
operation("sign/payment");
allow if right($resource, $operation), resource($resource), operation($operation);
"""

Operation = Callable[[], object]


def ops_per_second(operation: Operation, seconds: float, batch: int = BATCH) -> float:
    return harness.ops_per_second(operation, seconds, batch)


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    operation: Operation


@dataclass(frozen=True)
class Pair:
    """A ratio a/b between two workloads measured in the same repetitions."""

    key: str
    label: str
    a: str
    b: str
    target: float | None  # None: for information
    strict: bool = False  # True: the ratio must be above the target, not just reach it


def run_interleaved(
    workloads: list[Workload], seconds: float, repeat: int
) -> dict[str, list[float]]:
    """Each repetition measures every workload once; the order reverses every other time."""
    for w in workloads:  # warm caches, allocators, lazily built tables
        ops_per_second(w.operation, min(WARMUP_SECONDS, seconds))
    samples: dict[str, list[float]] = {w.key: [] for w in workloads}
    for rep in range(repeat):
        for w in workloads if rep % 2 == 0 else reversed(workloads):
            gc.collect()
            samples[w.key].append(ops_per_second(w.operation, seconds))
        progress(f"  repetition {rep + 1}/{repeat} done")
    return samples


def pair_summary(pair: Pair, samples: dict[str, list[float]]) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(samples[pair.a], samples[pair.b], strict=True)]
    ratio = median(ratios)
    row: dict[str, Any] = {
        "key": pair.key,
        "comparison": pair.label,
        "a": pair.a,
        "b": pair.b,
        "a_ops_per_s": median(samples[pair.a]),
        "b_ops_per_s": median(samples[pair.b]),
        "ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target": pair.target,
        "target_is_strict": pair.strict,
    }
    if pair.target is not None:
        row["met"] = ratio > pair.target if pair.strict else ratio >= pair.target
    return row


# -------------------------------------------------------------------------- set-up


@dataclass
class Setup:
    keys: dict[str, KeyHandle]
    bundle: Bundle
    bundle_text: str
    invocations: list[str]
    now: int
    # For information: a 1-link chain (root -> holder) and its invocations, i.e. two
    # signature checks per verification, as many as the 2-block biscuit.
    short_bundle_text: str
    short_invocations: list[str]


def make_keys(directory: Path) -> dict[str, KeyHandle]:
    provider = SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: PASSPHRASE, allow_extractable=True
    )
    algs = {
        "root": Algorithm.ES256,
        "cloud": Algorithm.EdDSA,
        "worker": Algorithm.EdDSA,
        "holder": Algorithm.EdDSA,
    }
    return {name: provider.generate(f"soft:object={name}", alg) for name, alg in algs.items()}


def make_chain(keys: dict[str, KeyHandle], now: int) -> Bundle:
    """root (ES256) -> cloud (EdDSA) -> worker (EdDSA) -> holder: 3 links, 2 caveats."""
    link0 = issue.grant(
        keys["root"],
        audience=keys["cloud"].did,
        abilities=[Ability("janus:payments/*", "sign/*", ({"field": "amount", "le": 100_000},))],
        ttl_seconds=3600,
        uses=1_000_000,
        depth=2,
        policy=OPEN_POLICY,
        now=now,
    )
    link1 = issue.grant(
        keys["cloud"],
        audience=keys["worker"].did,
        abilities=[Ability(RESOURCE, "sign/*")],
        ttl_seconds=3600,
        uses=100_000,
        depth=1,
        proof=link0,
        policy=OPEN_POLICY,
        now=now,
    )
    return issue.grant(
        keys["worker"],
        audience=keys["holder"].did,
        abilities=[Ability(RESOURCE, ACTION, ({"field": "to", "eq": "alice"},))],
        ttl_seconds=3600,
        uses=10_000,
        depth=0,
        proof=link1,
        policy=OPEN_POLICY,
        now=now,
    )


@contextlib.contextmanager
def janus_setup() -> Iterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="janus-bench-caps-") as tmp:
        now = int(time.time())
        keys = make_keys(Path(tmp))
        bundle = make_chain(keys, now)
        short = issue.grant(
            keys["root"],
            audience=keys["holder"].did,
            abilities=[Ability(RESOURCE, ACTION, ({"field": "amount", "le": 100_000},))],
            ttl_seconds=3600,
            uses=10_000,
            policy=OPEN_POLICY,
            now=now,
        )

        def invocations(leaf: Bundle) -> list[str]:
            return [
                invoke(
                    keys["holder"],
                    capability_id=leaf.leaf.id,
                    action=ACTION,
                    resource=RESOURCE,
                    request=REQUEST,
                    now=now,
                    lifetime=300,
                )
                for _ in range(INVOCATION_POOL)
            ]

        yield Setup(
            keys,
            bundle,
            bundle.to_json(),
            invocations(bundle),
            now,
            short.to_json(),
            invocations(short),
        )


@dataclass(frozen=True)
class RawCheck:
    """One signature check with everything decoded beforehand."""

    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    signing_input: bytes
    signature: bytes  # DER for ECDSA, raw 64 bytes for Ed25519


def raw_checks(setup: Setup) -> list[RawCheck]:
    """The four signatures Janus checks: the three links and the first invocation."""
    compacts = [c.compact for c in setup.bundle.chain] + [setup.invocations[0]]
    signers = [setup.keys[n] for n in ("root", "cloud", "worker", "holder")]
    checks = []
    for compact, signer in zip(compacts, signers, strict=True):
        head, payload, signature = compact.split(".")
        public_key = signer.public_key()
        raw_signature = b64url_decode(signature)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            raw_signature = raw_to_der(raw_signature, 32)
        else:
            assert isinstance(public_key, ed25519.Ed25519PublicKey)
        checks.append(RawCheck(public_key, f"{head}.{payload}".encode(), raw_signature))
    return checks


def raw_verifier(checks: list[RawCheck]) -> Operation:
    ecdsa = ec.ECDSA(hashes.SHA256())  # made once, as a caller would
    (c0, c1, c2, c3) = checks
    assert isinstance(c0.public_key, ec.EllipticCurvePublicKey)
    assert all(isinstance(c.public_key, ed25519.Ed25519PublicKey) for c in (c1, c2, c3))
    k0, k1, k2, k3 = (c.public_key for c in checks)

    def verify_four() -> None:
        k0.verify(c0.signature, c0.signing_input, ecdsa)  # type: ignore[call-arg]
        k1.verify(c1.signature, c1.signing_input)  # type: ignore[call-arg]
        k2.verify(c2.signature, c2.signing_input)  # type: ignore[call-arg]
        k3.verify(c3.signature, c3.signing_input)  # type: ignore[call-arg]

    return verify_four


def raw_nacl_verifier(checks: list[RawCheck]) -> Operation | None:
    """The same four checks with the Ed25519 ones done by PyNaCl (libsodium); None without it.

    For information: the fastest signature checking Python offers here, i.e. the floor
    under any Python verifier, whatever it does around the signatures.
    """
    if nacl_signing is None:
        return None
    ecdsa = ec.ECDSA(hashes.SHA256())
    c0 = checks[0]
    k0 = c0.public_key
    assert isinstance(k0, ec.EllipticCurvePublicKey)
    eds = []
    for c in checks[1:]:
        assert isinstance(c.public_key, ed25519.Ed25519PublicKey)
        raw_key = c.public_key.public_bytes_raw()
        eds.append((nacl_signing.VerifyKey(raw_key), c.signing_input, c.signature))
    (v1, m1, s1), (v2, m2, s2), (v3, m3, s3) = eds

    def verify_four() -> None:
        k0.verify(c0.signature, c0.signing_input, ecdsa)
        v1.verify(m1, s1)
        v2.verify(m2, s2)
        v3.verify(m3, s3)

    return verify_four


@dataclass(frozen=True)
class BiscuitSide:
    token: str  # base64url, as it would travel
    token_bytes: int
    operation: Operation


def biscuit_side() -> BiscuitSide | None:
    """A 2-block token, and parse + verify + authorize of it; None without biscuit_auth."""
    if biscuit_auth is None:
        return None
    root = biscuit_auth.KeyPair()
    token = (
        biscuit_auth.BiscuitBuilder(BISCUIT_AUTHORITY)
        .build(root.private_key)
        .append(biscuit_auth.BlockBuilder(BISCUIT_ATTENUATION))
    )
    text = token.to_base64()
    public_key = root.public_key
    # The authorizer's own facts and policy are parsed once, as a server would.
    authorizer = biscuit_auth.AuthorizerBuilder(BISCUIT_AUTHORIZER)
    # biscuit's default budget for running the Datalog is 1 ms of wall time; on a busy
    # shared machine a process descheduled mid-run exceeds it and authorization fails
    # ("Reached Datalog execution limits").  A longer budget changes nothing else.
    limits = authorizer.limits()
    limits.max_time = datetime.timedelta(seconds=1)
    authorizer.set_limits(limits)
    from_base64 = biscuit_auth.Biscuit.from_base64

    def verify_and_authorize() -> None:
        parsed = from_base64(text, public_key)  # parse, check both blocks' signatures
        authorizer.build(parsed).authorize()  # run the Datalog; raises if denied

    # Sanity: it accepts this token and refuses one whose attenuation check fails.
    verify_and_authorize()
    denied = (
        biscuit_auth.BiscuitBuilder(BISCUIT_AUTHORITY)
        .build(root.private_key)
        .append(biscuit_auth.BlockBuilder('check if operation("msg/send");'))
        .to_base64()
    )
    try:
        authorizer.build(from_base64(denied, public_key)).authorize()
    except biscuit_auth.AuthorizationError:
        pass
    else:
        raise RuntimeError("the biscuit authorizer accepted a token whose check fails")
    return BiscuitSide(text, len(text), verify_and_authorize)


def check_janus(setup: Setup) -> None:
    """Before timing: a good invocation verifies, a tampered one does not."""
    auth = Verifier().verify(
        setup.bundle_text,
        setup.invocations[0],
        REQUEST,
        now=setup.now + 1,
        root=setup.keys["root"].did,
    )
    assert len(auth.chain.bundle.chain) == 3
    head, payload, signature = setup.invocations[0].split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    try:
        Verifier().verify(
            setup.bundle_text, f"{head}.{payload}.{flipped}", REQUEST, now=setup.now + 1
        )
    except SignatureInvalidError:
        return
    raise RuntimeError("a tampered invocation verified")


# ----------------------------------------------------------------- where time goes


def components(setup: Setup, seconds: float) -> dict[str, Any]:
    """Microseconds per uncached verification spent in each part, timed in isolation.

    The parts call the same functions Janus calls, on the same inputs; the remainder
    (total minus the parts) is linkage, attenuation, time checks, ability matching,
    caveat evaluation and building the result objects, plus the difference between a
    part run alone in a tight loop (warm CPU caches) and the same part run in sequence
    with all the others, which on a shared 2-vCPU machine is not small.
    """
    text, bundle, invocation = setup.bundle_text, setup.bundle, setup.invocations[0]
    compacts = [c.compact for c in bundle.chain]
    segments = [part for c in compacts for part in c.split(".")]
    decoded = [b64url_decode(s) for c in compacts for s in c.split(".")[:2]]
    dids = [c.issuer for c in bundle.chain] + [c.audience for c in bundle.chain]
    dids.append(Invocation.parse(invocation).holder)
    base58_bodies = [d.removeprefix("did:key:z") for d in dids]
    parsed_invocation = Invocation.parse(invocation)
    keyed = [
        (c.jws, public_key_for(c.issuer, "iss"), f"link {i}") for i, c in enumerate(bundle.chain)
    ]
    keyed.append((parsed_invocation.jws, public_key_for(parsed_invocation.holder, "iss"), "inv"))
    abilities = [a for c in bundle.chain for a in c.abilities]
    text_bytes = text.encode()

    def total() -> None:
        Verifier().verify(text, invocation, REQUEST, now=setup.now + 1)

    def signatures() -> None:
        for parsed, key, what in keyed:
            verify_signature(parsed, key, what=what)

    def base64_part() -> None:
        for s in segments:
            b64url_decode(s)

    def json_part() -> None:
        strict_json(text_bytes, "bundle")
        for blob in decoded:
            strict_json(blob, "part")

    def ids_part() -> None:
        for c in compacts:
            sha256_b64(c)

    def did_part() -> None:
        for d in dids:
            public_key_for(d, "did")

    def base58_part() -> None:
        for body in base58_bodies:
            base58.b58decode(body)

    def caveat_part() -> None:
        for a in abilities:
            parse_caveats(a.caveats)

    def request_part() -> None:
        parsed_invocation.check_request(check_request(REQUEST))

    parts: list[tuple[str, str, Operation, bool]] = [
        # key, label, operation, counted in the sum (sub-parts are not)
        ("total", "uncached Verifier().verify(), whole", total, False),
        ("signatures", "4 signature checks (policies.jws.verify_signature)", signatures, True),
        ("did_key", "7 did:key decodings (3 iss, 3 aud, invocation iss)", did_part, True),
        ("did_key_base58", "  of which base58 decoding (pure Python)", base58_part, False),
        (
            "bundle_parse",
            "Bundle.parse (JSON, 3 JWS, claims, ids)",
            lambda: Bundle.parse(text),
            True,
        ),
        ("bundle_base64", "  of which base64url, 9 segments", base64_part, False),
        ("bundle_json", "  of which strict JSON, bundle + 6 parts", json_part, False),
        ("bundle_ids", "  of which 3 link ids (SHA-256, base64url)", ids_part, False),
        ("invocation_parse", "Invocation.parse", lambda: Invocation.parse(invocation), True),
        ("caveat_parse", "caveat parsing, every ability of 3 links", caveat_part, True),
        ("request", "request check + digest", request_part, True),
        ("request_digest", "  of which the digest alone", lambda: request_digest(REQUEST), False),
    ]
    # Several short rounds over all parts, medians per part: a burst of load from
    # elsewhere then hits one sample of every part instead of all samples of one part.
    rates: dict[str, list[float]] = {key: [] for key, _, _, _ in parts}
    for _ in range(COMPONENT_ROUNDS):
        for key, _, operation, _ in parts:
            rates[key].append(ops_per_second(operation, seconds / COMPONENT_ROUNDS, batch=4))
    micros = {key: 1e6 / median(values) for key, values in rates.items()}
    counted = sum(micros[k] for k, _, _, c in parts if c)
    rows = [{"key": k, "label": label, "us": micros[k]} for k, label, _, _ in parts]
    rows.append(
        {
            "key": "remainder",
            "label": "rest: linkage, attenuation, matching, objects; parts run colder",
            "us": micros["total"] - counted,
        }
    )
    return {"rows": rows}


def profile(setup: Setup, calls: int) -> dict[str, Any]:
    """cProfile over ``calls`` uncached verifications: the top functions by own time."""
    text, pool = setup.bundle_text, setup.invocations
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        Verifier().verify(text, pool[i % len(pool)], REQUEST, now=setup.now + 1)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = []
    total = 0.0
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        where = filename
        with contextlib.suppress(ValueError):
            where = str(Path(filename).resolve().relative_to(ROOT))
        entries.append(
            {
                "function": f"{where}:{line}({name})" if line else name,
                "calls_per_verify": ncalls / calls,
                "own_us_per_verify": 1e6 * tottime / calls,
                "cumulative_us_per_verify": 1e6 * cumtime / calls,
            }
        )
    entries.sort(key=lambda e: -e["own_us_per_verify"])
    return {"calls": calls, "total_us_per_verify": 1e6 * total / calls, "top": entries[:25]}


# -------------------------------------------------------------------------- output


def environment() -> dict[str, Any]:
    return {
        **harness.machine(),
        "cryptography": harness.version("cryptography"),
        "base58": harness.version("base58"),
        "biscuit_python": harness.version("biscuit-python"),
        "pynacl": harness.version("PyNaCl"),
    }


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def render(result: dict[str, Any]) -> str:
    env, params = result["environment"], result["parameters"]
    lines = [
        "Janus capability verification: 3-link chain (ES256 -> EdDSA -> EdDSA) + invocation",
        f"{env['date_utc']}  {env['os']}  {env['cpu_count']} CPUs  Python {env['python']}  "
        f"cryptography {env['cryptography']}  biscuit-python {env['biscuit_python'] or '-'}",
        f"{params['repeat']} repetitions x {params['seconds']:g} s per measurement, "
        "interleaved; medians. Ratio = median of the per-repetition ratios "
        "(range in brackets).",
        f"load average at start / end: {env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}",
        f"bundle {result['sizes']['bundle_bytes']} bytes, invocation "
        f"{result['sizes']['invocation_bytes']} bytes"
        + (
            f", biscuit token {result['sizes']['biscuit_bytes']} bytes (base64)"
            if result["sizes"].get("biscuit_bytes")
            else ""
        ),
        "",
        f"{'workload':<64}{'ops/s':>10}{'us/op':>9}",
    ]
    lines.append("-" * len(lines[-1]))
    for w in result["workloads"]:
        lines.append(f"{w['label']:<64}{fmt_rate(w['ops_per_s']):>10}{1e6 / w['ops_per_s']:>9.0f}")
    header = f"{'comparison (a / b, ops/s)':<46}{'ratio':>8}{'range':>14}{'target':>9}{'met':>5}"
    lines += ["", header, "-" * len(header)]
    for row in result["comparisons"]:
        if row["target"] is None:
            target, met = "info", ""
        else:
            target = f"{'>' if row['target_is_strict'] else '>='}{row['target']:.1f}x"
            met = "yes" if row["met"] else "NO"
        span = f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]"
        lines.append(f"{row['comparison']:<46}{row['ratio']:>7.2f}x{span:>14}{target:>9}{met:>5}")
    if result["biscuit_skipped"]:
        lines += ["", f"biscuit comparison skipped: {result['biscuit_skipped']}"]
    lines += [
        "",
        "Where an uncached verification spends its time (us, parts timed in isolation):",
    ]
    for row in result["components"]["rows"]:
        lines.append(f"  {row['label']:<68}{row['us']:>8.0f}")
    if result["profile"] is not None:
        prof = result["profile"]
        lines += [
            "",
            f"cProfile, {prof['calls']} uncached verifications (profiler overhead inflates "
            f"Python code): {prof['total_us_per_verify']:.0f} us per verification",
            f"  {'own us':>7} {'cum us':>7} {'calls':>6}  function",
        ]
        for e in prof["top"]:
            lines.append(
                f"  {e['own_us_per_verify']:>7.1f} {e['cumulative_us_per_verify']:>7.1f} "
                f"{e['calls_per_verify']:>6.1f}  {e['function']}"
            )
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Janus capability verification vs raw signature checks and biscuit-python."
    )
    harness.add_run_arguments(parser, seconds=DEFAULT_SECONDS, repeat=DEFAULT_REPEAT)
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"also run cProfile over {PROFILE_CALLS} uncached verifications",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    env = environment()
    with janus_setup() as setup:
        check_janus(setup)
        checks = raw_checks(setup)
        raw = raw_verifier(checks)
        raw()  # raises InvalidSignature if the pre-split inputs were wrong
        raw_nacl = raw_nacl_verifier(checks)
        if raw_nacl is not None:
            raw_nacl()  # raises BadSignatureError if the inputs were wrong
        biscuit = biscuit_side()
        skipped = (
            None
            if biscuit is not None
            else "biscuit_auth is not importable; pip install biscuit-python==0.4.0 into the venv"
        )
        if skipped:
            progress(f"skipping the biscuit comparison: {skipped}")

        text, bundle, now = setup.bundle_text, setup.bundle, setup.now + 1
        pool = itertools.cycle(setup.invocations)
        cached = Verifier()
        cached.verify(text, setup.invocations[0], REQUEST, now=now)  # fills the cache

        def uncached() -> None:
            Verifier().verify(text, next(pool), REQUEST, now=now)

        short_text, short_pool = setup.short_bundle_text, itertools.cycle(setup.short_invocations)
        Verifier().verify(short_text, setup.short_invocations[0], REQUEST, now=now)

        def uncached_short() -> None:
            Verifier().verify(short_text, next(short_pool), REQUEST, now=now)

        def cached_text() -> None:
            cached.verify(text, next(pool), REQUEST, now=now)

        def cached_parsed() -> None:
            cached.verify(bundle, next(pool), REQUEST, now=now)

        workloads = [
            Workload(
                "janus_uncached", "Janus uncached: Verifier().verify(bundle text, ...)", uncached
            ),
            Workload("raw", "raw: 4 signature checks with cryptography (1 ES256, 3 Ed25519)", raw),
            Workload(
                "janus_cached",
                "Janus cached: one Verifier, bundle text, new invocation",
                cached_text,
            ),
            Workload(
                "janus_cached_parsed",
                "Janus cached: one Verifier, parsed Bundle, new invocation",
                cached_parsed,
            ),
        ]
        pairs = [
            Pair(
                "vs_raw",
                "Janus uncached / raw signature checks",
                "janus_uncached",
                "raw",
                TARGET_VS_RAW,
            ),
            Pair(
                "vs_biscuit",
                "Janus uncached / biscuit verify+authorize",
                "janus_uncached",
                "biscuit",
                TARGET_VS_BISCUIT,
                strict=True,
            ),
            Pair(
                "cached",
                "Janus cached / Janus uncached",
                "janus_cached",
                "janus_uncached",
                TARGET_CACHED,
            ),
            Pair(
                "cached_parsed",
                "Janus cached, parsed Bundle / uncached",
                "janus_cached_parsed",
                "janus_uncached",
                None,
            ),
        ]
        if biscuit is not None:
            workloads.insert(
                2,
                Workload(
                    "biscuit",
                    "biscuit-python: parse + verify + authorize, 2 blocks",
                    biscuit.operation,
                ),
            )
            workloads.insert(
                3,
                Workload(
                    "janus_uncached_1link",
                    "Janus uncached, 1-link chain + invocation (2 signatures)",
                    uncached_short,
                ),
            )
            pairs += [
                Pair("raw_vs_biscuit", "raw signature checks / biscuit", "raw", "biscuit", None),
                Pair(
                    "1link_vs_biscuit",
                    "Janus uncached 1-link / biscuit",
                    "janus_uncached_1link",
                    "biscuit",
                    None,
                ),
            ]
        else:
            pairs = [p for p in pairs if p.key != "vs_biscuit"]
        if raw_nacl is not None:
            workloads.insert(
                2,
                Workload(
                    "raw_nacl",
                    "raw, Ed25519 by PyNaCl: 1 ES256 (cryptography), 3 Ed25519",
                    raw_nacl,
                ),
            )
            pairs.append(
                Pair("raw_nacl", "raw with PyNaCl / raw (cryptography)", "raw_nacl", "raw", None)
            )
            if biscuit is not None:
                pairs.append(
                    Pair(
                        "raw_nacl_vs_biscuit",
                        "raw with PyNaCl / biscuit",
                        "raw_nacl",
                        "biscuit",
                        None,
                    )
                )
        progress(
            f"measuring {len(workloads)} workloads x {args.repeat} repetitions x {args.seconds:g} s"
        )
        samples = run_interleaved(workloads, args.seconds, args.repeat)
        progress("timing the parts of an uncached verification")
        parts = components(setup, COMPONENT_SECONDS)
        prof = None
        if args.profile:
            progress(f"profiling {PROFILE_CALLS} uncached verifications")
            prof = profile(setup, PROFILE_CALLS)
        sizes = {
            "bundle_bytes": len(text.encode()),
            "invocation_bytes": len(setup.invocations[0]),
            "biscuit_bytes": biscuit.token_bytes if biscuit else None,
        }
    env["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "capabilities",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/capabilities.py", *sys.argv[1:]]
            if argv is None
            else ["benchmarks/capabilities.py", *argv]
        ),
        "parameters": {
            "seconds": args.seconds,
            "repeat": args.repeat,
            "batch": BATCH,
            "invocation_pool": INVOCATION_POOL,
        },
        "environment": env,
        "sizes": sizes,
        "workloads": [
            {
                "key": w.key,
                "label": w.label,
                "ops_per_s": median(samples[w.key]),
                "samples": samples[w.key],
            }
            for w in workloads
        ],
        "comparisons": [pair_summary(p, samples) for p in pairs],
        "biscuit_skipped": skipped,
        "components": parts,
        "profile": prof,
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
