"""Feature tables in Lance.

Schema (one row per image, keyed by the manifest's int64 ``id``)::

    id         int64
    global     fixed_size_list<float16>[d_g]          L2-normalised
    local      fixed_size_list<float16>[L * d_l]      row-major [L, d_l], rows >= n_local are zero
    positions  fixed_size_list<float32>[L * 2]        (x, y) pixels in the original image
    scales     fixed_size_list<int8>[L]               scale index of each local descriptor
    n_local    int32
    source     string                                  identity of the image file extracted (size:mtime_ns), or null

Global-only extractors (``L = 0``) have no ``local``/``positions``/``scales`` columns (Lance
refuses zero-width lists).

The schema metadata holds the extractor's name, its config (JSON) and fingerprint; opening a
table for an extractor with another fingerprint is an error. ``source`` ties each row to the file
it came from: the extraction pipeline re-extracts a row whose file changed since (never reuses it). Distributed writers write Lance
fragments (:func:`write_fragment`); one process commits them (:func:`commit_fragments`), so a
row becomes visible atomically with its Lance version and a killed job leaves no partial rows.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import faiss
import fsspec
import lance
import numpy as np
import pyarrow as pa

from rrt_dist.schema import LOCAL_ENCODINGS, FeatureTableMismatch, UnreadableTable

META_EXTRACTOR, META_CONFIG, META_FINGERPRINT = b"rrt_dist.extractor", b"rrt_dist.config", b"rrt_dist.fingerprint"
META_LOCAL_DIM, META_PQ_CODEBOOK = b"rrt_dist.local_dim", b"rrt_dist.pq_codebook_sha1"   # pq tables only




def features_schema(global_dim: int, local_dim: int, max_local: int, extractor: str, config: dict,
                    fingerprint: str, local_encoding: str = "fp16", codebook: np.ndarray | None = None) -> pa.Schema:
    """The feature table schema. ``local_encoding``: how local descriptors are stored: ``fp16`` (2 bytes a
    value); ``int8`` with one float32 scale per descriptor (``local_scale``: 1 byte a value, about half the
    size; :func:`encode_int8`); ``pq``: product-quantisation codes, one byte per sub-vector, of the FAISS
    ``ProductQuantizer`` whose ``codebook`` (``[M, 256, local_dim / M]``, trained on a sample) is kept beside
    the table (:func:`write_codebook`; the schema records its digest). Readers decode to float32 whichever it is."""
    if local_encoding not in LOCAL_ENCODINGS:
        raise ValueError(f"local_encoding must be one of {LOCAL_ENCODINGS}, got {local_encoding!r}")
    if (local_encoding == "pq") != (codebook is not None):
        raise ValueError("a pq table needs its codebook, and only a pq table has one")
    local_type = {"fp16": pa.float16(), "int8": pa.int8(), "pq": pa.uint8()}[local_encoding]
    per_local = local_dim if codebook is None else codebook.shape[0]          # values, or PQ codes, a descriptor
    extra = {} if codebook is None else {META_LOCAL_DIM: str(local_dim).encode(),
                                         META_PQ_CODEBOOK: codebook_digest(codebook).encode()}
    local_fields = [
        pa.field("local", pa.list_(local_type, max_local * per_local)),
        *([pa.field("local_scale", pa.list_(pa.float32(), max_local))] if local_encoding == "int8" else []),
        pa.field("positions", pa.list_(pa.float32(), max_local * 2)),
        pa.field("scales", pa.list_(pa.int8(), max_local)),
    ] if max_local and local_dim else []
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("global", pa.list_(pa.float16(), global_dim)),
        *local_fields,
        pa.field("n_local", pa.int32()),
        pa.field("source", pa.string()),
    ], metadata={META_EXTRACTOR: extractor.encode(), META_CONFIG: json.dumps(config, sort_keys=True, default=str).encode(),
                 META_FINGERPRINT: fingerprint.encode(), **extra})


def local_shape(schema: pa.Schema) -> tuple[int, int]:
    """``(max_local, local_dim)`` of a feature schema (``(0, 0)`` when global-only)."""
    if "scales" not in schema.names:
        return 0, 0
    width = schema.field("scales").type.list_size
    if META_LOCAL_DIM in (schema.metadata or {}):
        return width, int(schema.metadata[META_LOCAL_DIM])
    return width, schema.field("local").type.list_size // width


def local_encoding(schema: pa.Schema) -> str:
    if META_PQ_CODEBOOK in (schema.metadata or {}):
        return "pq"
    return "int8" if "local_scale" in schema.names else "fp16"


def train_pq(sample: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """A PQ codebook ``[m, 256, d / m]`` (FAISS ``ProductQuantizer``, 8 bits a code) trained on ``sample [n, d]``."""
    sample = np.ascontiguousarray(sample, np.float32)
    d = sample.shape[1]
    if d % m:
        raise ValueError(f"local descriptors of dimension {d} do not split into {m} sub-vectors")
    pq = faiss.ProductQuantizer(d, m, 8)
    pq.cp.seed = seed
    pq.train(sample)
    return faiss.vector_to_array(pq.centroids).reshape(m, 256, d // m)


def _product_quantizer(codebook: np.ndarray):
    m, _, sub = codebook.shape
    pq = faiss.ProductQuantizer(m * sub, m, 8)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebook, np.float32).reshape(-1), pq.centroids)
    pq.is_trained = True
    return pq


def codebook_digest(codebook: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(codebook, np.float32).tobytes()).hexdigest()


def codebook_uri(table_uri: str | Path) -> str:
    """Where a pq table's codebook lives: beside it (not in its schema, which every data file and version
    manifest repeats)."""
    return f"{str(table_uri).removesuffix('.lance')}-pq-codebook.npy"


def write_codebook(table_uri: str | Path, codebook: np.ndarray) -> None:
    """Write (atomically, local path or fsspec URI) the codebook of a pq table before its first commit."""
    fs, path = fsspec.core.url_to_fs(codebook_uri(table_uri))
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(f"{path}.tmp", "wb") as f:
        np.save(f, np.ascontiguousarray(codebook, np.float32))
    fs.mv(f"{path}.tmp", path)


def read_codebook(table_uri: str | Path, schema: pa.Schema) -> np.ndarray:
    """The codebook of a pq table, checked against the digest its schema records."""
    fs, path = fsspec.core.url_to_fs(codebook_uri(table_uri))
    try:
        with fs.open(path, "rb") as f:
            codebook = np.load(f)
    except FileNotFoundError:
        raise FeatureTableMismatch(f"{table_uri} stores PQ codes but its codebook {path} is missing") from None
    if codebook_digest(codebook).encode() != (schema.metadata or {}).get(META_PQ_CODEBOOK):
        raise FeatureTableMismatch(f"{path} is not the codebook {table_uri} was encoded with")
    return codebook


def encode_pq(local: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """``[..., d]`` float -> ``[..., M]`` uint8 codes."""
    flat = np.ascontiguousarray(local, np.float32).reshape(-1, local.shape[-1])
    return _product_quantizer(codebook).compute_codes(flat).reshape(*local.shape[:-1], codebook.shape[0])


def decode_pq(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(codes, np.uint8).reshape(-1, codebook.shape[0])
    return _product_quantizer(codebook).decode(flat).reshape(*codes.shape[:-1], -1)


def encode_int8(local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[..., d]`` float -> (int8 codes ``[..., d]``, float32 scales ``[...]``): each descriptor divided by its
    largest magnitude / 127 and rounded, so the error of a value is at most half its descriptor's scale."""
    local = np.asarray(local, np.float32)
    scale = np.abs(local).max(axis=-1) / 127.0
    codes = np.rint(local / np.where(scale > 0, scale, 1.0)[..., None])
    return np.clip(codes, -127, 127).astype(np.int8), scale.astype(np.float32)


def decode_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[..., None]


def _fixed(values: np.ndarray, width: int, typ) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1), type=typ), width)


def features_to_table(schema: pa.Schema, ids: Sequence[int], global_: np.ndarray, local: np.ndarray,
                      positions: np.ndarray, scales: np.ndarray, n_local: np.ndarray,
                      sources: Sequence[str | None] | None = None, codebook: np.ndarray | None = None) -> pa.Table:
    """Batch arrays (``local [B, L, d_l]``, ``positions [B, L, 2]``, ``scales [B, L]``) -> an Arrow table.

    ``sources``: each image file's identity (:func:`rrt_dist.features.images.file_identity`), null if unknown."""
    n = len(ids)
    d_g = schema.field("global").type.list_size
    width, d_l = local_shape(schema)
    if global_.shape != (n, d_g) or (width and local.shape != (n, width, d_l)):
        raise FeatureTableMismatch(f"expected global [{n}, {d_g}] and local [{n}, {width}, {d_l}], got "
                                   f"{global_.shape} and {local.shape}")
    columns = [pa.array(np.asarray(ids, np.int64)), _fixed(global_.astype(np.float16), d_g, pa.float16())]
    encoding = local_encoding(schema)
    if width and encoding == "int8":
        codes, scale = encode_int8(local)
        columns += [_fixed(codes, width * d_l, pa.int8()), _fixed(scale, width, pa.float32())]
    elif width and encoding == "pq":
        if codebook is None or codebook_digest(codebook).encode() != schema.metadata[META_PQ_CODEBOOK]:
            raise FeatureTableMismatch("PQ codes must be computed with the codebook the schema records")
        columns.append(_fixed(encode_pq(local, codebook), width * codebook.shape[0], pa.uint8()))
    elif width:
        columns.append(_fixed(local.astype(np.float16), width * d_l, pa.float16()))
    if width:
        columns += [_fixed(positions.astype(np.float32), width * 2, pa.float32()),
                    _fixed(scales.astype(np.int8), width, pa.int8())]
    sources = pa.nulls(n, pa.string()) if sources is None else pa.array(list(sources), pa.string())
    return pa.Table.from_arrays(columns + [pa.array(np.asarray(n_local, np.int32)), sources], schema=schema)


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


def check_schema(found: pa.Schema, expected: pa.Schema, uri: str) -> None:
    fp_found = (found.metadata or {}).get(META_FINGERPRINT, b"?").decode()
    fp_expected = (expected.metadata or {}).get(META_FINGERPRINT, b"?").decode()
    if fp_found == fp_expected and not found.remove_metadata().equals(expected.remove_metadata()):
        raise FeatureTableMismatch(f"{uri} was written by another version of rrt-dist (its columns differ: "
                                   f"{found.names} vs {expected.names}); delete it to extract it again")
    if fp_found != fp_expected:
        name = (found.metadata or {}).get(META_EXTRACTOR, b"?").decode()
        raise FeatureTableMismatch(
            f"{uri} holds features of extractor {name!r} (fingerprint {fp_found}), not of the requested one "
            f"(fingerprint {fp_expected}); use another output path or the extractor that wrote it")


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
        self.dataset = lance.dataset(self.uri, version=version) if version is not None else open_table(self.uri)
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
