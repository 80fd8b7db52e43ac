"""Pure extraction core: decode and prepare one image (CPU), extract a batch (the model). The Ray pipeline runs the
two in its decode tasks and extractor actors; :func:`extract_rows` runs them in one process (tests' oracle, the
benchmark's single-process baseline)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from rrt_dist.schema import DEFAULT_MAX_PIXELS
from rrt_dist.store import features_schema, features_to_table
from rrt_dist.store.features import local_shape

from .base import ImageFeatures, Prepared, to_original
from .images import ImageError, load_image


def decode_and_prepare(uri: str, bbox: Sequence[float] | None, preparer: Callable,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Prepared, tuple]:
    """Decode, crop to ``bbox`` (queries) and resize; returns the prepared image and the crop offset."""
    rgb = load_image(uri, bbox, max_pixels)
    offset = (0.0, 0.0) if bbox is None else (float(max(0, int(np.floor(bbox[0])))), float(max(0, int(np.floor(bbox[1])))))
    return preparer(rgb), offset


def extract_batch(extractor, prepared: Sequence[Prepared], offsets: Sequence[tuple]) -> list[ImageFeatures]:
    """The extractor on a batch of prepared images; positions mapped back to the original images' pixels."""
    if not prepared:
        return []
    return [to_original(f, p, offset) for p, offset, f in zip(prepared, offsets, extractor.extract(list(prepared)))]


def schema_for(extractor, fingerprint: str, local_encoding: str = "fp16", codebook=None) -> pa.Schema:
    return features_schema(extractor.global_dim, extractor.local_dim, extractor.max_local, extractor.name,
                           extractor.config, fingerprint, local_encoding, codebook)


def features_table(schema: pa.Schema, ids: Sequence[int], feats: Sequence[ImageFeatures],
                   sources: Sequence[str] | None = None, codebook=None) -> pa.Table:
    """Pad each image's locals to the table width (rows beyond ``n_local`` are zero); ``sources``: the files'
    identities; ``codebook``: a pq table's."""
    n = len(ids)
    width, d_l = local_shape(schema)
    d_g = schema.field("global").type.list_size
    glob = np.zeros((n, d_g), np.float32)
    local = np.zeros((n, width, d_l), np.float32)
    pos = np.zeros((n, width, 2), np.float32)
    scl = np.zeros((n, width), np.int64)
    n_local = np.zeros(n, np.int32)
    for i, f in enumerate(feats):
        k = min(f.n_local, width)
        glob[i] = f.global_
        if k:
            local[i, :k], pos[i, :k], scl[i, :k] = f.local[:k], f.positions[:k], f.scales[:k]
        n_local[i] = k
    return features_to_table(schema, ids, glob, local, pos, scl, n_local, sources, codebook)


def locals_layout(feats: Sequence[ImageFeatures], width: int, local_dim: int) -> dict:
    """Extracted features in :meth:`rrt_dist.store.FeatureStore.take_locals`'s layout (locals padded to ``width``,
    ``mask`` True at padding): what rerankers score, for images that are in no table (a served query). Values are
    rounded through fp16 as a table with fp16 storage holds them, so a served query scores exactly as the same
    image read back from a query table (the batch search job's)."""
    n = len(feats)
    out = {"global": np.stack([f.global_ for f in feats]).astype(np.float16).astype(np.float32),
           "local": np.zeros((n, width, local_dim), np.float32), "positions": np.zeros((n, width, 2), np.float32),
           "scales": np.zeros((n, width), np.int64), "n_local": np.zeros(n, np.int64), "mask": np.ones((n, width), bool)}
    for i, f in enumerate(feats):
        k = min(f.n_local, width)
        if k:
            out["local"][i, :k] = f.local[:k].astype(np.float16)
            out["positions"][i, :k], out["scales"][i, :k] = f.positions[:k], f.scales[:k]
        out["n_local"][i], out["mask"][i, :k] = k, False
    return out


def extract_rows(extractor, preparer: Callable, rows: Sequence[dict], batch_size: int = 16):
    """In-process reference: decode, prepare and extract ``rows`` (``id``, ``uri``, ``bbox``).

    Returns ``(ids, features, errors)`` with positions in original-image pixels; unreadable images
    are reported in ``errors`` (id -> reason) and skipped.
    """
    ids, feats, errors = [], [], {}
    pending: list[tuple[int, Prepared, tuple]] = []

    def flush():
        ids.extend(image_id for image_id, _, _ in pending)
        feats.extend(extract_batch(extractor, [p for _, p, _ in pending], [o for _, _, o in pending]))
        pending.clear()

    for row in rows:
        try:
            prepared, offset = decode_and_prepare(row["uri"], row.get("bbox"), preparer)
        except ImageError as err:
            errors[row["id"]] = str(err)
            continue
        pending.append((row["id"], prepared, offset))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return ids, feats, errors
