"""Sign with a PIV key over PC/SC in a loop, one line per attempt (see test_pcscd_faults.py).

    python -m tests.faults.pcsc_child SERIAL PIN_FILE STOP_FILE

Runs in its own process so that its libpcsclite talks to the test's private pcscd (the
library reads the socket path once per process).  Generates a key in slot 9c, then
signs until STOP_FILE exists, printing ``ok`` or ``error <class> <code>`` per attempt.
A failed attempt drops the provider and opens a new one, as a long-running agent would.
Any exception outside JanusHSMError ends it with a traceback (exit 1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.piv import PivProvider
from janus_hsm.errors import JanusHSMError
from janus_hsm.provider import KeyProvider


def main(argv: list[str]) -> int:
    serial, pin_file, stop = argv[0], argv[1], Path(argv[2])
    uri = f"piv:serial={serial};slot=9c"
    query = f"?pin-source=file:{pin_file}"
    first = PivProvider.open(uri + query)
    first.generate(uri, Algorithm.ES256)
    provider: KeyProvider | None = first
    print("ready", flush=True)
    while not stop.exists():
        try:
            if provider is None:
                provider = PivProvider.open(uri + query)
            provider.find(uri).sign(b"a payment, signed on the card")
            print("ok", flush=True)
            time.sleep(0.02)  # let pcscd's reader polling in between, on a loaded machine
        except JanusHSMError as exc:
            print(f"error {type(exc).__name__} {exc.code}", flush=True)
            if provider is not None:
                provider.close()
                provider = None
            time.sleep(0.1)
    if provider is not None:
        provider.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
