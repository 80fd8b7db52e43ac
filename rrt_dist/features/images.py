"""Image decoding shared by every extractor: RGB uint8, optional query-box crop, a pixel limit."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from rrt_dist.schema import DEFAULT_MAX_PIXELS

# The pixel limit is ours (``max_pixels``), checked from the header before decoding; PIL's own
# (a warning, then DecompressionBombError) is off so the two cannot disagree.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be read; recorded by the pipelines, not fatal."""


class ImageTooLarge(ImageError):
    """An image of more pixels than the limit (a decompression bomb, or just too large to extract)."""


# What a file system reports that changes when an object is rewritten, most specific first (s3 / gcs / azure /
# local or memory through fsspec).
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "version_id", "mtime", "LastModified", "last_modified",
                 "created")


def is_uri(location: str) -> bool:
    """A URI fsspec opens (``s3://``, ``gs://``, ``file://``, ...), not a plain local path."""
    return "://" in location


def join_location(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI (``pathlib`` would fold ``s3://b`` into ``s3:/b``)."""
    root = str(root)
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(root, *map(str, parts))


def file_identity(uri: str) -> str:
    """What ties extracted features to the file they came from: its size and modification time (ns), or for
    a URI its size and the store's version of the object (ETag, generation, mtime). A file replaced or
    rewritten in place gets another identity; a missing file is ``"missing"``."""
    if is_uri(uri):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(uri)
            info = fs.info(path)
        except (OSError, ValueError):
            return "missing"
        version = next((info[k] for k in _VERSION_KEYS if info.get(k) is not None), "")
        return f"{info.get('size')}:{version}"
    try:
        st = os.stat(uri)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _source(uri: str):
    """What PIL opens: the path, or a URI's bytes read whole (decoders seek back and forth, which remote
    streams do slowly)."""
    if is_uri(uri):
        import io

        import fsspec

        with fsspec.open(uri, "rb") as f:
            return io.BytesIO(f.read())
    return uri


def load_image(uri: str, bbox: Sequence[float] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``uri`` to RGB uint8 ``[H, W, 3]``; ``bbox`` (x1, y1, x2, y2) crops it, as revisitop queries are.

    ``uri``: a local path or any fsspec URI (``s3://``, ``gs://``, ``file://``...). Any failure to read this one
    image (missing, truncated, not an image, larger than ``max_pixels`` pixels, a decoder error of any kind)
    raises :class:`ImageError` naming the file and the reason.
    """
    return decode_image(_source(uri), uri, bbox, max_pixels)


def decode_image(source, name: str, bbox: Sequence[float] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> np.ndarray:
    """:func:`load_image` of what PIL opens (a path or a file object, e.g. an upload's bytes in ``io.BytesIO``),
    named ``name`` in its errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLarge(f"{name}: {w}x{h} pixels exceed the limit of {max_pixels} "
                                        f"(backbone.max_image_pixels)")
                im.load()  # force full decode so truncated files fail here
                rgb = np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"{name}: {type(err).__name__}: {err}") from err
    except Exception as err:  # noqa: BLE001 - every decoder failure is this image's
        raise ImageError(f"{name}: {type(err).__name__}: {err}") from err
    if bbox is not None:
        h, w = rgb.shape[:2]
        x1, y1, x2, y2 = bbox
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if x2 <= x1 or y2 <= y1:
            raise ImageError(f"{name}: bbox {list(bbox)} is empty inside a {w}x{h} image")
        rgb = rgb[y1:y2, x1:x2]
    return rgb
