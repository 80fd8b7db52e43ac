"""Writer locks: one process at a time writes a table (or a gallery), on a file system that can lock.

``flock`` on ``<location>.lock`` beside what is written (outside a Lance folder, which Lance owns). The kernel
drops the lock when its holder dies, ``kill -9`` included: a crashed writer never leaves anything locked. The
lock file names its holder (pid, host) for the message of a writer that waits or is refused.

Only a local (or POSIX-shared) file system can be locked this way; on object stores the caller must run one
writer at a time, a warning says so, and commits still refuse to add an id twice (``rrt_dist.store.features``).
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Another process holds the lock (``wait=False``)."""


@contextmanager
def writer_lock(location: str, what: str, wait: bool = True):
    """Hold the exclusive lock of ``location`` (``<location>.lock``) while the block writes ``what`` (named in
    messages). Another holder makes this wait (logged), or raise :class:`Busy` with ``wait=False``."""
    fs, path = fsspec.core.url_to_fs(location)
    if not isinstance(fs, LocalFileSystem):
        log.warning("%s: no lock on %s; run one writer at a time", what, type(fs).__name__)
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise Busy(f"{what} is being written by {holder}") from None
            log.warning("%s is being written by %s: waiting for it to finish", what, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
