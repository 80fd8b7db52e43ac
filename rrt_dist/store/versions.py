"""Versions of a feature table: writing fragments, committing them, and finding and recovering what a version
needs.

Distributed writers write Lance fragments (:func:`write_fragment`); one process commits them
(:func:`commit_fragments`), so a row becomes visible atomically with its Lance version and a killed job leaves
no partial rows. Files are deleted only by :mod:`rrt_dist.store.cleanup`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import lance
import numpy as np
import pyarrow as pa

from rrt_dist.schema import DamagedTable, UnreadableTable

from .features import check_schema


def write_fragment(uri: str | Path, table: pa.Table) -> list:
    """Write rows as uncommitted Lance fragments (safe from any worker); returns their metadata."""
    from lance.fragment import write_fragments

    return write_fragments(table, str(uri), schema=table.schema)


def manifest_versions(uri: str | Path) -> dict[int, str]:
    """The versions a table's ``_versions`` folder holds a manifest for: version -> file path (Lance names them
    ``<n>.manifest``, or ``<2**64 - 1 - n>.manifest`` in its newer scheme)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    folder = f"{path.rstrip('/')}/_versions"
    if not fs.isdir(folder):
        return {}
    out = {}
    for name in fs.ls(folder, detail=False):
        stem = name.rstrip("/").rsplit("/", 1)[-1]
        if stem.endswith(".manifest") and stem[:-len(".manifest")].isdigit():
            number = int(stem[:-len(".manifest")])
            out[2**64 - 1 - number if number >= 2**63 else number] = name
    return out


def open_table(uri: str | Path, verify: bool = True) -> lance.LanceDataset | None:
    """The latest committed version of a table, or None when there is none: no folder, or a folder with no
    version manifest at all (the fragments of a run killed before its first commit). A table with a version
    that cannot be read raises :class:`UnreadableTable` naming its last readable version: it is never taken for
    an empty table (which callers would remove or overwrite). ``verify``: a version whose data files are not all
    there raises :class:`DamagedTable` (:func:`check_whole`); a writer checking for new commits skips that."""
    versions = manifest_versions(uri)
    if not versions:
        return None
    try:
        ds = lance.dataset(str(uri))
    except (ValueError, OSError) as err:
        readable = last_readable_version(uri, versions)
        raise UnreadableTable(
            f"{uri}: its newest version ({max(versions)}) cannot be read ({str(err).split(', /')[0]}); "
            + (f"the last readable version is {readable}: `rrt-dist restore-table {uri}` sets the table back to it "
               f"(the unreadable manifests are kept beside, renamed)" if readable else "no version of it can be read")
            + "; nothing was removed") from None
    if verify:
        check_whole(uri, ds)
    return ds


def last_readable_version(uri: str | Path, versions: dict[int, str] | None = None) -> int | None:
    for version in sorted(versions or manifest_versions(uri), reverse=True):
        try:
            lance.dataset(str(uri), version=version)
            return version
        except (ValueError, OSError):
            continue
    return None


def stored_files(uri: str | Path) -> dict[str, int]:
    """``data/<name>`` and ``_deletions/<name>`` -> size in bytes, of the files a table's folder holds now (one
    listing of each folder)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    out = {}
    for folder in ("data", "_deletions"):
        where = f"{path.rstrip('/')}/{folder}"
        if fs.isdir(where):
            out.update({f"{folder}/{entry['name'].rstrip('/').rsplit('/', 1)[-1]}": entry.get("size")
                        for entry in fs.ls(where, detail=True)})
    return out


def lacks(ds: lance.LanceDataset, stored: dict[str, int]) -> dict[int, list[str]]:
    """What version ``ds`` names and ``stored`` (:func:`stored_files`) lacks, by fragment id: each data file that
    is missing or not of the size the manifest records (Lance records every file's size), each deletion file
    missing. Names and sizes only: no file is opened."""
    out: dict[int, list[str]] = {}
    for fragment in ds.get_fragments():
        problems = []
        for f in fragment.data_files():
            name, size = f"data/{f.path}", f.file_size_bytes
            if name not in stored:
                problems.append(f"{name} is missing")
            elif size and stored[name] is not None and stored[name] != size:
                problems.append(f"{name} is {stored[name]} bytes, its manifest says {size}")
        deletions = fragment.metadata.deletion_file
        if deletions is not None and deletions.path(fragment.fragment_id) not in stored:
            problems.append(f"{deletions.path(fragment.fragment_id)} is missing")
        if problems:
            out[fragment.fragment_id] = problems
    return out


def newest_whole_version(uri: str | Path, below: int, stored: dict[str, int]) -> lance.LanceDataset | None:
    """The newest version before ``below`` whose manifest reads and whose files are all in ``stored``."""
    for version in sorted((v for v in manifest_versions(uri) if v < below), reverse=True):
        try:
            ds = lance.dataset(str(uri), version=version)
        except (ValueError, OSError):
            continue
        if not lacks(ds, stored):
            return ds
    return None


def check_whole(uri: str | Path, ds: lance.LanceDataset) -> None:
    """Raise :class:`DamagedTable` when version ``ds`` of table ``uri`` names a data file that is missing or of
    another size than its manifest records: the message names the table, the files, and what
    ``rrt-dist restore-table`` would set it back to."""
    stored = stored_files(uri)
    broken = lacks(ds, stored)
    if not broken:
        return
    problems = [p for fragment in broken.values() for p in fragment]
    whole = newest_whole_version(uri, ds.version, stored)
    fix = (f"`rrt-dist restore-table {uri}` sets it back to version {whole.version}, the newest whose files are all "
           f"there" if whole is not None else
           f"`rrt-dist restore-table {uri}` keeps its other rows (no earlier version is whole)")
    raise DamagedTable(f"{uri}: version {ds.version} is damaged: {'; '.join(problems[:3])}"
                       + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                       + f"; {fix}, and the same command then extracts again what it lacks")


@dataclass
class Restoration:
    """What :func:`restore` did to a table: the manifests it set aside (unreadable), its version now, the damaged
    version it left (None: none was damaged) and the version whose rows it holds now (``restored``; equal to
    ``damaged`` when no earlier version was whole and the damaged version was kept less its broken fragments)."""
    uri: str
    message: str
    version: int | None = None
    damaged: int | None = None
    restored: int | None = None
    set_aside: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.set_aside) or self.damaged is not None


def restore(uri: str | Path) -> Restoration:
    """Recover what can be recovered of a table: newest manifests that cannot be read are renamed
    ``<name>.unreadable`` (kept, out of Lance's sight); then, when the newest version lacks data files (lost or
    truncated), the newest version whose files are all there becomes the newest again (a Lance restore: a new
    version with its rows; the damaged one stays in the history, its readable rows with it), or, when none is,
    the damaged version less the fragments whose files are lost. No file is deleted. :func:`lost_ids` tells what
    the damaged version held that the table lacks now."""
    uri = str(uri)
    versions = manifest_versions(uri)
    readable = last_readable_version(uri, versions)
    if readable is None:
        raise UnreadableTable(f"{uri}: no version can be read (versions {sorted(versions)}); nothing was changed")
    newer = [versions[v] for v in sorted(versions) if v > readable]
    done = []
    if newer:
        fs, _ = fsspec.core.url_to_fs(uri)
        for name in newer:
            fs.mv(name, f"{name}.unreadable")
        done.append(f"back at version {readable}; {len(newer)} unreadable manifest(s) kept as "
                    f"{', '.join(n.rsplit('/', 1)[-1] + '.unreadable' for n in newer)}")
    ds = lance.dataset(uri)
    stored = stored_files(uri)
    broken = lacks(ds, stored)
    if not broken:
        return Restoration(uri, f"{uri}: " + ("; ".join(done) if done else
                                               f"version {ds.version} is its newest and is whole; nothing to restore"),
                           ds.version, set_aside=tuple(newer))
    lost = sum(len(p) for p in broken.values())
    whole = newest_whole_version(uri, ds.version, stored)
    if whole is not None:
        restored, rows = whole.version, whole.count_rows()
        whole.restore()
        now = lance.dataset(uri)
        done.append(f"version {ds.version} lacked {lost} file(s) ({next(iter(broken.values()))[0]}, ...); version "
                    f"{now.version} now holds the rows of version {restored}, the newest whose files are all there "
                    f"({rows} rows; version {ds.version} had {_rows(ds.get_fragments())})")
    else:
        rows = _rows(f for f in ds.get_fragments() if f.fragment_id in broken)
        now = lance.LanceDataset.commit(uri, lance.LanceOperation.Delete([], sorted(broken), "restore-table"),
                                        read_version=ds.version)
        done.append(f"no earlier version is whole: version {now.version} is version {ds.version} less its "
                    f"{len(broken)} fragment(s) whose files are lost ({rows} rows)")
        restored = ds.version
    return Restoration(uri, f"{uri}: " + "; ".join(done) + "; rerun the command that wrote the table to extract "
                       "again what it lacks", now.version, ds.version, restored, tuple(newer))


def _rows(fragments) -> int:
    """Rows of ``fragments`` by their manifest's counts (no file read: some may be lost)."""
    return sum(f.metadata.physical_rows - (f.metadata.deletion_file.num_deleted_rows if f.metadata.deletion_file else 0)
               for f in fragments)


def restore_table(uri: str | Path) -> str:
    """:func:`restore`, in one message (``rrt-dist restore-table``)."""
    return restore(uri).message


def lost_ids(uri: str | Path, damaged: int, restored: int, listed=None) -> np.ndarray:
    """The ids version ``damaged`` of a table held that version ``restored`` lacks (sorted): those read from its
    fragments whose files are whole, and those of ``listed`` (the ids the caller knows it held, e.g. a gallery's
    image catalog: the rows of a lost file are in no file any more)."""
    uri = str(uri)
    old = lance.dataset(uri, version=damaged)
    broken = lacks(old, stored_files(uri))
    held = [f.to_table(columns=["id"]).column("id").to_numpy() for f in old.get_fragments()
            if f.fragment_id not in broken]
    if listed is not None:
        held.append(np.asarray(listed, np.int64))
    kept = lance.dataset(uri, version=restored).to_table(columns=["id"]).column("id").to_numpy()
    return np.setdiff1d(np.concatenate(held) if held else np.zeros(0, np.int64), kept)


def commit_fragments(uri: str | Path, schema: pa.Schema, fragments: list) -> lance.LanceDataset:
    """Commit fragments as one new version (creating the table with ``schema`` on first commit). A first commit
    never replaces another writer's: when the table was created meanwhile, nothing is committed and
    :class:`TableCreatedMeanwhile` says so (the writer checks its ids against what the other added, then appends)."""
    uri = str(uri)
    ds = open_table(uri, verify=False)
    if ds is not None:
        check_schema(ds.schema, schema, uri)
        return lance.LanceDataset.commit(uri, lance.LanceOperation.Append(fragments), read_version=ds.version)
    try:
        # No retry: Lance retries a conflicting Overwrite as the next version, which would replace the other's rows
        return lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, fragments), read_version=None,
                                         max_retries=0)
    except (OSError, ValueError, RuntimeError):
        if not manifest_versions(uri):
            raise
        raise TableCreatedMeanwhile(f"{uri} was created by another writer while this one wrote its first commit; "
                                    f"nothing of either was replaced") from None


class TableCreatedMeanwhile(RuntimeError):
    """A first commit found the table created by another writer (:func:`commit_fragments`)."""


def compact(uri: str | Path, max_fragments: int = 64) -> bool:
    """Merge small fragments once there are more than ``max_fragments`` (ids are the keys, so moving rows is
    harmless); returns whether it did. The files of the versions before stay until those versions are removed
    (:func:`rrt_dist.store.cleanup.remove_old_versions`)."""
    ds = open_table(uri, verify=False)
    if ds is None or len(ds.get_fragments()) <= max_fragments:
        return False
    ds.optimize.compact_files()
    return True


def committed_ids(uri: str | Path) -> np.ndarray:
    """Ids already committed to a table (empty if it does not exist)."""
    ds = open_table(uri)
    if ds is None:
        return np.zeros(0, np.int64)
    return ds.to_table(columns=["id"]).column("id").to_numpy()


def committed_sources(uri: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, sources)`` committed to a table (empty if it does not exist); sources may hold None."""
    ds = open_table(uri)
    if ds is None:
        return np.zeros(0, np.int64), np.zeros(0, object)
    if "source" not in ds.schema.names:         # written before rows recorded their file: identity unknown
        ids = ds.to_table(columns=["id"]).column("id").to_numpy()
        return ids, np.full(len(ids), None, dtype=object)
    table = ds.to_table(columns=["id", "source"])
    return table.column("id").to_numpy(), np.asarray(table.column("source").to_pylist(), dtype=object)


def delete_ids(uri: str | Path, ids: Sequence[int], chunk: int = 10_000) -> None:
    """Delete the rows of ``ids`` (one Lance version per chunk of ids)."""
    ds = open_table(uri)
    ids = [int(i) for i in ids]
    for s in range(0, len(ids), chunk):
        ds.delete(f"id IN ({', '.join(map(str, ids[s:s + chunk]))})")

