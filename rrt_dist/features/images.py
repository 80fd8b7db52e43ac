"""Image decoding shared by every extractor: RGB uint8, optional query-box crop."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be read; recorded by the pipelines, not fatal."""


def load_image(uri: str, bbox: Sequence[float] | None = None) -> np.ndarray:
    """Decode ``uri`` to RGB uint8 ``[H, W, 3]``; ``bbox`` (x1, y1, x2, y2) crops it, as revisitop queries are."""
    try:
        with Image.open(uri) as im:
            im.load()  # force full decode so truncated files fail here
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ImageError(f"{uri}: {err}") from err
    if bbox is not None:
        h, w = rgb.shape[:2]
        x1, y1, x2, y2 = bbox
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if x2 <= x1 or y2 <= y1:
            raise ImageError(f"{uri}: bbox {list(bbox)} is empty inside a {w}x{h} image")
        rgb = rgb[y1:y2, x1:x2]
    return rgb
