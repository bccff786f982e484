"""The p11-kit RPC front on a unix socket: stock PKCS#11 tools sign through the service.

Clients load p11-kit's ``p11-kit-client.so`` with ``P11_KIT_SERVER_ADDRESS=unix:path=…``.
Who a client is comes from the socket itself: the kernel's SO_PEERCRED uid of the peer,
mapped to a client did:key by the configuration's ``[p11kit] clients``; a uid that is not
mapped sees no slot at all. A PIN the client sends is ignored (the token PINs never leave
the engine). One thread serves one connection, so a slow or broken client holds up no
one else, and a malformed frame closes only its own connection.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from agent.hsm_service.config import ServiceConfig
from agent.hsm_service.engine import HsmEngine
from agent.hsm_service.errors import ConfigError
from agent.hsm_service.p11kit.codec import (
    FRAME_HEADER,
    PROTOCOL_VERSION_MAX,
    Writer,
    encode_frame,
    frame_lengths,
)
from agent.hsm_service.p11kit.dispatch import Connection
from agent.hsm_service.p11kit.errors import MalformedMessage

log = logging.getLogger(__name__)

# A client has this long to send its version byte; after that, idle connections are
# fine (a PKCS#11 application keeps its module loaded for as long as it likes).
HANDSHAKE_TIMEOUT = 10.0
# One thread per connection: a client that opens connections in a loop must not be able
# to exhaust the service's threads.
MAX_CONNECTIONS = 256
_PEERCRED = struct.Struct("3i")


class ClientMapping(Protocol):
    """One ``[p11kit] clients`` entry (config.P11KitClient)."""

    @property
    def uid(self) -> int: ...
    @property
    def client(self) -> str: ...


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel saw it connect."""
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


class P11KitServer:
    """A listening socket and the threads serving its connections."""

    def __init__(
        self,
        engine: HsmEngine,
        path: str | os.PathLike[str],
        clients: Iterable[ClientMapping],
        *,
        mode: int = 0o600,
        service_name: str = "janus-hsm",
    ) -> None:
        self.path = Path(path)
        self._engine = engine
        self._clients = {entry.uid: entry.client for entry in clients}
        self._mode = mode
        self._service_name = service_name
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = threading.Event()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._clear_stale_socket()
        self._listener = self._bind()
        self._accepting = threading.Thread(
            target=self._accept_loop, name="p11kit-accept", daemon=True
        )
        self._accepting.start()
        log.info("p11-kit RPC front listening on %s", self.path)

    def close(self) -> None:
        """Stop accepting, drop every connection, remove the socket file."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            open_connections = list(self._open)
            threads = list(self._threads)
        for connection in open_connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._accepting is not None:
            self._accepting.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()

    def __enter__(self) -> P11KitServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clear_stale_socket(self) -> None:
        """Remove a socket file left by a service that died; refuse to replace anything
        else, or a socket someone still listens on."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError("exists and is not a socket", source=str(self.path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            self.path.unlink()  # nobody listens: left behind by a service that died
        except OSError as error:
            raise ConfigError(
                f"cannot check the existing socket: {error.strerror or error}",
                source=str(self.path),
            ) from None
        else:
            raise ConfigError("another process listens on this socket", source=str(self.path))
        finally:
            probe.close()

    def _bind(self) -> socket.socket:
        """Bind in a private directory, set the mode, then move the socket into place, so
        there is no moment at which the socket exists with looser permissions."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".p11kit-", dir=self.path.parent))
        except OSError as error:
            listener.close()
            raise ConfigError(
                f"cannot create the socket: {error.strerror or error}", source=str(self.path)
            ) from None
        try:
            staged = staging / "s"
            listener.bind(str(staged))
            os.chmod(staged, self._mode)
            os.rename(staged, self.path)
            listener.listen(64)
        except OSError as error:
            listener.close()
            raise ConfigError(
                f"cannot listen: {error.strerror or error}", source=str(self.path)
            ) from None
        finally:
            with contextlib.suppress(OSError):
                staging.rmdir()
        return listener

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            thread = threading.Thread(
                target=self._serve, args=(connection,), name="p11kit-client", daemon=True
            )
            with self._lock:
                if self._closed.is_set():
                    connection.close()
                    return
                if len(self._open) >= MAX_CONNECTIONS:
                    log.warning("p11-kit connection refused: %d connections open", len(self._open))
                    connection.close()
                    continue
                self._open.add(connection)
                self._threads.add(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            uid = peer_uid(connection)
            client = self._clients.get(uid)
            if client is None:
                log.warning("p11-kit connection from uid %d, which no client is mapped to", uid)
            state = Connection(self._engine, client, service_name=self._service_name)
            try:
                self._converse(connection, state)
            finally:
                state.close()
        except MalformedMessage as error:
            log.warning("p11-kit connection dropped: %s", error)
        except OSError:
            pass  # the peer went away
        finally:
            connection.close()
            with self._lock:
                self._open.discard(connection)
                self._threads.discard(threading.current_thread())

    def _converse(self, connection: socket.socket, state: Connection) -> None:
        connection.settimeout(HANDSHAKE_TIMEOUT)
        # Buffered reads: a whole frame usually arrives in one recv, not three.
        stream = io.BufferedReader(socket.SocketIO(connection, "rb"), 1 << 16)
        try:
            version = _receive(stream, 1)
            if version is None:
                return
            connection.sendall(bytes((min(version[0], PROTOCOL_VERSION_MAX),)))
            connection.settimeout(None)
            while not self._closed.is_set():
                header = _receive(stream, FRAME_HEADER.size)
                if header is None:
                    return
                code, options_length, message_length = frame_lengths(header)
                if _receive(stream, options_length) is None:
                    raise MalformedMessage("connection closed inside a frame")
                message = _receive(stream, message_length)
                if message is None:
                    raise MalformedMessage("connection closed inside a frame")
                try:
                    response = state.handle(message)
                except MalformedMessage:
                    raise
                except Exception:  # a defect must cost one call, not the service
                    log.exception("p11-kit call failed")
                    response = Writer.error(0x5)  # CKR_GENERAL_ERROR
                connection.sendall(encode_frame(code, response))
        finally:
            stream.close()


def _receive(stream: io.BufferedReader[socket.SocketIO], count: int) -> bytes | None:
    """Exactly ``count`` bytes; None on a clean end of stream before the first byte."""
    if count == 0:
        return b""
    data = stream.read(count)
    if not data:
        return None
    if len(data) < count:
        raise MalformedMessage("connection closed inside a frame")
    return data


def serve_unix(
    engine: HsmEngine,
    path: str | os.PathLike[str],
    clients: ServiceConfig | Iterable[ClientMapping],
    *,
    mode: int = 0o600,
    service_name: str | None = None,
) -> P11KitServer:
    """Start the p11-kit RPC front on ``path`` and return it, already serving from
    background threads; ``close()`` stops it and removes the socket.

    ``clients`` is the service's configuration (its ``[p11kit] clients`` and service
    name are used) or the uid → client mapping itself."""
    if isinstance(clients, ServiceConfig):
        service_name = service_name or clients.service.name
        clients = clients.p11kit_clients
    server = P11KitServer(
        engine, path, clients, mode=mode, service_name=service_name or "janus-hsm"
    )
    server.start()
    return server
