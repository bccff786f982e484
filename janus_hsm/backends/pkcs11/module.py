"""Loading PKCS#11 modules, and the one lock per module that keeps SoftHSM alive.

python-pkcs11 initialises modules with ``C_Initialize(NULL)``, which tells SoftHSM (and
other modules) that the application is single-threaded: they then skip their own
locking, and concurrent calls crash the process.  So every call into a module goes
through :attr:`LoadedModule.lock`.  Parallelism comes from processes, each with its
own module instance and session.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11

from janus_hsm.errors import BackendError, ModuleLoadError, TokenLostError

from .remote import check_server, is_remote_client

MODULE_ENV = "JANUS_PKCS11_MODULE"

# Where distributions put SoftHSM2; the first that exists is the default module.
SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
# p11-kit's registrations (pkcs11.conf(5)), consulted first for module-name=….
P11_KIT_REGISTRIES = ("/etc/pkcs11/modules", "/usr/share/p11-kit/modules")
# p11-kit's module directories, searched for module-name=….
MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/local/lib/pkcs11",
)


def resolve_module_path(module_path: str | None, module_name: str | None = None) -> str:
    """URI module-path, else module-name, else $JANUS_PKCS11_MODULE, else local SoftHSM."""
    if module_path:
        return module_path
    if module_name:
        registered = _p11_kit_module(module_name)
        if registered:
            return registered
        for directory in MODULE_DIRS:
            for candidate in (f"{module_name}.so", f"lib{module_name}.so"):
                path = Path(directory, candidate)
                if path.exists():
                    return str(path)
        raise ModuleLoadError(
            f"no PKCS#11 module named {module_name!r} in {', '.join(MODULE_DIRS)}; "
            "give module-path=/absolute/path/to/module.so instead"
        )
    env = os.environ.get(MODULE_ENV)
    if env:
        return env
    for candidate in SOFTHSM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise ModuleLoadError(
        "no PKCS#11 module given and SoftHSM2 is not installed: add "
        f"module-path=/path/to/module.so to the URI or set {MODULE_ENV}"
    )


def _p11_kit_module(name: str) -> str | None:
    """The library a p11-kit registration (``<name>.module``) names, made absolute."""
    for directory in P11_KIT_REGISTRIES:
        registration = Path(directory, f"{name}.module")
        try:
            lines = registration.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key.strip() == "module" and value.strip():
                library = value.strip()
                if os.path.isabs(library):
                    return library
                for module_dir in MODULE_DIRS:
                    if Path(module_dir, library).exists():
                        return str(Path(module_dir, library))
    return None


@dataclass
class LoadedModule:
    """One PKCS#11 library in this process, with the lock all calls into it share."""

    path: str
    lib: Any
    pid: int = field(default_factory=os.getpid)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # Counts re-initialisations, so sessions opened before one know they are gone.
    generation: int = 0

    def reinitialize(self) -> None:
        """C_Finalize then C_Initialize: how a module reconnects to a device it lost.

        p11-kit-client, for one, connects to its server only in C_Initialize; after the
        server restarts, nothing but a fresh initialisation reaches it again.  Every
        session and object handle of the module is void afterwards.  Call with
        :attr:`lock` held.
        """
        with contextlib.suppress(pkcs11.PKCS11Error):
            self.lib.finalize()
        self.generation += 1
        try:
            self.lib.initialize()
        except pkcs11.PKCS11Error as exc:
            raise TokenLostError(
                f"cannot initialise the PKCS#11 module {self.path} again after losing its "
                f"device: {type(exc).__name__}"
            ) from None

    def check_process(self) -> None:
        """A module initialised in a parent process must not be used after fork()."""
        if os.getpid() != self.pid:
            raise BackendError(
                f"the PKCS#11 module {self.path} was initialised in another process; "
                "open the provider again in this process (PKCS#11 state does not survive fork)"
            )


_modules: dict[str, LoadedModule] = {}
_modules_lock = threading.Lock()


def load_module(path: str) -> LoadedModule:
    """Load (once per process) and initialise the module at ``path``."""
    if not os.path.isabs(path):
        raise ModuleLoadError(f"PKCS#11 module path must be absolute: {path!r}")
    # One library reached by two paths (symlinks, module-name vs module-path) must still
    # get one instance and one lock, or concurrent calls would reach it unserialised.
    path = os.path.realpath(path)
    with _modules_lock:
        loaded = _modules.get(path)
        if loaded is not None and loaded.pid == os.getpid():
            return loaded
        if not os.path.exists(path):
            raise ModuleLoadError(
                f"PKCS#11 module {path} does not exist; install the vendor's library or fix "
                f"module-path / {MODULE_ENV}"
            )
        if is_remote_client(path):
            check_server(path)
        try:
            lib = pkcs11.lib(path)
        except pkcs11.PKCS11Error as exc:
            raise ModuleLoadError(
                f"cannot load PKCS#11 module {path}: {exc}. Check that it is a PKCS#11 "
                "library for this architecture and that its configuration (e.g. "
                "SOFTHSM2_CONF) is readable"
            ) from None
        loaded = LoadedModule(path=path, lib=lib)
        _modules[path] = loaded
        return loaded
