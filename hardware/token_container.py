"""SoftHSM2 in a container, reached through p11-kit's RPC: a token on the far side of a
process and namespace boundary, as a network HSM or a token on another machine is.

The image is built from Debian packages (``hardware/container/build-image.sh``); the
container runs ``p11-kit server`` in front of SoftHSM and puts its socket in a host
directory; the host loads ``p11-kit-client.so`` with ``P11_KIT_SERVER_ADDRESS`` pointing
there.  This module chooses the engine, writes the tokens' PINs, starts and stops the
container through compose, and waits until the host sees the tokens.  The test
fixtures (``tests/containers.py``), the benchmark and ``start-token-server.sh`` use it.

Engine: podman with podman-compose (daemonless; configured by
``hardware/container/containers.conf``), else Docker when its daemon answers.
``JANUS_CONTAINER_ENGINE=podman|docker`` forces one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hardware.softhsm import SoftHSMToken

HERE = Path(__file__).resolve().parent / "container"
ROOT = HERE.parent.parent
COMPOSE_FILE = HERE / "compose.yaml"
CONTAINERS_CONF = HERE / "containers.conf"
BUILD_SCRIPT = HERE / "build-image.sh"
IMAGE = "localhost/janus-softhsm:latest"
SERVICE = "softhsm"
ROLE_LABEL = "org.janus.role=softhsm-test"
# p11-kit built from Debian's source (build-p11-kit.sh): bookworm's 0.24 cannot carry
# ECDH over its RPC.  The host loads this client; the image runs this build's server.
P11_KIT_VERSION = "0.25.5"
P11_KIT_PREFIX = ROOT / ".state" / f"p11-kit-{P11_KIT_VERSION}"
P11_KIT_BUILD_SCRIPT = HERE / "build-p11-kit.sh"
# Every engine command is bounded: a wedged engine fails the caller, it does not hang it.
_COMMAND_TIMEOUT = 120.0
# Building p11-kit and the image from scratch takes one to three minutes on two cores.
_BUILD_TIMEOUT = 600.0


class ContainerUnavailable(RuntimeError):
    """No usable container engine (or p11-kit client) here; the message names what."""


class ContainerError(RuntimeError):
    """The engine is there but starting, stopping or reaching the container failed."""


def client_module() -> str:
    """The p11-kit-client.so built by build-p11-kit.sh (the image build makes it)."""
    client = P11_KIT_PREFIX / "lib" / "pkcs11" / "p11-kit-client.so"
    if not client.exists():
        raise ContainerUnavailable(
            f"p11-kit {P11_KIT_VERSION} is not built at {P11_KIT_PREFIX} "
            "(`make container-image` builds it)"
        )
    return str(client)


@dataclass(frozen=True)
class Engine:
    """A container engine and the compose program that drives it."""

    name: str
    compose: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def environ(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **dict(self.env), **extra}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([self.name, *args], self.environ(), check=check)


def _run(
    argv: list[str],
    env: dict[str, str],
    *,
    check: bool,
    timeout: float = _COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ContainerError(f"`{shlex.join(argv)}` took more than {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ContainerError(f"`{shlex.join(argv)}` failed: {' | '.join(detail)}")
    return result


def _podman_compose() -> str | None:
    # pip puts it next to the interpreter; the venv's bin need not be on PATH.
    beside = Path(sys.executable).parent / "podman-compose"
    return str(beside) if beside.exists() else shutil.which("podman-compose")


def find_engine() -> Engine:
    """podman + podman-compose, else a Docker daemon + compose; or say what is missing."""
    forced = os.environ.get("JANUS_CONTAINER_ENGINE", "")
    missing: list[str] = []
    if forced in ("", "podman"):
        compose = _podman_compose()
        if shutil.which("podman") is None:
            missing.append("podman (`make system` installs podman and runc)")
        elif compose is None:
            missing.append("podman-compose (a dev dependency: `make venv`)")
        else:
            engine = Engine("podman", (compose,), (("CONTAINERS_CONF", str(CONTAINERS_CONF)),))
            info = _run(["podman", "info"], engine.environ(), check=False)
            if info.returncode == 0:
                return engine
            last = (info.stderr.strip().splitlines() or ["no output"])[-1]
            missing.append(f"a working podman (`podman info` fails: {last})")
    if forced in ("", "docker"):
        if shutil.which("docker") is None:
            missing.append("docker")
        elif _run(["docker", "info"], dict(os.environ), check=False).returncode != 0:
            missing.append("a running Docker daemon (`docker info` fails)")
        elif _run(["docker", "compose", "version"], dict(os.environ), check=False).returncode == 0:
            return Engine("docker", ("docker", "compose"))
        elif shutil.which("docker-compose"):
            return Engine("docker", ("docker-compose",))
        else:
            missing.append("docker compose")
    raise ContainerUnavailable("no usable container engine: needs " + "; or ".join(missing))


def ensure_image(engine: Engine) -> None:
    """Build the image unless it is there and current (the script is idempotent)."""
    present = (
        engine.run(
            "image", "exists" if engine.name == "podman" else "inspect", IMAGE, check=False
        ).returncode
        == 0
    )
    if not present and shutil.which("mmdebstrap") is None:
        raise ContainerUnavailable(
            f"no image {IMAGE} and no mmdebstrap to build it (`make container-image`)"
        )
    built = (P11_KIT_PREFIX / ".janus-stamp").exists()
    if not built and not (shutil.which("meson") and shutil.which("ninja")):
        raise ContainerUnavailable(
            f"p11-kit {P11_KIT_VERSION} is not built and meson/ninja are missing to build it"
            " (`make container-image`)"
        )
    _run(
        ["bash", str(BUILD_SCRIPT), "--engine", engine.name],
        engine.environ(),
        check=True,
        timeout=_BUILD_TIMEOUT,
    )
    client_module()


def remove_leftovers(engine: Engine) -> list[str]:
    """Remove test containers whose owning process died without cleaning up (SIGKILL)."""
    listed = engine.run(
        "ps",
        "-a",
        "--filter",
        f"label={ROLE_LABEL}",
        "--format",
        '{{.ID}} {{ index .Labels "org.janus.owner-pid" }}',
        check=False,
    )
    removed = []
    for line in listed.stdout.splitlines():
        container, _, owner = line.partition(" ")
        if owner.strip().isdigit() and int(owner) > 0 and not _alive(int(owner)):
            engine.run("rm", "-f", container, check=False)
            removed.append(container)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RemoteToken(SoftHSMToken):
    """A token in the container, seen through p11-kit-client; PIN files on the host."""

    address: str = ""

    def environ(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": self.address}


@dataclass
class TokenContainer:
    """One container serving ``labels`` over the socket in ``state_dir/run``."""

    engine: Engine
    state_dir: Path
    labels: tuple[str, ...]
    project: str
    owner_pid: int = 0

    @classmethod
    def for_state_dir(
        cls, engine: Engine, state_dir: Path, labels: tuple[str, ...], *, owned: bool
    ) -> TokenContainer:
        state_dir = state_dir.resolve()
        digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]
        return cls(
            engine, state_dir, labels, f"janus-softhsm-{digest}", os.getpid() if owned else 0
        )

    @property
    def socket(self) -> Path:
        return self.state_dir / "run" / "p11kit.sock"

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def pin_dir(self) -> Path:
        return self.state_dir / "pins"

    def compose_env(self) -> dict[str, str]:
        return {
            "JANUS_P11_DIR": str(self.state_dir),
            "JANUS_TOKENS": " ".join(self.labels),
            "JANUS_SOFTHSM_IMAGE": IMAGE,
            "JANUS_OWNER_PID": str(self.owner_pid),
        }

    def compose_shell(self) -> str:
        """The compose command as one shell string, for pytest-docker's executor."""
        env = {**dict(self.engine.env), **self.compose_env()}
        assignments = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
        return " ".join(["env", *assignments, shlex.join(self.engine.compose)])

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.engine.compose, "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        return _run(argv, self.engine.environ(**self.compose_env()), check=True)

    def prepare(self) -> None:
        """The socket directory and one SO and user PIN file (0600) per token."""
        (self.state_dir / "run").mkdir(parents=True, exist_ok=True)
        self.pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for label in self.labels:
            for kind, pin in (("so", secrets.token_hex(8)), ("user", _digits(8))):
                path = self.pin_dir / f"{label}.{kind}.pin"
                if not path.exists():
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(pin + "\n")

    def token(self, label: str) -> RemoteToken:
        return RemoteToken(self.pin_dir, label, os.path.realpath(client_module()), self.address)

    def up(self, timeout: float = 60.0) -> None:
        self.prepare()
        self.compose("up", "-d")
        self.wait_ready(timeout)

    def down(self) -> None:
        self.compose("down", "-v", "-t", "5")

    def stop(self) -> None:
        self.compose("stop", SERVICE)

    def start(self, timeout: float = 60.0) -> None:
        self.compose("start", SERVICE)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds until every token is visible on the host through p11-kit-client."""
        started = time.monotonic()
        pending = list(self.labels)
        while pending:
            if self.socket.exists() and self._host_sees(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() - started > timeout:
                logs = self.compose("logs", SERVICE).stdout.strip().splitlines()[-5:]
                raise ContainerError(
                    f"token {pending[0]!r} not visible through {self.socket} after "
                    f"{timeout:.0f} s; container log: {' | '.join(logs) or '(empty)'}"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def _host_sees(self, label: str) -> bool:
        # In a child process: p11-kit-client connects once, in C_Initialize, so polling
        # from this process would leave it initialised against a server not yet there.
        argv = [sys.executable, "-m", "hardware.softhsm", "--has-token", label, client_module()]
        env = {**os.environ, "P11_KIT_SERVER_ADDRESS": self.address}
        try:
            result = subprocess.run(
                argv, env=env, capture_output=True, timeout=30, check=False, cwd=ROOT
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0


def _digits(n: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(n))


def _main(argv: list[str]) -> int:
    """``up DIR`` / ``down DIR``: the container for use outside the test suite."""
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m hardware.token_container up|down STATE_DIR", file=sys.stderr)
        return 2
    try:
        engine = find_engine()
        container = TokenContainer.for_state_dir(
            engine, Path(argv[1]), ("janus-test",), owned=False
        )
        if argv[0] == "down":
            container.down()
            return 0
        container.up()
    except (ContainerUnavailable, ContainerError) as exc:
        print(f"janus: error: {exc}", file=sys.stderr)
        return 1
    token = container.token("janus-test")
    print(f"export P11_KIT_SERVER_ADDRESS={shlex.quote(container.address)}")
    print(f"# token URI: {token.uri()}")
    print(f"# stop it:   hardware/container/start-token-server.sh --down {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
