"""Lists of images outside any benchmark: a folder (searched recursively) or a CSV / Parquet manifest, local or
any fsspec URI. What ``ingest`` adds to a gallery and what self-supervised training renders views of."""
from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa

from rrt_dist.features.images import is_uri
from rrt_dist.schema import NO_ID, DatasetLayoutError

from .base import int_column, make_manifest, stable_id, unique_entries

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_LAYOUT = "a CSV or Parquet file with a uri (or path) column, optional id and label columns"


def new_images(images: str | None = None, manifest: str | None = None):
    """The manifest of a batch of new images: a folder (every image file under it, sorted) or a CSV / Parquet
    file (``uri`` or ``path``; relative paths are relative to its folder). Either may be a local path or any
    fsspec URI (``s3://bucket/new/``), and so may the manifest's entries. Ids are given, or the stable id of the
    image's absolute path / URI, so the same image ingested twice is one row."""
    if (images is None) == (manifest is None):
        raise DatasetLayoutError(images or manifest or "gallery", "set exactly one of gallery.images (a folder) and "
                                 "gallery.manifest (a CSV or Parquet file)", MANIFEST_LAYOUT)
    labels = ids = None
    if images is not None:
        fs, root = fsspec.core.url_to_fs(images)
        if not fs.isdir(root):
            raise DatasetLayoutError(images, "is not a folder", "a folder of images")
        found = (p for p in fs.find(root) if os.path.splitext(p)[1].lower() in IMAGE_SUFFIXES)
        uris = sorted(fs.unstrip_protocol(p) if is_uri(images) else absolute(p) for p in found)
    else:
        fs, path = fsspec.core.url_to_fs(manifest)
        if not fs.isfile(path):
            raise DatasetLayoutError(manifest, "file not found", MANIFEST_LAYOUT)
        frame = read_table_file(fs, path, manifest)
        column = "uri" if "uri" in frame else "path" if "path" in frame else None
        if column is None:
            raise DatasetLayoutError(manifest, f"has no uri or path column (columns: {list(frame.columns)})",
                                     MANIFEST_LAYOUT)
        entries = frame[column].astype(str).str.strip().tolist()
        empty = [i for i, u in enumerate(entries) if not u]
        if empty:
            raise DatasetLayoutError(manifest, f"line {empty[0] + 2}, column {column}: empty", MANIFEST_LAYOUT)
        parent = manifest.rsplit("/", 1)[0] if is_uri(manifest) else str(Path(manifest).resolve().parent)
        uris = [u if is_uri(u) or os.path.isabs(u) else
                f"{parent}/{u}" if is_uri(manifest) else absolute(os.path.join(parent, u)) for u in entries]
        unique_entries(uris, manifest, column, MANIFEST_LAYOUT)
        ids = manifest_ids(frame, manifest) if "id" in frame else None
        labels = int_column(frame, "label", manifest, MANIFEST_LAYOUT).tolist() if "label" in frame else None
    if not uris:
        raise DatasetLayoutError(images or manifest, "lists no image", MANIFEST_LAYOUT)
    return make_manifest(ids if ids is not None else [stable_id(u) for u in uris], uris, "gallery", labels=labels)


def absolute(path: str) -> str:
    """``path`` absolute with its symlinks resolved, as image ids are keyed (the stable id of the resolved path);
    a path that cannot be resolved (a symlink loop) stays as written, absolute: its row is kept, and extraction
    records why it cannot be read."""
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError):          # Python < 3.13 raises RuntimeError("Symlink loop ...")
        return os.path.abspath(path)


def read_table_file(fs, path: str, manifest: str) -> pd.DataFrame:
    """A CSV or Parquet manifest as a frame; a file that does not parse is a layout error naming it (and, for a
    CSV, the parser's line)."""
    try:
        with fs.open(path, "rb") as f:
            return pd.read_parquet(f) if path.endswith(".parquet") else pd.read_csv(f, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pa.ArrowException) as err:   # pandas' ParserError is a ValueError
        raise DatasetLayoutError(manifest, f"cannot be read ({str(err).strip().splitlines()[0]})",
                                 MANIFEST_LAYOUT) from None


def manifest_ids(frame, manifest: str) -> list[int]:
    """The manifest's ``id`` column: 64-bit signed integers (:func:`int_column` names a cell that is not), none the
    reserved "no result" id, none listed twice (both lines named)."""
    ids = int_column(frame, "id", manifest, MANIFEST_LAYOUT).tolist()
    if NO_ID in ids:
        raise DatasetLayoutError(manifest, f"line {ids.index(NO_ID) + 2}, column id: {NO_ID} is reserved (rankings "
                                 f"are padded with it), use another id", MANIFEST_LAYOUT)
    unique_entries(ids, manifest, "id", MANIFEST_LAYOUT)
    return ids


def images_at(location: str):
    """:func:`new_images` of a folder or of a manifest file, whichever ``location`` (a path or URI) is."""
    fs, path = fsspec.core.url_to_fs(location)
    return new_images(images=location) if fs.isdir(path) else new_images(manifest=location)
