"""Benchmark: what the Janus PIV key provider costs over raw yubikit, on the virtual card.

Why: every Janus signature on a YubiKey goes through ``PivKeyHandle``: a custody check,
the card's lock, the PIN-policy bookkeeping and a DER-to-raw conversion.  This times
that path side by side with the best you can do with yubikit directly (one PivSession,
PIN verified once, ``PivSession.sign``) on the same virtual card, same key, in the same
process, interleaved A, B, B, A so drift hits both.  The card is the in-process virtual
YubiKey (hardware/virtual_piv.py), so the numbers measure software overhead: a real
YubiKey takes tens of milliseconds per signature and hides all of it.

    .venv/bin/python benchmarks/piv_provider.py [--seconds S] [--repeat N] [--json OUT]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from yubikit.piv import KEY_TYPE, PIN_POLICY, SLOT, PivSession  # noqa: E402

from hardware.virtual_piv import VirtualPivApplet, VirtualYubiKey  # noqa: E402
from janus_hsm.algorithms import Algorithm  # noqa: E402
from janus_hsm.backends.piv import PivKeyHandle, PivProvider  # noqa: E402

PIN = "123456"
DATA = b"x" * 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_arguments(parser, seconds=1.0, repeat=5)
    args = parser.parse_args()

    logging.disable(logging.WARNING)  # the default management key warning, once is enough
    key = VirtualYubiKey(piv=VirtualPivApplet(serial=12345678))
    provider = PivProvider.from_connection(key.connect(), pin_source=lambda: PIN)
    results = {}
    for alg, slot in (
        (Algorithm.ES256, SLOT.AUTHENTICATION),
        (Algorithm.EdDSA, SLOT.RETIRED1),
    ):
        handle = provider.generate(f"piv:slot={slot:02x}", alg, pin_policy=PIN_POLICY.ONCE)
        raw = PivSession(key.connect())  # its own session on the same card
        raw.verify_pin(PIN)
        if alg is Algorithm.ES256:

            def raw_sign(s: PivSession = raw, sl: SLOT = slot) -> bytes:
                return s.sign(sl, KEY_TYPE.ECCP256, DATA, hashes.SHA256())

        else:

            def raw_sign(s: PivSession = raw, sl: SLOT = slot) -> bytes:
                return s.sign(sl, KEY_TYPE.ED25519, DATA, None)

        def janus_sign(h: PivKeyHandle = handle) -> bytes:
            return h.sign(DATA)

        # The two sessions take turns on one card; each re-selects PIV and re-verifies
        # the PIN when the other was last: time each with its own session warm.
        janus_rates, raw_rates = [], []
        for i in range(args.repeat):
            order = [(janus_sign, janus_rates), (raw_sign, raw_rates)]
            for operation, rates in order if i % 2 == 0 else order[::-1]:
                if operation is raw_sign:
                    raw.protocol.select(b"\xa0\x00\x00\x03\x08")
                    raw.verify_pin(PIN)
                else:
                    provider.card._pin_verified = False  # the other session selected PIV
                    handle.sign(DATA)
                rates.append(harness.ops_per_second(operation, args.seconds))
        j, r = harness.median(janus_rates), harness.median(raw_rates)
        results[alg.value] = {"janus_ops_s": j, "raw_ops_s": r, "ratio": j / r}
        harness.progress(
            f"{alg.value}: janus {j:,.0f}/s  raw yubikit {r:,.0f}/s  ratio {j / r:.2f}"
        )

    print(f"{'operation':<14}{'janus/s':>12}{'yubikit/s':>12}{'ratio':>8}")
    for name, row in results.items():
        print(
            f"{name + ' sign':<14}{row['janus_ops_s']:>12,.0f}{row['raw_ops_s']:>12,.0f}"
            f"{row['ratio']:>8.2f}"
        )
    if args.json:
        harness.write_json(
            args.json,
            {
                "benchmark": "piv_provider",
                "card": "hardware/virtual_piv.py in process (yubikit InProcessConnection)",
                "seconds": args.seconds,
                "repeat": args.repeat,
                "machine": harness.machine(),
                "yubikey_manager": harness.version("yubikey-manager"),
                "results": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
