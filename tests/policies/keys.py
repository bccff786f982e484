"""Keys for capability tests: a hardware root on SoftHSM, software keys for agents."""

from __future__ import annotations

from pathlib import Path

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software import SoftwareProvider
from janus_hsm.provider import KeyHandle

PASSPHRASE = "capability tests"


def software_keys(directory: Path, names_and_algs: dict[str, Algorithm]) -> dict[str, KeyHandle]:
    provider = SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: PASSPHRASE, allow_extractable=True
    )
    return {
        name: provider.generate(f"soft:object={name}", alg) for name, alg in names_and_algs.items()
    }
