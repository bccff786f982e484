"""How the CLI prints: JSON for scripts, short text for people, one line per error."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


class CommandError(Exception):
    """A usage problem the argument parser could not catch (bad file, bad subject…)."""

    code = "bad_request"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def emit_error(exc: Exception, *, as_json: bool) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    code = getattr(exc, "code", "error")
    print(f"janus: error: {message}", file=sys.stderr)
    if as_json:
        print_json({"error": {"code": code, "type": type(exc).__name__, "message": message}})


def read_input(path: str) -> bytes:
    """Read FILE, or stdin for '-'."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def write_output(path: str, data: bytes, *, mode: int = 0o644) -> None:
    """Write FILE atomically (temp file, fsync, rename) so a crash leaves no half file."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
