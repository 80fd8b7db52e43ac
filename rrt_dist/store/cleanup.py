"""The one place that deletes a table's files: what an interrupted writer left."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import fsspec

from .versions import open_table


def remove_uncommitted(uri: str | Path) -> str | None:
    """Clean up what an interrupted writer left: a folder with no committed version is removed; data
    files no version references (fragments written but never committed) are deleted. A local path or a
    URI (through fsspec, e.g. ``s3://``). Only the one process that writes the table may call this.
    Returns what was done, or None."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    if not fs.exists(path):
        return None
    ds = open_table(uri)
    if ds is None:
        fs.rm(path, recursive=True)
        return f"removed {uri}: no committed version (a run stopped before its first commit)"
    data = f"{path.rstrip('/')}/data"
    referenced = {Path(f.path).name for fragment in ds.get_fragments() for f in fragment.data_files()}
    on_disk = {Path(p).name for p in fs.ls(data, detail=False)} if fs.isdir(data) else set()
    if on_disk <= referenced:
        return None
    # Every version stays (readers may pin one); only files no version references are removed.
    # (Files of older versions, e.g. before a compaction, are not in the latest one either: then nothing goes.)
    stats = ds.cleanup_old_versions(older_than=timedelta(days=36500), delete_unverified=True)
    if not stats.data_files_removed:
        return None
    return f"removed {stats.data_files_removed} uncommitted fragment file(s) from {uri}"
