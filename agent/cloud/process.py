"""Start a real cloud-agent process on 127.0.0.1: for the demo, tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProcess:
    """An HTTP server started as a subprocess, logging to a file, ready once /healthz is 200.

    Shared by the cloud agent below and the benchmarks' bare comparison server, so both
    are started, awaited and stopped the same way.  With ``port=None`` the server picks
    a free port itself and announces its URL as a JSON line ``{"url": …}`` in its
    output (``janus cloud serve --port 0 --json``): no other process can take the port
    between choosing it and binding it.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        port: int | None,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or 0
        self.url = f"http://127.0.0.1:{port}" if port else ""
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log_path.name}: the server exited: {self.output()}")
            if not self.url and not self._announced():
                time.sleep(0.05)
                continue
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.log_path.name}: the server did not start: {self.output()}")

    def _announced(self) -> bool:
        """Take the URL from the server's announcement, once it has printed it."""
        self.log.flush()
        for line in self.log_path.read_text(errors="replace")[:4000].splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    url = str(json.loads(line)["url"])
                    self.url, self.port = url, int(url.rsplit(":", 1)[1])
                    return True
        return False

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class CloudProcess(ServerProcess):
    """``janus cloud serve`` on 127.0.0.1, for the demo, tests and benchmarks."""

    def __init__(
        self,
        state_dir: Path,
        *,
        owner: str | None,
        ledger: str | None = None,
        port: int | None = None,
        api_token_file: Path | None = None,
        body_timeout: float | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        passphrase = state_dir / "passphrase"
        if not passphrase.exists():
            fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        args = [
            sys.executable,
            "-m",
            "agent",
            "cloud",
            "serve",
            "--state-dir",
            str(state_dir),
            "--port",
            str(port or 0),
            "--json",  # announces the URL, with the port it bound
            "--passphrase-file",
            str(passphrase),
        ]
        if owner:
            args += ["--owner", owner]
        if ledger:
            args += ["--ledger", ledger]
        if api_token_file:
            args += ["--api-token-file", str(api_token_file)]
        args += extra_args or []  # e.g. --receiving, --sending
        if body_timeout is not None:
            args += ["--body-timeout", str(body_timeout)]
        env = {k: v for k, v in os.environ.items() if k != "JANUS_PIN"}
        log_path = state_dir / f"server-{port or secrets.token_hex(4)}.log"
        super().__init__(args, port=port, log_path=log_path, env=env)
