"""A throwaway PostgreSQL cluster for tests, demos and benchmarks.

The PostgreSQL ledger is tested against a real server, not a mock: Debian's
``postgresql`` package provides the binaries (``make test`` installs it), and this
module runs a private cluster from them in a temporary directory, on a free loopback
port, with ``fsync=on`` so timings and crash behaviour are those of a real server.

PostgreSQL refuses to run as root, so when the caller is root the cluster runs as the
``postgres`` system user that the Debian package creates (through ``runuser``).
Nothing here needs psycopg: readiness and database creation use the cluster's own
``pg_isready`` and ``psql``.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_SEARCH = "/usr/lib/postgresql/*/bin"
_NEEDED = ("initdb", "postgres", "pg_ctl", "pg_isready", "psql")
USER = "janus"  # the cluster's superuser (initdb -U), trusted on loopback


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing, or the cluster would not start."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/N/bin`` that has initdb, postgres and pg_ctl.

    ``JANUS_PG_BINDIR`` overrides the search (e.g. for a PostgreSQL built elsewhere).
    """
    override = os.environ.get("JANUS_PG_BINDIR")
    candidates = [override] if override else glob.glob(_SEARCH)

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)

    for candidate in sorted(candidates, key=version, reverse=True):
        bin_dir = Path(candidate)
        if all(os.access(bin_dir / tool, os.X_OK) for tool in _NEEDED):
            return bin_dir
    where = override or _SEARCH
    raise PostgresUnavailable(
        f"PostgreSQL server binaries ({', '.join(_NEEDED)}) not found in {where}: install"
        " Debian's postgresql package (`make test` does: SYSTEM_PACKAGES in the Makefile)"
    )


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies.

    So that a test run killed with SIGKILL (a CI timeout) does not leave a server
    behind: runuser passes the SIGTERM on to postgres, which shuts down.  The libc
    function is looked up here, before fork, not in the child.
    """
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


# Ports free_port() has handed out in this process.  The kernel picks a bind(0) port at
# random among ~14,000, so two calls in a row return the same one about 1 time in
# 20,000: a server given one port for clients and the same port for monitoring (or a
# cluster given nine) would then fail to start, now and then.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (start() retries on a race),
    and that no earlier call in this process returned."""
    with _handed_out_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


@dataclass
class PostgresCluster:
    """A running private cluster; ``stop()`` shuts it down and deletes its files."""

    root: Path
    bin_dir: Path
    port: int
    run_as: str | None  # a system user to run the server as (when we are root)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, dbname: str = "janus") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def _command(self, tool: str, *args: str, tool_dir: bool = True) -> list[str]:
        command = [str(self.bin_dir / tool) if tool_dir else tool, *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        return command

    def _run(self, tool: str, *args: str, timeout: float = 120, tool_dir: bool = True) -> None:
        """Run a PostgreSQL tool (or, tool_dir=False, a system command) as the server's user."""
        result = subprocess.run(
            self._command(tool, *args, tool_dir=tool_dir),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def psql(self, sql: str, dbname: str = "postgres") -> None:
        """Run one SQL command as the cluster's superuser."""
        self._run(
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            USER,
            "-d",
            dbname,
            "-c",
            sql,
        )

    def _start_server(self) -> None:
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                self._command(
                    "postgres",
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=100",
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test run is not the server's
                preexec_fn=_die_with_parent(),  # the fixture starts it from one thread
            )
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            ready = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    USER,
                ],
                check=False,
                timeout=10,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise PostgresUnavailable(
            f"postgres did not accept connections in 30 s:\n{self.log_tail()}"
        )

    def restart(self, *, attempts: int = 30) -> None:
        """Crash the server and start it again on the same port, with the same data.

        ``pg_ctl stop -m immediate`` ends it without a checkpoint and cuts in-flight
        transactions: a crash, as far as clients can tell, and the start runs crash
        recovery.  The old backends may hold the shared memory for a moment after the
        postmaster has gone, and a new one refuses to start until they have: retry.
        """
        process = self.process
        if process is None or process.poll() is not None:
            raise PostgresUnavailable("restart(): the server is not running")
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", timeout=60)
        process.wait(timeout=30)
        for attempt in range(attempts):
            try:
                self._start_server()
                return
            except PostgresUnavailable:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster's directory."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w")
                process.wait(timeout=30)
            except (PostgresUnavailable, subprocess.TimeoutExpired):
                process.kill()
                process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(dbname: str = "janus") -> PostgresCluster:
    """Create and start a private cluster with database ``dbname``; stop() it after.

    The cluster is also stopped at interpreter exit, so an aborted test run does not
    leave a server behind.
    """
    bin_dir = find_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="janus-pg-"))
    cluster = PostgresCluster(root=root, bin_dir=bin_dir, port=0, run_as=None)
    try:
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable(
                    "running as root, and there is no 'postgres' system user to run the"
                    " server as (Debian's postgresql package creates it)"
                ) from exc
            cluster.run_as = "postgres"
            os.chown(root, account.pw_uid, account.pw_gid)
        os.chmod(root, 0o700)
        # --no-sync: the cluster is thrown away; the server itself runs with fsync=on.
        cluster._run(
            "initdb",
            *("-D", str(cluster.data_dir), "-A", "trust", "-U", USER),
            *("-E", "UTF8", "--locale=C", "--no-sync"),
        )
        cluster._run("mkdir", "-m", "0700", str(cluster.socket_dir), tool_dir=False)
        for attempt in range(3):
            cluster.port = free_port()
            try:
                cluster._start_server()
                break
            except PostgresUnavailable:
                if attempt == 2 or "could not bind" not in cluster.log_tail():
                    raise
        atexit.register(cluster.stop)
        cluster.psql(f'CREATE DATABASE "{dbname}"')
        return cluster
    except BaseException:
        cluster.stop()
        raise
