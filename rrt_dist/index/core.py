"""Pure FAISS pieces of the sharded index: choosing, training, sharding, persisting, merging.

Similarity is inner product on L2-normalised descriptors; every index carries the images'
int64 ids (``IndexIDMap2`` around indexes that do not store ids themselves).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import faiss
import fsspec
import numpy as np

from rrt_dist.schema import NO_ID, StorageFull, is_disk_full

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    file: str
    id_min: int          # inclusive
    id_max: int          # inclusive
    ntotal: int = 0
    rows: str = ""       # Parquet of the shard's rows (id, image-file identity), written with it; files never change
    delta: bool = False  # holds rows added since the last build (any id), not an id range


@dataclass
class IndexManifest:
    dimension: int
    factory: str
    metric: str = "inner_product"
    fingerprint: str = ""                 # extractor fingerprint of the indexed descriptors
    sources: list[dict] = field(default_factory=list)   # feature tables indexed: {uri, version}; adds move versions
    shards: list[ShardInfo] = field(default_factory=list)
    choice: str = ""                      # why ``auto`` picked this factory
    rows_digest: str = ""                 # of the indexed rows' (id, file identity): see rows_digest()
    created: float = field(default_factory=time.time)
    version: int = 1                      # each commit (build, add, rebuild) is a new version
    template: str = ""                    # the trained empty index: delta shards start from it
    built_rows: int = 0                   # rows the last build trained and indexed
    requested: dict = field(default_factory=dict)   # what the build was asked (factory, shards, ...): rebuilds redo it
    history: list[dict] = field(default_factory=list)  # per version: action, rows added / removed, why
    transform: str = ""                   # what changed the vectors before indexing (e.g. αDBA); "" = as stored

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "IndexManifest":
        raw = json.loads(text)
        raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
        return cls(**raw)


def rows_digest(ids: np.ndarray, sources: np.ndarray) -> str:
    """A digest of which rows an index holds and which image file each came from: equal digests mean the
    indexed rows were not re-extracted since (an image that changed gets a new file identity)."""
    import hashlib

    order = np.argsort(ids, kind="stable")
    digest = hashlib.sha1(np.ascontiguousarray(np.asarray(ids, np.int64)[order]).tobytes())
    digest.update("\0".join(map(str, np.asarray(sources, dtype=object)[order])).encode())
    return digest.hexdigest()


def choose_factory(n: int, d: int, memory_budget: float) -> tuple[str, str]:
    """Pick an index for ``n`` vectors of dimension ``d`` within ``memory_budget`` bytes (autofaiss-style).

    Exact search while the float32 vectors fit and the gallery is small enough to scan; otherwise an
    IVF with ~4·sqrt(n) lists and the finest codes that fit (SQ8, then PQ with the most sub-quantisers).
    """
    flat_bytes = n * d * 4
    if flat_bytes <= memory_budget and n <= 2_000_000:
        return "Flat", f"{n} x {d} float32 = {flat_bytes / 2**30:.2f} GiB fits the {memory_budget / 2**30:.2f} GiB budget"
    nlist = int(2 ** round(math.log2(max(16, 4 * math.sqrt(n)))))
    overhead = n * 8 + nlist * d * 4                  # ids + centroids
    if n * d + overhead <= memory_budget:
        return f"IVF{nlist},SQ8", (f"flat would need {flat_bytes / 2**30:.2f} GiB; SQ8 codes ({n * d / 2**30:.2f} GiB) "
                                   f"fit, nlist={nlist} ~ 4 sqrt(n)")
    for m in (64, 48, 32, 24, 16, 8, 4):
        if d % m == 0 and n * m + overhead <= memory_budget:
            return f"IVF{nlist},PQ{m}", (f"neither flat nor SQ8 fit {memory_budget / 2**30:.2f} GiB; PQ{m} "
                                         f"({m} bytes/vector) does, nlist={nlist}")
    raise MemoryError(f"{n} vectors of dimension {d} do not fit {memory_budget / 2**30:.2f} GiB with any index")


def check_factory(factory: str) -> None:
    """Refuse a FAISS factory string that parses for no common descriptor dimension (before any work)."""
    from rrt_dist.schema import ConfigError

    if factory == "auto":
        return
    error = None
    for d in (2048, 768, 384, 128, 96):
        try:
            faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as err:
            error = err
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else "not understood"
    raise ConfigError(f"index.factory={factory!r} is not a FAISS index_factory string ({reason})")


def new_index(factory: str, d: int) -> faiss.Index:
    """An empty inner-product index that takes ids (wrapped in IndexIDMap2 when it cannot store them)."""
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF):
        base.make_direct_map(False)
        return index
    return faiss.IndexIDMap2(index)


def gpu_index(index: faiss.Index, resources, device: int = 0) -> faiss.Index:
    """``index`` copied to GPU ``device`` of FAISS ``resources`` (a ``StandardGpuResources``), in fp16 where its
    type allows (flat and IVF-flat vectors, IVF-PQ lookup tables: half the memory and bandwidth; scores move by
    about 1e-3). A type FAISS has no GPU version of (HNSW, some PQ sizes) is refused with its name."""
    from rrt_dist.schema import ConfigError

    kind = type(faiss.downcast_index(getattr(index, "index", index))).__name__
    refuse = f"a {kind} index cannot be served on a GPU by FAISS"
    advice = "set ray.search.num_gpus=0 or choose another index.factory"
    if kind.startswith("IndexHNSW"):               # would clone, then fail at the first search (graph on the CPU)
        raise ConfigError(f"{refuse}: {advice}")
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    try:
        return faiss.index_cpu_to_gpu(resources, device, index, options)
    except RuntimeError as err:
        raise ConfigError(f"{refuse} ({str(err).strip().splitlines()[-1]}): {advice}") from None


def train(index: faiss.Index, sample: np.ndarray) -> None:
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, np.float32))


def shard_bounds(ids: np.ndarray, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous id ranges with about equal counts; together they cover all int64 values."""
    ids = np.sort(np.asarray(ids, np.int64))
    cuts = [int(ids[min(len(ids) - 1, (len(ids) * s) // n_shards)]) for s in range(1, n_shards)] if len(ids) else []
    lows = [np.iinfo(np.int64).min] + cuts
    highs = [c - 1 for c in cuts] + [np.iinfo(np.int64).max]
    return list(zip(lows, highs))


def _local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_index(index: faiss.Index, uri: str) -> None:
    """Write to a local path or any fsspec URI (s3://, gs://, memory://...), atomically where the store allows.
    Local files are written by FAISS itself, without a serialised copy in memory (a 1M x 2048 Flat shard is
    8 GB)."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = f"{path}.tmp"
    if _local(fs):
        # CPU indexes only: shard actors persist their CPU copy. Through Python's file, not FAISS's own: FAISS only
        # prints a failed close (a full disk's last block), and the truncated file would be renamed into place.
        with open(tmp, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
            f.flush()
            os.fsync(f.fileno())
    else:
        data = faiss.serialize_index(index)
        with fs.open(tmp, "wb") as f:
            f.write(memoryview(data))
    fs.mv(tmp, path)


def read_index(uri: str) -> faiss.Index:
    fs, path = fsspec.core.url_to_fs(uri)
    if _local(fs):
        return faiss.read_index(path)
    with fs.open(path, "rb") as f:
        return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))


def write_manifest(directory: str, manifest: IndexManifest) -> None:
    """Commit ``manifest``: its version's copy under ``versions/``, then ``manifest.json`` replaced in one
    rename (readers see the old version or the new one, never a mix: every file it names is already written
    and never rewritten)."""
    fs, path = fsspec.core.url_to_fs(directory)
    fs.makedirs(f"{path}/versions", exist_ok=True)
    text = manifest.to_json()
    with fs.open(f"{path}/versions/manifest-{manifest.version:06d}.json", "w") as f:
        f.write(text)
    tmp = f"{path}/{MANIFEST}.tmp"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, f"{path}/{MANIFEST}")


def collect_garbage(directory: str, keep_versions: int = 3) -> list[str]:
    """Remove index files no kept version names (the last ``keep_versions`` committed ones): older versions'
    shards, and files of a commit that never happened (a writer killed before its manifest). A searcher still
    serving a version that old keeps its shards in memory, but an actor restarted then could not reload them."""
    fs, path = fsspec.core.url_to_fs(directory)
    current = read_manifest(directory)
    named = {MANIFEST}
    for v in range(max(1, current.version - keep_versions + 1), current.version + 1):
        try:
            with fs.open(f"{path}/versions/manifest-{v:06d}.json", "r") as f:
                manifest = IndexManifest.from_json(f.read())
        except FileNotFoundError:
            continue
        named |= {manifest.template} | {s.file for s in manifest.shards} | {s.rows for s in manifest.shards}
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if fs.isfile(entry) and name not in named:
            fs.rm(entry)
            removed.append(name)
    return removed


@contextmanager
def committing(directory: str):
    """The block writes and commits a version of the index at ``directory``: a full device ends it in one
    :class:`StorageFull` line (the store's error, not FAISS's or Ray's, and no chained traceback). What was
    committed stays committed (a commit is one rename, after every file it names is written), and the files of the
    version that never was are collected by the next commit."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        current = current_manifest(directory)
        raise StorageFull(f"no space left on the device of {directory} while writing a new index version: free "
                          f"space and rerun the same command ("
                          + (f"version {current.version} stays the one searched" if current else
                             "no version was committed") + ")") from None


def commits_index(fn):
    """Decorator of ``fn(stores, directory, ...)``, which commits an index version at ``directory``:
    :func:`committing`."""
    @functools.wraps(fn)
    def run(stores, directory, *args, **kwargs):
        with committing(directory):
            return fn(stores, directory, *args, **kwargs)

    return run


def current_manifest(directory: str) -> IndexManifest | None:
    """The committed version of the index at ``directory``, or None when none was committed yet."""
    try:
        return read_manifest(directory)
    except FileNotFoundError:
        return None


def read_manifest(directory: str, version: int | None = None) -> IndexManifest:
    """The committed version of the index at ``directory`` (the newest, or ``version``: a reader pinned to one,
    e.g. a gallery snapshot's; its files are kept while it is among the last ``collect_garbage`` keeps)."""
    fs, path = fsspec.core.url_to_fs(directory)
    name = MANIFEST if version is None else f"versions/manifest-{version:06d}.json"
    if not fs.exists(f"{path}/{name}"):
        if version is not None:
            raise FileNotFoundError(f"{directory}: index version {version} is gone (no versions/manifest-"
                                    f"{version:06d}.json)")
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; build the index first (rrt-dist index)")
    with fs.open(f"{path}/{name}", "r") as f:
        return IndexManifest.from_json(f.read())


def merge_results(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into one, best (highest inner product) first.

    ``faiss.ResultHeap`` keeps the k smallest by default (the L2 direction, as in faiss's contrib
    client/server merge); inner product needs ``keep_max=True``.
    """
    nq = parts[0][0].shape[0]
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for scores, ids in parts:
        scores = np.where(ids == NO_ID, -np.inf, scores).astype(np.float32)
        heap.add_result(scores, ids)
    heap.finalize()
    return heap.D, heap.I


def search_numpy_exact(gallery: np.ndarray, gallery_ids: np.ndarray, queries: np.ndarray, k: int):
    """Exact top-k by brute force in numpy: the oracle of the tests."""
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1).astype(np.float32), np.asarray(gallery_ids)[order]


