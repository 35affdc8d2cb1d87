"""One writer at a time: an exclusive lock file held for the whole write.

A second `extract` of the same cache (another terminal, `make sweep`, another engine) waits for the
first instead of taking its partial file for a corrupt one; two stages adding rows to one results
table take turns at its read-modify-write, so neither loses the other's row. ``flock`` locks die
with their process, so a killed run never leaves a stale lock; the small ``.lock`` file itself stays
and is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path: Path, announce: bool = True):
    """Hold ``<path>.lock`` for the block; when another process holds it, wait (``announce``: say who)."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            say = log.warning if announce else log.debug
            say("waiting: %s is being written by %s; continuing when it is done", Path(path).name, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
