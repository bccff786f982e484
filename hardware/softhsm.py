"""SoftHSM2 tokens in a directory of the project's own (never the machine's default).

A token lives in ``<state>/tokens`` and is described by ``<state>/softhsm2.conf``;
pointing ``SOFTHSM2_CONF`` at that file is all a process needs to see it.

Tokens are initialised through the module's own ``C_InitToken`` / ``C_InitPIN`` via
ctypes, in a child process, because the alternatives put PINs where they must not be:
``softhsm2-util --pin`` and ``pkcs11-tool --so-pin`` take them on argv, and
python-pkcs11 does not bind C_InitToken.  The PINs are generated here and written to
0600 files, which the URIs then reference with ``pin-source``.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from janus_hsm.backends.pkcs11.module import resolve_module_path

CKU_SO = 0
CKU_USER = 1
CKF_SERIAL_SESSION = 0x4
CKF_RW_SESSION = 0x2
CKR_USER_ALREADY_LOGGED_IN = 0x100


class SoftHSMError(RuntimeError):
    """Setting up a SoftHSM token failed."""


@dataclass(frozen=True)
class SoftHSMToken:
    """An initialised token and the files that describe it."""

    state_dir: Path
    label: str
    module_path: str

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "softhsm2.conf"

    @property
    def pin_file(self) -> Path:
        return self.state_dir / f"{self.label}.user.pin"

    @property
    def so_pin_file(self) -> Path:
        return self.state_dir / f"{self.label}.so.pin"

    def uri(self, **path: str) -> str:
        """A URI for the token (or, with object=…, a key on it) with its pin-source."""
        from janus_hsm.uri import Pkcs11Uri

        return str(
            Pkcs11Uri(
                {"token": self.label, **path},
                {"pin-source": f"file:{self.pin_file}", "module-path": self.module_path},
            )
        )

    def environ(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf_path)}

    def activate(self) -> None:
        """Point this process (before it loads the module) at the token's configuration."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf_path)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_config(state_dir: Path) -> Path:
    tokens = state_dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = state_dir / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf


def ensure_token(
    state_dir: Path | str,
    label: str = "janus",
    *,
    module_path: str | None = None,
    set_user_pin: bool = True,
) -> SoftHSMToken:
    """The token ``label`` in ``state_dir``, created with fresh random PINs if missing.

    ``set_user_pin=False`` leaves the new token without a user PIN (C_InitPIN never
    called), as a token fresh from its SO's initialisation is: the PIN file is still
    written, so a URI can name a PIN the token does not have.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    module = os.path.realpath(module_path or resolve_module_path(None))
    token = SoftHSMToken(state_dir, label, module)
    write_config(state_dir)
    if token.pin_file.exists() and _token_exists(token):
        return token
    so_pin = secrets.token_hex(8)
    user_pin = "".join(secrets.choice("0123456789") for _ in range(8))
    _write_private(token.so_pin_file, so_pin + "\n")
    _write_private(token.pin_file, user_pin + "\n")
    request = json.dumps(
        {
            "module": token.module_path,
            "label": label,
            "so_pin_file": str(token.so_pin_file),
            "pin_file": str(token.pin_file),
            "set_user_pin": set_user_pin,
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "hardware.softhsm", "--init-token"],
        input=request,
        capture_output=True,
        text=True,
        env=token.environ(),
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if result.returncode != 0:
        raise SoftHSMError(f"could not initialise SoftHSM token {label!r}: {result.stderr.strip()}")
    return token


def _token_exists(token: SoftHSMToken) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "hardware.softhsm", "--has-token", token.label, token.module_path],
        capture_output=True,
        text=True,
        env=token.environ(),
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return result.returncode == 0


class _CKTokenInfo(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char * 32), ("rest", ctypes.c_ubyte * 256)]


def _call(lib: ctypes.CDLL, name: str, *args: object) -> None:
    rv = getattr(lib, name)(*args)
    if rv not in (0, CKR_USER_ALREADY_LOGGED_IN):
        raise SoftHSMError(f"{name} failed with CKR 0x{rv:x}")


def _init_token_in_child(request: dict[str, Any]) -> None:
    lib = ctypes.CDLL(request["module"])
    for fn in ("C_GetSlotList", "C_InitToken", "C_OpenSession", "C_Login", "C_InitPIN"):
        getattr(lib, fn).restype = ctypes.c_ulong
    so_pin = Path(request["so_pin_file"]).read_text().strip().encode()
    user_pin = Path(request["pin_file"]).read_text().strip().encode()
    _call(lib, "C_Initialize", None)
    count = ctypes.c_ulong(0)
    _call(lib, "C_GetSlotList", ctypes.c_ubyte(0), None, ctypes.byref(count))
    slots = (ctypes.c_ulong * max(count.value, 1))()
    _call(lib, "C_GetSlotList", ctypes.c_ubyte(0), slots, ctypes.byref(count))
    free_slot = None
    for slot in slots[: count.value]:
        info = _CKTokenInfo()
        if lib.C_GetTokenInfo(ctypes.c_ulong(slot), ctypes.byref(info)) != 0:
            continue
        # CK_TOKEN_INFO: label[32], manufacturerID[32], model[16], serialNumber[16], flags.
        flags = int.from_bytes(bytes(info.rest)[64:72], sys.byteorder)
        if not flags & 0x400:  # CKF_TOKEN_INITIALIZED
            free_slot = slot
            break
    if free_slot is None:
        raise SoftHSMError("SoftHSM offers no free slot")
    label = request["label"].encode().ljust(32, b" ")
    _call(lib, "C_InitToken", ctypes.c_ulong(free_slot), so_pin, ctypes.c_ulong(len(so_pin)), label)
    # SoftHSM moves an initialised token to a new slot id: find it by label.
    _call(lib, "C_GetSlotList", ctypes.c_ubyte(1), slots, ctypes.byref(count))
    target = None
    for slot in slots[: count.value]:
        info = _CKTokenInfo()
        if lib.C_GetTokenInfo(ctypes.c_ulong(slot), ctypes.byref(info)) == 0 and (
            bytes(info.label) == label
        ):
            target = slot
    if target is None:
        raise SoftHSMError("initialised token not found")
    session = ctypes.c_ulong(0)
    _call(
        lib,
        "C_OpenSession",
        ctypes.c_ulong(target),
        ctypes.c_ulong(CKF_SERIAL_SESSION | CKF_RW_SESSION),
        None,
        None,
        ctypes.byref(session),
    )
    _call(lib, "C_Login", session, ctypes.c_ulong(CKU_SO), so_pin, ctypes.c_ulong(len(so_pin)))
    if request.get("set_user_pin", True):
        _call(lib, "C_InitPIN", session, user_pin, ctypes.c_ulong(len(user_pin)))
    lib.C_Logout(session)
    lib.C_CloseSession(session)
    lib.C_Finalize(None)


def _has_token(label: str, module: str) -> bool:
    import pkcs11

    try:
        pkcs11.lib(module).get_token(token_label=label)
        return True
    except (pkcs11.exceptions.NoSuchToken, pkcs11.exceptions.MultipleTokensReturned):
        return False


if __name__ == "__main__":
    if sys.argv[1:2] == ["--init-token"]:
        _init_token_in_child(json.loads(sys.stdin.read()))
    elif sys.argv[1:2] == ["--has-token"]:
        sys.exit(0 if _has_token(sys.argv[2], sys.argv[3]) else 1)
    else:
        sys.exit("usage: python -m hardware.softhsm --init-token | --has-token LABEL MODULE")
