"""Concurrent clients against a real HSM service process: a use limit is met exactly,
and a restart under load leaves every client with an answer (success or a clear
error), none hanging, and all of them served again once the service is back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.hsm_service.client import HsmClientError, HsmUnreachableError
from hardware.postgres import free_port
from janus_hsm.provider import KeyHandle
from tests.agent.hsm_service.hsmprocess import HsmServiceProcess, client


def test_concurrent_clients_get_exactly_max_uses(
    write_config: Any, tmp_path: Path, client_keys: dict[str, KeyHandle], clients: dict[str, str]
) -> None:
    limit = 10
    service = HsmServiceProcess(
        write_config(
            {"hsm-sign": {"max-uses": limit, "clients": [clients["alice-app"], clients["bob-app"]]}}
        ),
        tmp_path,
    )
    try:
        holders = [client_keys["alice-app"], client_keys["bob-app"]] * 4
        workers = [client(service.url, client_keys["admin"], h) for h in holders]

        def attempt(index: int) -> str:
            try:
                workers[index % len(workers)].sign("hsm-sign", f"n{index}".encode())
                return "ok"
            except HsmClientError as exc:
                return f"{exc.code}:{exc.reason}"

        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            results = list(pool.map(attempt, range(4 * limit)))
    finally:
        service.stop()
    assert results.count("ok") == limit
    assert set(results) == {"ok", "hsm_refused:max_uses"}


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_restart_under_load(
    write_config: Any, tmp_path: Path, client_keys: dict[str, KeyHandle], stop: str
) -> None:
    """Stopped cleanly (SIGTERM) or killed (SIGKILL: the lock, the ledger and the audit
    log must recover on their own), the service comes back on the same port."""
    port = free_port()
    config = write_config({"hsm-sign": {}})
    service = HsmServiceProcess(config, tmp_path, port=port)
    workers = [
        client(service.url, client_keys["admin"], client_keys["alice-app"]) for _ in range(4)
    ]
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()
    done = threading.Event()

    def load(worker: Any) -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                worker.sign("hsm-sign", b"under load")
                outcome = "ok"
            except HsmUnreachableError:
                outcome = "unreachable"
            except HsmClientError as exc:
                outcome = f"refused:{exc.code}"
            with lock:
                outcomes.append((outcome, time.monotonic() - started))

    threads = [threading.Thread(target=load, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        if stop == "kill":
            service.process.kill()
        service.stop()
        service = HsmServiceProcess(config, tmp_path, port=port)
        with lock:
            after_restart = len(outcomes)
        time.sleep(0.5)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
        service.stop()
    assert not any(t.is_alive() for t in threads), "a client hung"
    kinds = {o for o, _ in outcomes}
    assert kinds <= {"ok", "unreachable"}, kinds
    assert max(d for _, d in outcomes) < 20, "a request took too long"
    assert any(o == "ok" for o, _ in outcomes[after_restart:]), "not served after the restart"
