"""The one place that deletes a table's files. Two kinds go, nothing else, and never a folder:

- data files no version references (fragments a writer wrote and never committed: a run killed between writing
  and committing), once older than a grace period: a younger one may be another writer's, written and about to be
  committed (a store where the writer lock cannot hold, a writer on another machine);
- versions older than the last ``keep`` and the files only they reference, by Lance's own cleanup (which keeps
  files it cannot place younger than 7 days, and tagged versions): after a compaction, the files of the versions
  before it.
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import fsspec

from .versions import open_table

UNCOMMITTED_GRACE_S = 3600.0        # rrt_dist.schema.ExtractSettings.uncommitted_grace_s
KEEP_VERSIONS = 3                   # rrt_dist.schema.ExtractSettings.keep_versions


def _age_s(fs, name: str, now: float) -> float:
    modified = fs.modified(name)        # datetime (local: naive local time; object stores: aware UTC)
    return now - (modified.timestamp() if isinstance(modified, datetime) else float(modified))


def remove_uncommitted(uri: str | Path, grace_s: float = UNCOMMITTED_GRACE_S) -> str | None:
    """Delete the data files of a table (local path or fsspec URI) that no version references and that are older
    than ``grace_s`` seconds: what writers killed before their commit left. A table folder with no committed
    version keeps its folder; its files go by the same rule. Returns what was done, or None."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    data = f"{path.rstrip('/')}/data"
    if not fs.isdir(data):
        return None
    ds = open_table(uri)
    referenced = set() if ds is None else {
        Path(f["path"]).name for f in ds.tracked_files().read_all().to_pylist() if f["type"] == "data file"}
    now = time.time()
    unreferenced = [name for name in fs.ls(data, detail=False) if Path(name).name not in referenced]
    stale = [name for name in unreferenced if _age_s(fs, name, now) >= grace_s]
    for name in stale:
        fs.rm_file(name)
    if not stale:
        return None
    young = len(unreferenced) - len(stale)
    return (f"removed {len(stale)} uncommitted fragment file(s) from {uri}"
            + (" (no version committed yet)" if ds is None else "")
            + (f"; {young} younger than {grace_s:g} s kept (another writer's, maybe)" if young else ""))


def remove_old_versions(uri: str | Path, keep: int = KEEP_VERSIONS) -> str | None:
    """Delete the versions of a table older than its last ``keep`` and the files only they reference (tagged
    versions are kept: a reader that must keep one tags it). Returns what was done, or None."""
    ds = open_table(uri, verify=False)
    if ds is None:
        return None
    stats = ds.cleanup_old_versions(retain_versions=keep, error_if_tagged_old_versions=False)
    if not stats.old_versions:
        return None
    return (f"removed {stats.old_versions} old version(s) of {uri} ({stats.data_files_removed} data file(s), "
            f"{stats.bytes_removed / 2**20:.1f} MiB); the last {keep} kept")
