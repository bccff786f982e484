"""Tokens reached over p11-kit's RPC (``p11-kit-client.so`` talking to ``p11-kit server``).

p11-kit-client connects to its server once, in ``C_Initialize``.  When nothing listens
at the socket it still initialises, shows no slots, and stays that way: the user would
see "no token matches" with no hint that a server is missing.  So before the client is
loaded, the socket it will use is checked, and a missing or dead server is named.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import unquote

from janus_hsm.errors import ModuleLoadError

SERVER_ENV = "P11_KIT_SERVER_ADDRESS"
CLIENT_MODULE = "p11-kit-client.so"
# A server that accepts but is slow to answer is the server's business; connecting
# to a local socket is instant or refused.
_CONNECT_TIMEOUT = 5.0


def is_remote_client(path: str) -> bool:
    """Whether ``path`` is p11-kit's RPC client module."""
    return Path(path).name == CLIENT_MODULE


def server_socket() -> Path | None:
    """The unix socket p11-kit-client will connect to, or None for other transports."""
    address = os.environ.get(SERVER_ENV, "")
    if not address:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return Path(runtime, "p11-kit", "pkcs11")
    if address.startswith("unix:"):
        for part in address.removeprefix("unix:").split(","):
            key, _, value = part.partition("=")
            if key == "path" and value:
                # p11-kit %-escapes bytes outside the unreserved set, as D-Bus does.
                return Path(unquote(value))
    return None


def check_server(module_path: str) -> None:
    """Refuse to load p11-kit-client when no p11-kit server listens at its socket."""
    path = server_socket()
    if path is None:  # vsock:, or a transport p11-kit adds later: its own errors apply
        return
    hint = (
        "start `p11-kit server --provider <module> -n <socket> pkcs11:token=<label>` and "
        f"set {SERVER_ENV}=unix:path=<socket> (for the project's test token: "
        "hardware/container/start-token-server.sh)"
    )
    if not path.exists():
        raise ModuleLoadError(f"{module_path}: no p11-kit server socket at {path}; {hint}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_CONNECT_TIMEOUT)
    try:
        probe.connect(str(path))
    except OSError as exc:
        raise ModuleLoadError(
            f"{module_path}: nothing answers at the p11-kit server socket {path} "
            f"({exc.strerror or type(exc).__name__}); {hint}"
        ) from None
    finally:
        probe.close()
