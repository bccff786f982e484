"""Run inside a private mount namespace (see test_audit_full.py): the service's state
directory is a small tmpfs that is filled once the engine is open.

    python -m tests.agent.hsm_service.audit_full_child CONFIG STATE_DIR CLIENT NEW_KEY

Prints one JSON object: what each operation gave once the disk was full (``done`` or
the error code), and whether the token changed (the new key exists, the destroyed key
is gone), as this process's own PKCS#11 session sees it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.hsm_service.config import load_config
from agent.hsm_service.engine import HsmEngine, OperationRequest
from agent.hsm_service.errors import AuditUnavailable, HsmServiceError
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.uri import Pkcs11Uri


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last byte
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def _outcome(engine: HsmEngine, request: OperationRequest) -> str:
    try:
        engine.perform(request)
    except HsmServiceError as exc:
        return exc.code
    return "done"


def main(argv: list[str]) -> int:
    config_path, state_dir, client, new_key = argv
    config = load_config(config_path)
    result: dict[str, Any] = {}
    with HsmEngine.open(config, sign_heads=False) as engine:
        engine.perform(OperationRequest(client, "sign", "hsm-sign", b"before"))
        _fill(Path(state_dir) / "filler")
        # Signatures until the log's file must grow: from then on nothing is written.
        for _ in range(2000):
            try:
                engine.perform(OperationRequest(client, "sign", "hsm-sign", b"x" * 4096))
            except AuditUnavailable:
                result["full"] = True
                break
        result["generate"] = _outcome(engine, OperationRequest(client, "generate", new_key))
        result["destroy"] = _outcome(engine, OperationRequest(client, "destroy", "hsm-ed"))
        result["sign"] = _outcome(engine, OperationRequest(client, "sign", "hsm-sign", b"y"))
    token = config.tokens[0]
    provider = Pkcs11Provider.open(
        Pkcs11Uri({"token": token.token}, {"module-path": token.module}),
        pin_source=lambda: os.environ["JANUS_HSM_TEST_PIN"],
    )
    for label, name in ((new_key, "generated"), ("hsm-ed", "destroyed_key_present")):
        try:
            provider.lookup(f"pkcs11:token={token.token};object={label}")
            result[name] = True
        except KeyNotFoundError:
            result[name] = False
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
