"""Released DELG descriptor files (as used by the RRT paper) -> the project's feature schema.

``<name>.delg_global``: a ``DatumProto`` (shape + float list, 2048 values).
``<name>.delg_local``: a ``DelfFeatures`` message, one ``DelfFeature`` per keypoint with a
``DatumProto`` descriptor (128 values), ``x``, ``y``, ``scale``, ``orientation`` and
``strength`` (attention). Messages (delf/protos, proto2)::

    DatumShape  { repeated int64 dim = 1 [packed]; }
    FloatList   { repeated float value = 1 [packed]; }
    Uint32List  { repeated uint32 value = 1 [packed]; }
    DatumProto  { DatumShape shape = 1; oneof { FloatList float_list = 2; Uint32List uint32_list = 3; } }
    DelfFeature { DatumProto descriptor = 1; float x = 2; float y = 3; float scale = 4;
                  float orientation = 5; float strength = 6; }
    DelfFeatures { repeated DelfFeature feature = 1; }

The wire format is parsed here directly (no protobuf dependency); writers exist for tests and
for exporting.

Scale indices. The released RRT checkpoints were trained with
``bisect_right([0.5, 0.7071, 1, 1.414, 2, 2.828, 4], s) - 1`` applied to the float32 scales read
as float64 (``scale_mapping="released"``, the default for released checkpoints): the thresholds
are compared against float32-rounded values, so which bucket a scale lands in depends on that
rounding and adjacent scales can share an index. Use ``scale_mapping="exact"`` (nearest of the
7 DELG scales in log space) for models you train yourself. Indices below 0 are clamped to 0.
"""
from __future__ import annotations

import bisect
import struct
from pathlib import Path

import numpy as np

from .base import ImageFeatures
from .images import is_uri

RELEASED_SCALE_BOUNDS = [0.5, 0.7071, 1, 1.414, 2, 2.828, 4]
DELG_FILE_SCALES = np.array([0.5, 0.7071, 1.0, 1.4142, 2.0, 2.8284, 4.0])


# ----------------------------------------------------------------------------- wire format

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield ``(field number, wire type, value)``; value is int (varint), bytes (length-delimited) or raw 4/8 bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _packed_varints(buf: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def parse_datum(buf: bytes) -> np.ndarray:
    shape, values = [], None
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            for n, w, v in _fields(value):
                if n == 1:
                    shape += _packed_varints(v) if w == 2 else [v]
        elif number in (2, 3) and wire == 2:
            floats, ints = [], []
            for n, w, v in _fields(value):
                if n != 1:
                    continue
                if number == 2:  # packed (wire 2) or a single fixed32 (wire 5): little-endian floats either way
                    floats.append(np.frombuffer(v, "<f4"))
                else:
                    ints.append(np.asarray(_packed_varints(v) if w == 2 else [v], np.uint32))
            values = np.concatenate(floats or ints) if (floats or ints) else np.zeros(0, np.float32)
    if values is None:
        raise ValueError("DatumProto without values")
    return values.reshape(shape) if shape else values


def parse_delf_features(buf: bytes) -> dict:
    desc, xs, ys, scales, orient, strength = [], [], [], [], [], []
    for number, wire, value in _fields(buf):
        if number != 1 or wire != 2:
            continue
        f = {"x": 0.0, "y": 0.0, "scale": 0.0, "orientation": 0.0, "strength": 0.0, "descriptor": None}
        names = {2: "x", 3: "y", 4: "scale", 5: "orientation", 6: "strength"}
        for n, w, v in _fields(value):
            if n == 1:
                f["descriptor"] = parse_datum(v).reshape(-1)
            elif n in names and w == 5:
                f[names[n]] = struct.unpack("<f", v)[0]
        desc.append(f["descriptor"])
        xs.append(f["x"]), ys.append(f["y"]), scales.append(f["scale"])
        orient.append(f["orientation"]), strength.append(f["strength"])
    n = len(desc)
    dim = len(desc[0]) if n else 0
    return {"locations": np.stack([np.asarray(ys, np.float32), np.asarray(xs, np.float32)], 1).reshape(n, 2),
            "scales": np.asarray(scales, np.float32), "descriptors": np.asarray(desc, np.float32).reshape(n, dim),
            "attention": np.asarray(strength, np.float32), "orientations": np.asarray(orient, np.float32)}


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def encode_datum(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.float32)
    shape = b"".join(_encode_varint(d) for d in array.shape)
    return _delimited(1, _delimited(1, shape)) + _delimited(2, _delimited(1, array.astype("<f4").tobytes()))


def encode_delf_features(locations, scales, descriptors, attention, orientations=None) -> bytes:
    n = len(locations)
    orientations = np.zeros(n, np.float32) if orientations is None else orientations
    out = bytearray()
    for i in range(n):
        f = _delimited(1, encode_datum(descriptors[i]))
        for number, value in ((2, locations[i][1]), (3, locations[i][0]), (4, scales[i]), (5, orientations[i]),
                              (6, attention[i])):
            f += _key(number, 5) + struct.pack("<f", float(value))
        out += _delimited(1, f)
    return bytes(out)


# ----------------------------------------------------------------------------- files -> features

def _read_bytes(path: str | Path) -> bytes:
    """A local file's or any fsspec URI's bytes (``OSError`` when missing)."""
    if is_uri(str(path)):
        import fsspec

        with fsspec.open(str(path), "rb") as f:
            return f.read()
    return Path(path).read_bytes()


def read_delg_global(path: str | Path) -> np.ndarray:
    return parse_datum(_read_bytes(path)).astype(np.float32).reshape(-1)


def read_delg_local(path: str | Path) -> dict:
    return parse_delf_features(_read_bytes(path))


def released_scale_index(scales: np.ndarray) -> np.ndarray:
    """The released RRT models' bucketing (see module docstring)."""
    values = np.asarray(scales, np.float32).astype(np.float64)
    return np.asarray([max(0, bisect.bisect_right(RELEASED_SCALE_BOUNDS, s) - 1) for s in values], np.int64)


def exact_scale_index(scales: np.ndarray) -> np.ndarray:
    """Nearest of the 7 DELG scales, in log space."""
    values = np.log(np.maximum(np.asarray(scales, np.float64), 1e-12))
    return np.abs(values[:, None] - np.log(DELG_FILE_SCALES)[None]).argmin(axis=1).astype(np.int64)


SCALE_MAPPINGS = {"released": released_scale_index, "exact": exact_scale_index}


def delg_features(global_desc: np.ndarray, local: dict, max_local: int = 500,
                  scale_mapping: str = "released") -> ImageFeatures:
    """One image's DELG files as ``ImageFeatures``: locals by decreasing attention (stable), top ``max_local``."""
    if scale_mapping not in SCALE_MAPPINGS:
        raise ValueError(f"scale_mapping must be one of {sorted(SCALE_MAPPINGS)}, got {scale_mapping!r}")
    order = np.argsort(-local["attention"], kind="stable")[:max_local]
    desc = local["descriptors"][order]
    desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    g = global_desc / max(float(np.linalg.norm(global_desc)), 1e-12)
    return ImageFeatures(g.astype(np.float32), desc.astype(np.float32), local["locations"][order][:, ::-1].copy(),
                         SCALE_MAPPINGS[scale_mapping](local["scales"][order]))


def released_global_path(image_uri: str, release: str) -> str:
    """Where the release keeps an image's descriptors, as the RRT repository lays them out: image
    ``<root>/jpg/<name>.jpg`` -> ``<root>/delg_<release>/<basename>.delg_global`` (``.delg_local`` beside it), for
    queries, gallery and distractors alike (an image outside a ``jpg/`` folder: ``delg_<release>/`` beside it)."""
    head, sep, _ = image_uri.rpartition("/jpg/")
    root = head if sep else image_uri.rpartition("/")[0]
    return f"{root}/delg_{release}/{Path(image_uri).stem}.delg_global"


class DelgImport:
    """The "extractor" of released DELG files: it reads an image's ``.delg_global`` / ``.delg_local`` pair instead of
    computing descriptors, so imported tables have the schema, fingerprint and pipeline of extracted ones."""
    name = "delg-import"
    local_dim = 128

    def __init__(self, release: str = "r50_gldv2", global_dim: int = 2048, max_local: int = 500,
                 scale_mapping: str = "released"):
        if scale_mapping not in SCALE_MAPPINGS:
            raise ValueError(f"scale_mapping must be one of {sorted(SCALE_MAPPINGS)}, got {scale_mapping!r}")
        self.release, self.global_dim, self.max_local, self.scale_mapping = release, global_dim, max_local, scale_mapping

    @property
    def config(self) -> dict:
        return {"release": self.release, "global_dim": self.global_dim, "max_local": self.max_local,
                "scale_mapping": self.scale_mapping}

    def file_for(self, image_uri: str) -> str:
        """The descriptor file this release holds for an image (:func:`released_global_path`)."""
        return released_global_path(image_uri, self.release)

    def read(self, global_path: str) -> ImageFeatures:
        """One image's features from ``<base>.delg_global`` and ``<base>.delg_local`` (``OSError`` when either is
        missing, ``ValueError`` when either is not such a file)."""
        base = global_path.removesuffix(".delg_global")
        global_desc = read_delg_global(f"{base}.delg_global")
        if len(global_desc) != self.global_dim:
            raise ValueError(f"{base}.delg_global holds {len(global_desc)} values, not global_dim={self.global_dim}")
        return delg_features(global_desc, read_delg_local(f"{base}.delg_local"), self.max_local, self.scale_mapping)
