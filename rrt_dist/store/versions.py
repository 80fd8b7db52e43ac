"""Versions of a feature table: writing fragments, committing them, and finding and recovering what a version
needs.

Distributed writers write Lance fragments (:func:`write_fragment`); one process commits them
(:func:`commit_fragments`), so a row becomes visible atomically with its Lance version and a killed job leaves
no partial rows. Files are deleted only by :mod:`rrt_dist.store.cleanup`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fsspec
import lance
import numpy as np
import pyarrow as pa

from rrt_dist.schema import UnreadableTable

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


def open_table(uri: str | Path) -> lance.LanceDataset | None:
    """The latest committed version of a table, or None when there is none: no folder, or a folder with no
    version manifest at all (the fragments of a run killed before its first commit). A table with a version
    that cannot be read raises :class:`UnreadableTable` naming its last readable version: it is never taken for
    an empty table (which callers would remove or overwrite)."""
    versions = manifest_versions(uri)
    if not versions:
        return None
    try:
        return lance.dataset(str(uri))
    except (ValueError, OSError) as err:
        readable = last_readable_version(uri, versions)
        raise UnreadableTable(
            f"{uri}: its newest version ({max(versions)}) cannot be read ({str(err).split(', /')[0]}); "
            + (f"the last readable version is {readable}: `rrt-dist restore-table {uri}` sets the table back to it "
               f"(the unreadable manifests are kept beside, renamed)" if readable else "no version of it can be read")
            + "; nothing was removed") from None


def last_readable_version(uri: str | Path, versions: dict[int, str] | None = None) -> int | None:
    for version in sorted(versions or manifest_versions(uri), reverse=True):
        try:
            lance.dataset(str(uri), version=version)
            return version
        except (ValueError, OSError):
            continue
    return None


def restore_table(uri: str | Path) -> str:
    """Set a table whose newest versions cannot be read back to its last readable one: their manifests are
    renamed ``<name>.unreadable`` (kept, out of Lance's sight), so the next commit follows the readable version.
    Data files are not touched."""
    versions = manifest_versions(uri)
    readable = last_readable_version(uri, versions)
    if readable is None:
        raise UnreadableTable(f"{uri}: no version can be read (versions {sorted(versions)}); nothing was changed")
    newer = [versions[v] for v in sorted(versions) if v > readable]
    if not newer:
        return f"{uri}: version {readable} is its newest and is readable; nothing to restore"
    fs, _ = fsspec.core.url_to_fs(str(uri))
    for name in newer:
        fs.mv(name, f"{name}.unreadable")
    lance.dataset(str(uri))                            # readable again
    return (f"{uri}: back at version {readable}; {len(newer)} unreadable manifest(s) kept as "
            f"{', '.join(n.rsplit('/', 1)[-1] + '.unreadable' for n in newer)}")


def commit_fragments(uri: str | Path, schema: pa.Schema, fragments: list) -> lance.LanceDataset:
    """Commit fragments as one new version (creating the table with ``schema`` on first commit)."""
    uri = str(uri)
    ds = open_table(uri)
    if ds is None:
        return lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, fragments), read_version=None)
    check_schema(ds.schema, schema, uri)
    return lance.LanceDataset.commit(uri, lance.LanceOperation.Append(fragments), read_version=ds.version)


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

