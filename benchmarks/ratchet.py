"""Benchmark: the relationship ratchet against Syndace ``doubleratchet`` and ``vodozemac``.

What it answers
* **Ratchet speed.** One operation is "encrypt a 100-byte message, then decrypt it".
  *Alternating*: the two sides take turns, so every message carries a new ratchet key
  (a DH ratchet step on each side per message).  *One-sided*: one side sends many in a
  row (symmetric-key steps only).  Janus (header encryption, padding to 256 bytes,
  AES-256-GCM) runs against Syndace ``doubleratchet`` 1.3.0 (no header encryption,
  AES-CBC + HMAC, configured with the Signal-recommended KDFs) and ``vodozemac`` 0.10
  (Olm, Rust, no header encryption) in the same run.  Target: Janus >= 1.5x Syndace.
* **Wire overhead.** Bytes on the wire minus the 100 plaintext bytes, for each.
  Syndace defines no wire format: its overhead is its header fields (32 + 4 + 4 bytes)
  plus its ciphertext's growth.
* **Establishment with SoftHSM.** Token operations (``KeyHandle.exchange`` calls) per
  side per relationship (target: exactly 1) and the time of each side's X3DH + ML-KEM
  with the agreement key in a SoftHSM2 token (initiator: ``initiate`` + the first
  message; responder: ``open_first_message``, which also deletes one-time prekeys
  durably and records the header's digest with fsync).

Measurements are interleaved (Janus, Syndace, vodozemac, then again) so drift on a busy
machine hits all.  Run it as::

    .venv/bin/python benchmarks/ratchet.py [--seconds S] [--repeat N] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
from harness import median, progress  # noqa: E402

from agent.relationships import x3dh  # noqa: E402
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore, sign_binding  # noqa: E402
from agent.relationships.ratchet import (  # noqa: E402
    RatchetState,
    first_message,
    open_first_message,
)
from agent.relationships.suite import Suite, encode_public, generate  # noqa: E402
from hardware.softhsm import ensure_token  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.pkcs11 import Pkcs11Provider  # noqa: E402
from janus_hsm.provider import KeyHandle  # noqa: E402

MESSAGE = b"m" * 100
Pair = Callable[[int], float]  # runs n operations, returns seconds


# -- Janus ------------------------------------------------------------------------------


def janus_pair() -> tuple[RatchetState, RatchetState]:
    suite = Suite.X25519
    spk = generate(suite)
    sk, ad = os.urandom(32), os.urandom(100)
    header = x3dh.InitialHeader(suite, b"", b"", b"")
    alex = RatchetState.initiator(
        x3dh.InitialKeys(sk, ad, header, suite, ratchet_public=encode_public(spk.public_key()))
    )
    blair = RatchetState.responder(x3dh.InitialKeys(sk, ad, header, suite, ratchet_private=spk))
    blair, _ = blair.decrypt(alex.encrypt(b"start"))
    return alex, blair


def janus_runner(alternating: bool) -> Pair:
    alex, blair = janus_pair()
    sides = [alex, blair]

    def run(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            s = (i % 2) if alternating else 0
            wire = sides[s].encrypt(MESSAGE)
            sides[1 - s], text = sides[1 - s].decrypt(wire)
        elapsed = time.perf_counter() - start
        assert text == MESSAGE
        return elapsed

    return run


def janus_overhead() -> int:
    alex, _ = janus_pair()
    return len(alex.encrypt(MESSAGE)) - len(MESSAGE)


# -- Syndace doubleratchet --------------------------------------------------------------


def syndace_classes() -> dict[str, Any]:
    from doubleratchet import DoubleRatchet
    from doubleratchet.recommended import (
        HashFunction,
        aead_aes_hmac,
        diffie_hellman_ratchet_curve25519,
        kdf_hkdf,
        kdf_separate_hmacs,
    )

    class Aead(aead_aes_hmac.AEAD):
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return b"bench message key"

    class RootKDF(kdf_hkdf.KDF):
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return b"bench root chain"

    class ChainKDF(kdf_separate_hmacs.KDF):
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

    class Ratchet(DoubleRatchet):
        @staticmethod
        def _build_associated_data(associated_data: bytes, header: Any) -> bytes:
            return bytes(
                associated_data
                + header.ratchet_pub
                + header.sending_chain_length.to_bytes(8, "big")
                + header.previous_sending_chain_length.to_bytes(8, "big")
            )

    return {
        "ratchet": Ratchet,
        "params": {
            "diffie_hellman_ratchet_class": diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet,
            "root_chain_kdf": RootKDF,
            "message_chain_kdf": ChainKDF,
            "message_chain_constant": b"\x02\x01",
            "dos_protection_threshold": 1000,
            "max_num_skipped_message_keys": 2000,
            "aead": Aead,
        },
    }


def syndace_runner(alternating: bool) -> tuple[Pair, int]:
    from cryptography.hazmat.primitives.asymmetric import x25519

    classes = syndace_classes()
    ratchet, params = classes["ratchet"], classes["params"]
    loop = asyncio.new_event_loop()
    bob_priv = x25519.X25519PrivateKey.generate()
    sk, ad = os.urandom(32), os.urandom(100)

    async def setup() -> tuple[Any, Any, int]:
        alice, message = await ratchet.encrypt_initial_message(
            shared_secret=sk,
            recipient_ratchet_pub=bob_priv.public_key().public_bytes_raw(),
            message=b"start",
            associated_data=ad,
            **params,
        )
        bob, _ = await ratchet.decrypt_initial_message(
            shared_secret=sk,
            own_ratchet_priv=bob_priv.private_bytes_raw(),
            message=message,
            associated_data=ad,
            **params,
        )
        probe = await alice.encrypt_message(MESSAGE, ad)
        await bob.decrypt_message(probe, ad)
        overhead = len(probe.header.ratchet_pub) + 8 + len(probe.ciphertext) - len(MESSAGE)
        return alice, bob, overhead

    alice, bob, overhead = loop.run_until_complete(setup())
    sides = [alice, bob]

    async def timed(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            s = (i % 2) if alternating else 0
            message = await sides[s].encrypt_message(MESSAGE, ad)
            text = await sides[1 - s].decrypt_message(message, ad)
        elapsed = time.perf_counter() - start
        assert text == MESSAGE
        return elapsed

    return (lambda n: loop.run_until_complete(timed(n))), overhead


# -- vodozemac --------------------------------------------------------------------------


def vodozemac_runner(alternating: bool) -> tuple[Pair, int]:
    import vodozemac

    alice_account, bob_account = vodozemac.Account(), vodozemac.Account()
    bob_account.generate_one_time_keys(1)
    one_time = next(iter(bob_account.one_time_keys.values()))
    alice = alice_account.create_outbound_session(bob_account.curve25519_key, one_time)
    first = alice.encrypt(b"start")
    pre_key = first.to_pre_key()
    assert pre_key is not None
    bob, _ = bob_account.create_inbound_session(alice_account.curve25519_key, pre_key)
    reply = bob.encrypt(b"ack")
    alice.decrypt(reply)
    probe = alice.encrypt(MESSAGE)
    bob.decrypt(probe)
    overhead = len(probe.to_parts()[1]) - len(MESSAGE)
    sides = [alice, bob]

    def run(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            s = (i % 2) if alternating else 0
            text = sides[1 - s].decrypt(sides[s].encrypt(MESSAGE))
        elapsed = time.perf_counter() - start
        assert text == MESSAGE
        return elapsed

    return run, overhead


def per_message_us(run: Pair, seconds: float) -> float:
    """Microseconds per encrypt+decrypt, from batches until ``seconds`` have passed."""
    run(50)  # warm up
    count, total = 0, 0.0
    while total < seconds:
        total += run(200)
        count += 200
    return total / count * 1e6


# -- establishment ----------------------------------------------------------------------


def count_exchanges(handle: KeyHandle) -> list[int]:
    counter = [0]
    original = handle.exchange

    def exchange(peer: Any) -> bytes:
        counter[0] += 1
        return original(peer)

    handle.exchange = exchange  # type: ignore[method-assign,assignment]
    return counter


@contextlib.contextmanager
def token_provider() -> Iterator[tuple[Pkcs11Provider, Path]]:
    with tempfile.TemporaryDirectory(prefix="janus-bench-ratchet-") as tmp:
        token = ensure_token(Path(tmp) / "softhsm", "bench-ratchet")
        token.activate()
        yield Pkcs11Provider.open(token.uri()), Path(tmp)


def establishment(suite: Suite, rounds: int) -> dict[str, Any]:
    root_alg, agreement_alg = {
        Suite.X25519: (Algorithm.EdDSA, Algorithm.X25519),
        Suite.P256: (Algorithm.ES256, Algorithm.ES256),
    }[suite]
    with token_provider() as (hsm, tmp):
        keys = {
            f"{who}-{role}": hsm.generate(f"pkcs11:object={who}-{role}", alg)
            for who in ("alex", "blair")
            for role, alg in (("root", root_alg), ("agree", agreement_alg))
        }
        store = PrekeyStore(tmp / "prekeys", suite)
        guard = x3dh.FileReplayGuard(tmp / "consumed")
        own = sign_binding(keys["alex-root"], keys["alex-agree"])
        alex_count = count_exchanges(keys["alex-agree"])
        blair_count = count_exchanges(keys["blair-agree"])
        initiator_s, responder_s, per_side = [], [], set()
        for _ in range(rounds):
            published = store.publish(keys["blair-root"], keys["blair-agree"], one_time=1)
            bundle = PrekeyBundle.from_dict(published.to_dict())
            alex_count[0] = blair_count[0] = 0
            start = time.perf_counter()
            initial, _ = x3dh.initiate(keys["alex-agree"], keys["alex-root"].did, own, bundle)
            wire = first_message(initial, RatchetState.initiator(initial), MESSAGE)
            middle = time.perf_counter()
            opened = open_first_message(keys["blair-agree"], store, wire, replay_guard=guard)
            end = time.perf_counter()
            assert opened.plaintext == MESSAGE
            initiator_s.append(middle - start)
            responder_s.append(end - middle)
            per_side.add((alex_count[0], blair_count[0]))
        return {
            "token_exchanges_per_side": sorted(per_side),
            "initiator_ms": median(initiator_s) * 1e3,
            "responder_ms": median(responder_s) * 1e3,
            "initial_message_bytes": len(wire),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    harness.add_run_arguments(parser, seconds=1.0, repeat=5)
    parser.add_argument("--rounds", type=harness.positive_int, default=20)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        **harness.machine(),
        "cryptography": harness.version("cryptography"),
        "doubleratchet": harness.version("doubleratchet"),
        "vodozemac": harness.version("vodozemac"),
        "ratchet": {},
    }
    overhead = {"janus": janus_overhead()}
    for mode, alternating in (("alternating", True), ("one_sided", False)):
        samples: dict[str, list[float]] = {"janus": [], "syndace": [], "vodozemac": []}
        for r in range(args.repeat):
            progress(f"{mode}: round {r + 1}/{args.repeat}")
            samples["janus"].append(per_message_us(janus_runner(alternating), args.seconds))
            run, overhead["syndace"] = syndace_runner(alternating)
            samples["syndace"].append(per_message_us(run, args.seconds))
            run, overhead["vodozemac"] = vodozemac_runner(alternating)
            samples["vodozemac"].append(per_message_us(run, args.seconds))
        medians = {name: median(values) for name, values in samples.items()}
        result["ratchet"][mode] = {
            "us_per_message": medians,
            "samples_us": samples,
            "syndace_over_janus": medians["syndace"] / medians["janus"],
            "vodozemac_over_janus": medians["vodozemac"] / medians["janus"],
        }
    result["wire_overhead_bytes_100B"] = overhead
    result["establishment"] = {}
    for suite in Suite:
        progress(f"establishment: {suite}")
        result["establishment"][str(suite)] = establishment(suite, args.rounds)
    result["loadavg_end"] = list(os.getloadavg())

    print("Ratchet, 100-byte message, encrypt+decrypt (us/message, median)")
    print(
        f"{'mode':<12}{'Janus':>10}{'Syndace':>10}{'vodozemac':>11}{'Syn/Janus':>11}{'vod/Janus':>11}"
    )
    for mode, row in result["ratchet"].items():
        m = row["us_per_message"]
        print(
            f"{mode:<12}{m['janus']:>10.1f}{m['syndace']:>10.1f}{m['vodozemac']:>11.1f}"
            f"{row['syndace_over_janus']:>10.2f}x{row['vodozemac_over_janus']:>10.2f}x"
        )
    print("Wire overhead for 100 bytes: " + ", ".join(f"{k} {v} B" for k, v in overhead.items()))
    for suite_name, row in result["establishment"].items():
        print(
            f"Establishment {suite_name}:"
            f" token exchanges per side {row['token_exchanges_per_side']},"
            f" initiator {row['initiator_ms']:.2f} ms, responder {row['responder_ms']:.2f} ms,"
            f" initial message {row['initial_message_bytes']} B"
        )
    if args.json:
        harness.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
