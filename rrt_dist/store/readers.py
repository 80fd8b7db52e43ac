"""Read side of feature tables: one table pinned to a version (:class:`FeatureStore`), descriptors held in
memory behind the same interface (:class:`MemoryFeatures`), and lookups over several tables."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lance
import numpy as np

from rrt_dist.schema import FeatureTableMismatch

from .features import (META_CONFIG, META_EXTRACTOR, META_FINGERPRINT, decode_int8, decode_pq, local_encoding,
                       local_shape, read_codebook)
from .versions import check_whole, open_table


class FeatureStore:
    """Read side of a feature table, pinned to one Lance version.

    ``globals()`` loads every global descriptor with its id; ``take_locals(ids)`` fetches the local
    descriptors of any ids in one batched random-access read. ``only`` restricts the view to those
    ids (a table may hold rows of images its current manifest no longer lists, e.g. distractors
    beyond a smaller ``limit``): ``ids``, ``globals()``, ``contains`` and ``take_locals`` see no other.
    """

    def __init__(self, uri: str | Path, version: int | None = None, expected_fingerprint: str | None = None,
                 only: Sequence[int] | None = None):
        # Absolute: the (uri, version) pairs handed to actors and Ray Train workers must not depend on their cwd.
        self.uri = str(uri) if "://" in str(uri) else str(Path(uri).resolve())
        if version is None:
            self.dataset = open_table(self.uri)
        else:                                   # a pinned version: whole, or named as damaged
            self.dataset = lance.dataset(self.uri, version=version)
            check_whole(self.uri, self.dataset)
        if self.dataset is None:
            raise FileNotFoundError(f"{self.uri}: no feature table (no committed version)")
        meta = self.dataset.schema.metadata or {}
        self.extractor = meta.get(META_EXTRACTOR, b"").decode()
        self.config = json.loads(meta.get(META_CONFIG, b"{}"))
        self.fingerprint = meta.get(META_FINGERPRINT, b"").decode()
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise FeatureTableMismatch(f"{self.uri} was written by extractor {self.extractor!r} ({self.fingerprint}), "
                                       f"not the expected one ({expected_fingerprint})")
        schema = self.dataset.schema
        self.global_dim = schema.field("global").type.list_size
        self.max_local, self.local_dim = local_shape(schema)
        self.codebook = read_codebook(self.uri, schema) if local_encoding(schema) == "pq" else None
        ids = self.dataset.to_table(columns=["id"]).column("id").to_numpy()
        self._rows = np.arange(len(ids))                     # table row offset of each id in view
        if only is not None:
            self._rows = np.flatnonzero(np.isin(ids, np.asarray(only, np.int64)))
            ids = ids[self._rows]
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        twice = self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]]
        if len(twice):      # two writers appended the same images: every ranking and metric over it would be wrong
            raise FeatureTableMismatch(f"{self.uri} (version {self.dataset.version}) holds {len(np.unique(twice))} "
                                       f"image id(s) more than once, e.g. {np.unique(twice)[:3].tolist()}: it cannot "
                                       f"be used; delete it to extract it again")
        self.ids = ids
        self.restricted = only is not None

    @property
    def version(self) -> int:
        return self.dataset.version

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, file identities)`` of the rows in view (identities None where unknown)."""
        if "source" not in self.dataset.schema.names:
            return self.ids, np.full(len(self.ids), None, dtype=object)
        table = self.dataset.to_table(columns=["id", "source"])
        if self.restricted:
            table = table.take(self._rows)
        return table.column("id").to_numpy(), np.asarray(table.column("source").to_pylist(), dtype=object)

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(self._sorted_ids) == 0:
            return np.zeros(len(ids), bool)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(self._sorted_ids) - 1)
        return self._sorted_ids[pos] == ids

    def rows_of(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, max(len(self._sorted_ids) - 1, 0))
        if len(self._sorted_ids) == 0 or not np.all(self._sorted_ids[pos] == ids):
            missing = ids if len(self._sorted_ids) == 0 else ids[self._sorted_ids[pos] != ids]
            raise KeyError(f"ids not in {self.uri}: {missing[:5].tolist()}")
        return self._rows[self._order[pos]]

    def globals(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [N], global [N, d_g])`` in table order."""
        table = self.dataset.to_table(columns=["id", "global"])
        if self.restricted:
            table = table.take(self._rows)
        vectors = table.column("global").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return table.column("id").to_numpy(), vectors.reshape(-1, self.global_dim).astype(dtype)

    def global_blocks(self, rows: int = 16384, dtype=np.float32, id_range: tuple[int, int] | None = None):
        """``(ids, global)`` of the rows in view (those with ids in ``id_range``, both ends included, if given),
        ``rows`` at a time in table order: a gallery streamed through search, never held whole (16384 × 2048-d
        float32 = 128 MB a block)."""
        offsets = self._rows
        if id_range is not None:
            offsets = offsets[(self.ids >= id_range[0]) & (self.ids <= id_range[1])]
        for start in range(0, len(offsets), rows):
            table = self.dataset.take(offsets[start:start + rows], columns=["id", "global"])
            vectors = table.column("global").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            # ids copied: a zero-copy view would keep the block's whole Arrow table (64 MB) alive as long as
            # the caller keeps the ids (the whole ranking keeps every block's: 4 GB at 1M images)
            yield table.column("id").to_numpy().copy(), vectors.reshape(-1, self.global_dim).astype(dtype)

    def take_globals(self, ids: Sequence[int], dtype=np.float32) -> np.ndarray:
        """Global descriptors ``[n, d_g]`` of ``ids``, in that order."""
        unique, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        table = self.dataset.take(self.rows_of(unique), columns=["global"])
        vectors = table.column("global").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return vectors.reshape(-1, self.global_dim).astype(dtype)[inverse]

    def take_global_blocks(self, ids: Sequence[int], rows: int = 8192, dtype=np.float32):
        """``(ids, global)`` of ``ids`` in that order, ``rows`` at a time (e.g. a training table's rows in id
        order, streamed through search)."""
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), rows):
            yield ids[start:start + rows], self.take_globals(ids[start:start + rows], dtype)

    def take_locals(self, ids: Sequence[int], dtype=np.float32) -> dict:
        """Descriptors of ``ids`` (in that order): ``global [n, d_g]``, ``local [n, L, d_l]``, ``positions [n, L, 2]``,
        ``scales [n, L]``, ``n_local [n]`` and ``mask [n, L]`` (True = padding), from one ``take``."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.rows_of(ids)
        n, width, d_l = len(ids), self.max_local, self.local_dim
        encoding = local_encoding(self.dataset.schema)
        columns = ["id", "global", "n_local"] + (["local", "positions", "scales"] if width else []) + (
            ["local_scale"] if width and encoding == "int8" else [])
        table = self.dataset.take(rows, columns=columns)
        if not np.array_equal(table.column("id").to_numpy(), ids):  # take follows the requested row order
            raise RuntimeError(f"{self.uri}: take returned rows out of order")

        def arr(name, typ, shape):
            if not width:
                return np.zeros(shape, typ)
            return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(typ).reshape(shape)

        n_local = table.column("n_local").to_numpy()
        glob = table.column("global").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if encoding == "int8":
            local = decode_int8(arr("local", np.int8, (n, width, d_l)), arr("local_scale", np.float32, (n, width)))
        elif encoding == "pq":
            local = decode_pq(arr("local", np.uint8, (n, width, self.codebook.shape[0])), self.codebook)
        else:
            local = arr("local", np.float32, (n, width, d_l))
        mask = np.arange(width)[None, :] >= n_local[:, None]
        local[mask] = 0                                   # padding decodes to zeros whatever the encoding
        return {"global": glob.astype(dtype).reshape(n, self.global_dim), "local": local.astype(dtype, copy=False),
                "positions": arr("positions", np.float32, (n, width, 2)),
                "scales": arr("scales", np.int64, (n, width)), "n_local": n_local,
                "mask": mask}


class MemoryFeatures:
    """Descriptors held in memory behind ``FeatureStore``'s read side (``contains``, ``take_locals``): for
    features computed on the fly, e.g. locals re-extracted by a backbone being finetuned.

    ``features`` has ``take_locals``'s layout, one row per id of ``ids``.
    """

    def __init__(self, ids: Sequence[int], features: dict):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.features = features
        self._where = {int(i): r for r, i in enumerate(self.ids.tolist())}

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray([int(i) in self._where for i in np.asarray(ids).tolist()], bool)

    def take_locals(self, ids: Sequence[int]) -> dict:
        missing = [int(i) for i in np.asarray(ids).tolist() if int(i) not in self._where]
        if missing:
            raise KeyError(f"ids not held in memory: {missing[:5]}")
        rows = [self._where[int(i)] for i in np.asarray(ids).tolist()]
        return {k: v[rows] for k, v in self.features.items()}


def concat_globals(stores) -> tuple[np.ndarray, np.ndarray]:
    """Ids and global descriptors of several tables, concatenated in order."""
    parts = [s.globals() for s in stores]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def take_globals_from(stores, ids: np.ndarray) -> np.ndarray:
    """Global descriptors of ``ids`` (any shape; the result adds the descriptor axis), each from the table
    holding it (e.g. gallery + distractors)."""
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    out, found = None, np.zeros(len(flat), bool)
    for store in stores:
        here = store.contains(flat) & ~found
        if here.any():
            vectors = store.take_globals(flat[here])
            if out is None:
                out = np.zeros((len(flat), vectors.shape[1]), np.float32)
            out[here], found = vectors, found | here
    if not found.all():
        raise KeyError(f"ids in none of the tables: {flat[~found][:5].tolist()}")
    return out.reshape(*ids.shape, -1)


def take_locals_from(stores, ids: Sequence[int]) -> dict:
    """``take_locals`` over several tables (e.g. gallery + distractors): each id from the table holding it."""
    ids = np.asarray(ids, dtype=np.int64)
    out, found = None, np.zeros(len(ids), bool)
    for store in stores:
        here = store.contains(ids) & ~found
        if not here.any():
            continue
        part = store.take_locals(ids[here])
        if out is None:
            out = {k: np.zeros((len(ids),) + v.shape[1:], v.dtype) for k, v in part.items()}
            out["mask"][:] = True
        for k, v in part.items():
            out[k][here] = v
        found |= here
    if not found.all():
        raise KeyError(f"ids in none of the tables: {ids[~found][:5].tolist()}")
    return out
