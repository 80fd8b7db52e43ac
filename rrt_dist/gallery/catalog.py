"""A gallery's image catalog: one row per ingested image (``id``, ``uri``), the only list of what a gallery may
show. Rows are merged on ``id`` (an id is never listed twice), written only for ids whose features were committed,
and looked up through a BTREE index on ``id``: a lookup costs the same at 10k and at 1M images (no scan).

Readers name the version they read (a gallery snapshot pins one), so an image listed by a later ingest is not
shown by an answer computed from an earlier index version.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from rrt_dist.store import open_table

LOOKUP_CHUNK = 1024        # ids per indexed query (the SQL IN list)
MAX_FRAGMENTS = 32         # merged files beyond this are compacted at the end of an ingest


def catalog_schema() -> pa.Schema:
    return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("uri", pa.string(), nullable=False)])


class CatalogVersion:
    """One committed version of a catalog, opened once: ``uris(ids)`` answers from the BTREE index on ``id``."""

    def __init__(self, uri: str, version: int):
        import lance

        self.uri, self.version = uri, version
        self.dataset = lance.dataset(uri, version=version)

    def uris(self, ids) -> dict[int, str]:
        """``{id: uri}`` of the listed ids among ``ids`` (others are absent: never ingested, or rejected)."""
        wanted = np.unique(np.asarray(ids, np.int64))
        out: dict[int, str] = {}
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start:start + LOOKUP_CHUNK]
            rows = self.dataset.to_table(columns=["id", "uri"], filter=f"id IN ({','.join(map(str, chunk.tolist()))})")
            out.update(zip(rows.column("id").to_pylist(), rows.column("uri").to_pylist()))
        return out

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, uris)`` of every row (an ingest's reconciliation: O(gallery), never per request)."""
        table = self.dataset.to_table(columns=["id", "uri"])
        return table.column("id").to_numpy(), np.asarray(table.column("uri").to_pylist(), dtype=object)


class ImageCatalog:
    """The writable catalog of one gallery (``<gallery>/images.lance``); its one writer holds the gallery's lock."""

    def __init__(self, uri: str):
        self.uri = uri

    def latest_version(self) -> int | None:
        table = open_table(self.uri)
        return None if table is None else table.version

    def at(self, version: int) -> CatalogVersion:
        return CatalogVersion(self.uri, version)

    def latest(self) -> CatalogVersion | None:
        version = self.latest_version()
        return None if version is None else self.at(version)

    def is_merged(self) -> bool:
        """Whether the catalog is this format (merged on id, indexed) rather than an earlier release's append-only
        list, which ingest rewrites once (:meth:`rewrite`)."""
        table = open_table(self.uri)
        return table is not None and any(index["fields"] == ["id"] for index in table.list_indices())

    def upsert(self, ids, uris) -> int:
        """List ``ids`` at ``uris`` (a listed id takes the new uri); returns the committed version."""
        import lance

        rows = pa.table({"id": pa.array(np.asarray(ids, np.int64)), "uri": pa.array(list(uris), pa.string())},
                        schema=catalog_schema())
        table = open_table(self.uri)
        if table is None:
            return self.rewrite(rows)
        table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
        return lance.dataset(self.uri).version

    def unlist(self, ids) -> None:
        """Remove ``ids`` (images the gallery no longer holds features of)."""
        import lance

        ids = np.asarray(ids, np.int64)
        table = lance.dataset(self.uri)
        for start in range(0, len(ids), LOOKUP_CHUNK):
            table.delete(f"id IN ({','.join(map(str, ids[start:start + LOOKUP_CHUNK].tolist()))})")

    def rewrite(self, rows: pa.Table) -> int:
        """Replace the whole catalog by ``rows`` (one per id), indexed on ``id``: its creation, or the one-time
        upgrade of an earlier release's append-only list. Readers pinned to older versions keep reading them."""
        import lance

        table = lance.write_dataset(rows.cast(catalog_schema()), self.uri,
                                    mode="overwrite" if open_table(self.uri) is not None else "create")
        table.create_scalar_index("id", "BTREE")
        return lance.dataset(self.uri).version

    def tidy(self) -> int:
        """After an ingest's merges: compact many small files, index the rows merged since the last time (a lookup
        scans unindexed rows), and clean old versions (a snapshot's stay: they are tagged). Returns the version
        readers should pin."""
        import lance

        from rrt_dist.store.cleanup import remove_old_versions

        remove_old_versions(self.uri)
        table = lance.dataset(self.uri)
        if len(table.get_fragments()) > MAX_FRAGMENTS:
            table.optimize.compact_files()
            table = lance.dataset(self.uri)
        if table.stats.index_stats(table.list_indices()[0]["name"])["num_unindexed_rows"]:
            table.optimize.optimize_indices()
        return lance.dataset(self.uri).version
