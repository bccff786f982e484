"""How the CLI prints: JSON for scripts, short text for people, one line per error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import BadRequestError
from janus_hsm.atomic_file import replace_file


class CommandError(BadRequestError):
    """A usage problem the argument parser could not catch (bad file, bad subject…).

    A bad request made on the command line: one meaning, one code (``bad_request``).
    """


def touch_prompt(message: str) -> None:
    """Where a device's "touch your key" request goes: stderr, at once (stdout is data)."""
    print(message, file=sys.stderr, flush=True)


def common_options(
    *, json_output: bool = True, allow_extractable: str | None = None
) -> argparse.ArgumentParser:
    """A parent parser with ``--json`` and, given its help text, ``--allow-extractable``."""
    parser = argparse.ArgumentParser(add_help=False)
    if json_output:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    if allow_extractable is not None:
        parser.add_argument("--allow-extractable", action="store_true", help=allow_extractable)
    return parser


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def emit(obj: Any, text: str, *, as_json: bool) -> int:
    """Print ``obj`` as JSON for ``--json``, else ``text`` for people; exit status 0."""
    if as_json:
        print_json(obj)
    else:
        print(text)
    return 0


def emit_written(out: str | None, data: bytes, result: Any, *, as_json: bool) -> int:
    """Write ``data`` to ``--out`` if given; print ``result`` for ``--json``, else ``data``.

    Without ``--json`` nothing is printed when ``data`` went to a file.  Exit status 0.
    """
    if out:
        write_output(out, data)
    if as_json:
        print_json(result)
    elif not out:
        sys.stdout.write(data.decode())
    return 0


def report_invalid(exc: Exception, *, as_json: bool, **error: Any) -> int:
    """Say why something did not verify, as every failure is said; exit status 1.

    The same line as any failure (``janus: error: …``), and with ``--json`` the same
    error object plus ``"valid": false`` (``error`` adds fields to it, e.g. ``link``),
    so a script tells "did not verify" from "could not run" by the code alone.
    """
    emit_error(exc, as_json=as_json, verdict=True, **error)
    return 1


def emit_error(exc: Exception, *, as_json: bool, verdict: bool = False, **extra: Any) -> None:
    """The one way a failure is reported: one line on stderr, the error object on stdout
    for ``--json`` (with ``"valid": false`` when the command gives a verdict)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    code = getattr(exc, "code", "error")
    print(f"janus: error: {message}", file=sys.stderr)
    if as_json:
        document: dict[str, Any] = {
            "error": {"code": code, "type": type(exc).__name__, **extra, "message": message}
        }
        if verdict:
            document["valid"] = False
        print_json(document)


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
    try:
        replace_file(path, data, mode=mode)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
