"""An inter-process lock on an open file: ``fcntl.flock``, released by the kernel if the holder
dies (its descriptors close), so a killed process never leaves it held. Shared by the emulated
host link's timelines (:mod:`.host_link`) and ``bsp_shared``'s segment."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def flocked(fd: int) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``fd`` for the ``with`` block (blocks until it is free)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
