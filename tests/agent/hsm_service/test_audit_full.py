"""Forced audit with a log that cannot be written: its disk is full.

The state directory is a 2 MiB tmpfs mounted in a private mount namespace (``unshare
-m``, as tests/faults/test_disk_full.py does), filled once the service is running; the
child process (audit_full_child.py) then asks for a generation, a destruction and a
signature.  Each is refused with ``audit_unavailable`` and the token is unchanged.
Where no namespace can be made (not root, or no CAP_SYS_ADMIN), the test is skipped;
test_engine.py covers the same refusal with the log's lock held by another process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hardware.softhsm import SoftHSMToken
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from tests.agent.hsm_service.conftest import ConfigWriter
from tests.faults.test_disk_full import _private_tmpfs_works

ROOT = Path(__file__).resolve().parents[3]


def test_a_full_log_stops_every_operation_and_leaves_the_token_untouched(
    write_config: ConfigWriter,
    clients: dict[str, str],
    hsm_token: SoftHSMToken,
    hsm_provider: Pkcs11Provider,
    key_name: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "full"
    state.mkdir()
    if not _private_tmpfs_works(state):
        pytest.skip("no private mount namespace here (needs root and CAP_SYS_ADMIN)")
    config = write_config(
        {
            "hsm-sign": {},
            key_name: {"operations": ["generate"], "algorithm": "ES256"},
            "hsm-ed": {"operations": ["destroy"], "state": "compromised"},
        },
        state_dir=state,
        service={"audit-timeout": 1},
    )
    alice = clients["alice-app"]
    script = 'mount -t tmpfs -o size=2m tmpfs "$0" && exec "$@"'
    child = [sys.executable, "-m", "tests.agent.hsm_service.audit_full_child"]
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(state)]
    argv += [*child, str(config), str(state), alice, key_name]
    env = {**hsm_token.environ(), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(done.stdout)
    assert result["full"] is True
    assert result["generate"] == result["destroy"] == result["sign"] == "audit_unavailable"
    assert result["generated"] is False and result["destroyed_key_present"] is True
    with pytest.raises(KeyNotFoundError):
        hsm_provider.lookup(f"pkcs11:object={key_name}")
    assert hsm_provider.lookup("pkcs11:object=hsm-ed").label == "hsm-ed"
