"""Writer locks: one process at a time writes a table (or a gallery), on a file system that can lock.

``flock`` on ``<location>.lock`` beside what is written (outside a Lance folder, which Lance owns). The kernel
drops the lock when its holder dies, ``kill -9`` included: a crashed writer never leaves anything locked. The
lock file names its holder (pid, host) for the message of a writer that waits or is refused.

Only a local (or POSIX-shared) file system can be locked this way; on object stores the caller must run one
writer at a time, a warning says so, and commits still refuse to add an id twice (``rrt_dist.store.versions``).
The same holds on a mount where ``flock`` succeeds but excludes nobody on another machine (NFS mounted ``nolock``
or ``local_lock=flock|all``, CIFS ``nobrl``, FUSE mounts such as s3fs, gcsfuse or mountpoint-s3): read from
``/proc/mounts``, it is named in a warning, once per mount and process.
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


MOUNTS = "/proc/mounts"
_warned: set[str] = set()


def mount_of(path: str, mounts: str) -> tuple[str, str, list[str]] | None:
    """``(mount point, file system type, options)`` of the mount holding ``path`` (absolute, symlinks resolved):
    the longest mount point of ``mounts`` (``/proc/mounts``' text) that contains it."""
    best = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")                # /proc/mounts writes a space as \040
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fields[2], fields[3].split(","))
    return best


def unshared_locks(fstype: str, options: list[str]) -> str | None:
    """Why ``flock`` on a mount of this type and options excludes no process on another machine, or None."""
    if fstype.startswith("fuse.") or fstype == "fuse":
        return f"a FUSE mount ({fstype}): the kernel keeps its flock locks on this machine"
    if fstype.startswith("nfs"):
        if "nolock" in options:
            return f"{fstype} mounted nolock"
        local = next((o.split("=", 1)[1] for o in options if o.startswith("local_lock=")), "none")
        if local in ("flock", "all"):
            return f"{fstype} mounted local_lock={local}: flock locks stay on this machine"
    if fstype in ("cifs", "smb3") and "nobrl" in options:
        return f"{fstype} mounted nobrl"
    return None


def warn_if_unshared(path: str, what: str) -> None:
    """Warn (once per mount) when ``path`` lies on a mount where ``flock`` excludes no writer on another machine."""
    try:
        with open(MOUNTS) as f:
            mount = mount_of(os.path.realpath(path), f.read())
    except OSError:                                    # not Linux: nothing to read
        return
    reason = mount and unshared_locks(mount[1], mount[2])
    if not reason or mount[0] in _warned:
        return
    _warned.add(mount[0])
    log.warning("%s: %s is on %s, %s; a writer on another machine is not kept out: run one writer at a time there "
                "(one ingest per gallery, one extraction per table), or keep storage_root on a file system whose "
                "locks are shared (NFS with locking, a local disk)", what, path, mount[0], reason)


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
    warn_if_unshared(os.path.dirname(path) or ".", what)
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
