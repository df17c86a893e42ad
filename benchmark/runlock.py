"""The lock a run holds on its directory while it writes (``DIR/.lock``, through filelock).

A finished run removes the lock file, so none is left behind; a lock taken on a file that another
run removed meanwhile guards nothing, so it is taken again on the file now at the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from lesionbench.columns import LOCK
from lesionbench.errors import LesionbenchError


def _holds(lock: FileLock, path: Path) -> bool:
    """Whether the file ``lock`` holds is the one at ``path`` (not one a finishing run has just removed)."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    if fd is None:  # a filelock without this attribute: nothing to compare
        return True
    try:
        here, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def acquire(directory: Path) -> FileLock:
    """Take ``directory/.lock`` without waiting.

    :raises LesionbenchError: another run holds it, or runs keep starting and finishing there.
    """
    path = directory / LOCK
    for _attempt in range(5):
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise LesionbenchError(
                f"another lesionbench run is writing to {str(directory)!r} (it holds {LOCK}); wait for it to finish"
            ) from None
        if _holds(lock, path):
            return lock
        lock.release()
    raise LesionbenchError(
        f"could not lock {str(path)!r}: other runs keep starting and finishing in {str(directory)!r}"
    )


def release(lock: FileLock, directory: Path) -> None:
    """Remove ``directory/.lock`` while still holding it (see :func:`acquire`), then release it."""
    (directory / LOCK).unlink(missing_ok=True)
    lock.release()
