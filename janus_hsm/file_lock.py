"""An exclusive lock on a file, across threads and processes: the one way Janus locks.

Keystores, approver registries and the record of used approvals are read, changed and
written back by separate processes (a grant waiting for a touch, a second grant, a
removal); without one lock across the read-modify-write, the later writer would
silently drop the earlier one's change.  ``flock`` on a descriptor of our own is
released by the kernel when the descriptor closes, even if the process dies, so a
crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def locked_file(
    path: str | os.PathLike[str], *, flags: int = 0, mode: int = 0o600
) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created ``mode`` if missing).

    Yields the descriptor (opened read-write, plus ``flags``, e.g. ``os.O_APPEND``) for
    a caller that keeps its data in the locked file itself.  A symbolic link is refused
    (``O_NOFOLLOW``): a lock file planted as a link must not make us open another file.
    Raises OSError (the caller words it); closing the descriptor releases the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | flags, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)
