"""Replacing a file so that a crash leaves the old version or the new one, never half.

Key files, registries, state and outputs all need the same four steps, and each
missing one is a real failure: a temporary file in the *same directory* (so the rename
cannot cross filesystems), fsync of its data before the rename (or the rename can reach
the disk before the bytes), ``os.replace`` (atomic on POSIX), and fsync of the
directory (or the rename itself can be lost). ``mkstemp`` gives the temporary file a
unique name and mode 0600 from its first byte, so a secret is never readable by others
even for an instant, and two writers never share a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    temp_prefix: str | None = None,
) -> None:
    """Atomically make ``path`` hold ``data`` with permissions ``mode``.

    ``temp_prefix`` names the temporary file (default ``.<name>.``), for a directory
    whose owner recognises and cleans up its own leftovers.  Raises OSError (the
    caller words it); the temporary file is removed on any failure.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    prefix = f".{target.name}." if temp_prefix is None else temp_prefix
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a new, renamed or removed name) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
