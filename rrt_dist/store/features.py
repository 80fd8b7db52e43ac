"""The feature table's format: its schema (one row per image, keyed by the manifest's int64 ``id``) and the
codecs of its local descriptors::

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
it came from: the extraction pipeline re-extracts a row whose file changed since (never reuses it).
How tables are written, committed and recovered is :mod:`rrt_dist.store.versions`; how they are read,
:mod:`rrt_dist.store.readers`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import fsspec
import numpy as np
import pyarrow as pa

from rrt_dist.schema import LOCAL_ENCODINGS, FeatureTableMismatch

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

