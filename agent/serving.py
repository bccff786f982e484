"""Listening, then serving an app with uvicorn and saying so once it serves.

A server that announced itself and then could not serve (a busy port) misleads whoever
started it: the socket listens before the announcement, and the announcement is made
once the application has started, by uvicorn's own started state.  The cloud agent and
the directory start this way.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from agent.errors import AddressInUseError, ConfigurationError

BACKLOG = 2048  # uvicorn's default


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigurationError(f"cannot listen on {host!r:.120}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart need not wait for the old connections' TIME_WAIT.
        # (It does not let two servers listen on one port.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(
                f"cannot listen on {host}:{port}: port {port} is already in use"
            ) from None
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, calling back once it listens and the application started."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_listening()


def serve(
    app: Any,
    sock: socket.socket,
    *,
    log_level: str,
    on_listening: Callable[[str, int], None],
) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM; ``on_listening(url, pid)`` once up."""
    config = uvicorn.Config(app, log_level=log_level, access_log=False)
    server = _Server(config, lambda: on_listening(url_of(sock), os.getpid()))
    # After its graceful shutdown uvicorn restores the handlers it found and raises the
    # signal again; with the default handlers SIGTERM would then kill the process before
    # the agent closes its stores.  These handlers make it a normal return instead.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    except _Stopped:
        pass  # stopped as asked: a success
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


class _Stopped(Exception):
    """SIGINT or SIGTERM, raised again by uvicorn once it has shut down."""


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped
