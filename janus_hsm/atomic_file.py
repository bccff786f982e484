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


def replace_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Atomically make ``path`` hold ``data`` with permissions ``mode``.

    Raises OSError (the caller words it); the temporary file is removed on any failure.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
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
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
