"""Where PINs come from: a pin-source file, the JANUS_PIN variable, or a prompt.

Never from argv (visible to every user via /proc) and never a default: a default PIN
silently burns the token's retry counter.  The PIN is returned to the backend and not
kept here, except for a prompted PIN, which is the only one that cannot be read again
when a dropped session has to log in anew.
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from janus_hsm.errors import PinUnavailableError, UriError

PIN_ENV = "JANUS_PIN"
MAX_PIN_FILE = 1024

log = logging.getLogger(__name__)

PinSource = Callable[[], str]


def pin_source_path(source: str) -> Path:
    """RFC 7512 says pin-source is a URI; accept ``file:`` URIs and absolute paths."""
    # The value is not repeated: a PIN typed here by mistake must not reach a log.
    unsupported = UriError(
        "this pin-source is not supported: give file:/absolute/path or an absolute path"
    )
    if source.startswith("/"):
        path = source
    else:
        try:
            parts = urlsplit(source)
        except ValueError:
            raise unsupported from None
        if not (
            parts.scheme == "file"
            and parts.netloc in ("", "localhost")
            and parts.path
            and not parts.query
            and not parts.fragment
        ):
            raise unsupported
        path = unquote(parts.path)
    if "\x00" in path or not path.startswith("/"):
        raise unsupported
    return Path(path)


def read_pin_file(path: Path) -> str:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise PinUnavailableError(f"pin-source {path} is not a regular file")
        if info.st_size > MAX_PIN_FILE:
            raise PinUnavailableError(f"pin-source {path} is too large to be a PIN file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("PIN file %s is readable by other users; chmod 600 it", path)
        data = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PinUnavailableError(f"cannot read pin-source {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PinUnavailableError(f"pin-source {path} is not UTF-8 text") from None
    pin = data.rstrip("\r\n")
    if not pin:
        raise PinUnavailableError(f"pin-source {path} is empty")
    return pin


def resolve_pin_source(
    uri_pin_source: str | None, *, prompt: str, interactive: bool | None = None
) -> PinSource:
    """Pick the PIN source by precedence: URI pin-source, then JANUS_PIN, then a prompt.

    Returns a callable so the PIN is only read when a login actually happens.
    """
    if uri_pin_source:
        path = pin_source_path(uri_pin_source)
        return lambda: read_pin_file(path)
    if os.environ.get(PIN_ENV):
        return _from_environment
    if interactive is None:
        interactive = sys.stdin.isatty()
    if interactive:
        cached: list[str] = []

        def ask() -> str:
            if not cached:
                pin = getpass.getpass(prompt)
                if not pin:
                    raise PinUnavailableError("no PIN entered")
                cached.append(pin)
            return cached[0]

        return ask
    return _unavailable


def _from_environment() -> str:
    pin = os.environ.get(PIN_ENV, "")
    if not pin:
        raise PinUnavailableError(f"{PIN_ENV} is empty")
    try:
        pin.encode("utf-8")  # undecodable bytes come as surrogates: refuse, never echo
    except UnicodeEncodeError:
        raise PinUnavailableError(f"{PIN_ENV} is not UTF-8 text") from None
    return pin


def _unavailable() -> str:
    raise PinUnavailableError(
        "this key needs a PIN and none was given: add pin-source=file:/path to the URI, "
        f"set {PIN_ENV}, or run on a terminal to be prompted (PINs are never taken from argv)"
    )
