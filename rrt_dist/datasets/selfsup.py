"""Training images without labels: a gallery's own photos and random warps of each, labelled by the photo
they come from, so that RRT's pair rules (``rrt_dist.train.sampler``) apply unchanged: a positive is another
view of the anchor's photo, a negative a different photo from the anchor's global top-k.

A view is a random region of the photo stretched over the whole frame: a crop (scale), a rotation and a
perspective skew, i.e. a homography, then the synthetic benchmark's photometric changes (brightness, colour,
gamma, blur, noise). Unlike the synthetic benchmark's views, the photo is not placed on rendered clutter: every
view would share that clutter, negatives would match on it, and the reranker would learn the artefact (it did:
trained on such views, RRT ranked real photographs' positives below random). A view is a function of (seed,
source id, view index), so reruns write the same files, and ``views.parquet`` records each view's homography
(source pixels -> view pixels), the ground truth of its correspondences.

    <root>/views/<view id>.jpg
    <root>/views.parquet        id, uri, source_id, source_uri, view, homography (9 floats, row-major)
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import make_manifest, stable_id
from .synthetic import photometric_change

log = logging.getLogger(__name__)
WARPS = 2      # version of the view rendering below: part of view ids and of trained runs' names


@dataclass(frozen=True)
class ViewSpec:
    views: int = 4              # warped views per photo
    difficulty: float = 0.6     # 0: the whole image, unchanged; 1: crops of 30 % or more, 30 degree rotations
    seed: int = 0
    max_size: int = 640         # views' longest side (pixels); the source keeps its own size

    def fingerprint(self) -> str:
        """Names the views these settings render with this module's warps (``WARPS`` changes when they do)."""
        return hashlib.sha1(json.dumps({**asdict(self), "warps": WARPS}, sort_keys=True).encode()).hexdigest()[:10]


def view_id(source_id: int, index: int, spec: ViewSpec) -> int:
    return stable_id(f"selfsup:{spec.fingerprint()}:{source_id}:{index}")


def view_rng(source_id: int, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, source_id % (1 << 64), index])


def crop_homography(rng: np.random.Generator, width: int, height: int, difficulty: float, view_width: int,
                    view_height: int) -> np.ndarray:
    """Source -> view homography: a region of ``max(0.05, 1 - 0.7 d)`` to all of the source's area (aspect changed by up to
    2^(0.3 d)), rotated by up to 30 d degrees and shrunk until it fits, its corners moved by up to 0.12 d of its
    size (perspective), stretched over the ``view_width`` x ``view_height`` frame."""
    d = difficulty
    area, aspect = rng.uniform(max(0.05, 1 - 0.7 * d), 1.0), 2.0 ** (rng.uniform(-0.3, 0.3) * d)
    crop_w, crop_h = min(width, width * np.sqrt(area * aspect)), min(height, height * np.sqrt(area / aspect))
    angle = np.deg2rad(rng.uniform(-30, 30) * d)
    cos, sin = abs(np.cos(angle)), abs(np.sin(angle))
    fit = min(1.0, width / (crop_w * cos + crop_h * sin), height / (crop_w * sin + crop_h * cos)) * 0.999
    crop_w, crop_h = crop_w * fit, crop_h * fit
    half_w, half_h = (crop_w * cos + crop_h * sin) / 2, (crop_w * sin + crop_h * cos) / 2
    centre = np.array([rng.uniform(half_w, width - half_w), rng.uniform(half_h, height - half_h)])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * np.array([crop_w, crop_h]) / 2
    corners = corners + rng.uniform(-1, 1, size=(4, 2)) * 0.12 * d * np.array([crop_w, crop_h])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = (corners @ rotation.T + centre).astype(np.float32)
    frame = np.array([[0, 0], [view_width, 0], [view_width, view_height], [0, view_height]], np.float32)
    return cv2.getPerspectiveTransform(source, frame)


def view_geometry(width: int, height: int, source_id: int, index: int, spec: ViewSpec):
    """View ``index`` of a ``width`` x ``height`` source: its generator (left where rendering goes on), its
    homography (source -> view pixels) and its frame size, the longest side at most ``spec.max_size``."""
    scale = min(1.0, spec.max_size / max(width, height))
    frame = max(1, round(width * scale)), max(1, round(height * scale))
    rng = view_rng(source_id, index, spec.seed)
    return rng, crop_homography(rng, width, height, spec.difficulty, *frame), frame


def warp_view(image: np.ndarray, rng: np.random.Generator, H: np.ndarray, frame: tuple[int, int],
                difficulty: float) -> np.ndarray:
    """The view: the source warped by ``H`` (skewed corners that leave the photo show it mirrored, a few pixels'
    band), then photometric changes drawn from ``rng``."""
    view = cv2.warpPerspective(image, H, frame, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return photometric_change(view, rng, difficulty)


def render_views(image: np.ndarray, source_id: int, spec: ViewSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """``spec.views`` warped views of an RGB ``image``: ``(view, H)`` with H mapping source to view pixels."""
    h, w = image.shape[:2]
    out = []
    for index in range(spec.views):
        rng, H, frame = view_geometry(w, h, source_id, index, spec)
        out.append((warp_view(image, rng, H, frame, spec.difficulty), H))
    return out


def write_source_views(rows: list[dict], folder: str, spec: ViewSpec) -> list[dict]:
    """Render and write the views of ``rows`` (``id``, ``uri``) under ``folder``; one record per view.
    Views already on disk are not rendered again (their homography needs only the source's size, read from its
    header). Files are written to a temporary name and renamed, so a killed run leaves no torn view. Unreadable
    sources are skipped (they have no descriptors either). ``folder`` and the sources may be fsspec URIs."""
    import fsspec
    from PIL import Image

    from rrt_dist.features.images import ImageError, join_location, load_image

    fs, _ = fsspec.core.url_to_fs(folder)
    records = []
    for row in rows:
        ids = [view_id(row["id"], index, spec) for index in range(spec.views)]
        paths = [join_location(folder, f"{vid & ((1 << 64) - 1):016x}.jpg") for vid in ids]
        image = None
        try:
            if all(fs.isfile(p) for p in paths):
                with fsspec.open(row["uri"], "rb") as f, Image.open(f) as header:
                    width, height = header.size
            else:
                image = load_image(row["uri"])
                height, width = image.shape[:2]
        except (ImageError, OSError) as err:
            log.warning("self-supervised views: skipping %s (%s)", row["uri"], err)
            continue
        for index, (vid, path) in enumerate(zip(ids, paths)):
            rng, H, frame = view_geometry(width, height, row["id"], index, spec)
            if not fs.isfile(path):
                view = warp_view(image, rng, H, frame, spec.difficulty)
                ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(view, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
                assert ok, "JPEG encoding failed"
                tmp = path.removesuffix(".jpg") + ".tmp.jpg"
                with fs.open(tmp, "wb") as f:
                    f.write(jpeg.tobytes())
                fs.mv(tmp, path)
            records.append({"id": vid, "uri": path, "source_id": row["id"], "source_uri": row["uri"],
                            "view": index, "homography": H.astype(np.float64).ravel().tolist()})
    return records


def write_views(sources: pa.Table, root: str | Path, spec: ViewSpec, chunk_size: int = 32) -> pa.Table:
    """The views of every ``sources`` row (a manifest), rendered where missing (Ray tasks when Ray is up) and
    recorded in ``<root>/views.parquet``; returns that table."""
    import fsspec
    import ray
    from tqdm import tqdm

    from rrt_dist.features.images import join_location

    root = str(root)
    folder = join_location(root, "views")
    fs, _ = fsspec.core.url_to_fs(folder)
    fs.makedirs(folder, exist_ok=True)
    rows = [{"id": i, "uri": u} for i, u in zip(sources.column("id").to_pylist(), sources.column("uri").to_pylist())]
    chunks = [rows[s:s + chunk_size] for s in range(0, len(rows), chunk_size)]
    records: list[dict] = []
    with tqdm(total=len(rows), desc="render self-supervised views", unit="img", mininterval=2.0) as bar:
        if ray.is_initialized() and len(chunks) > 1:
            task = ray.remote(num_cpus=1)(write_source_views)
            pending = {task.remote(chunk, folder, spec): len(chunk) for chunk in chunks}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    records += ray.get(ref)
                    bar.update(pending.pop(ref))
        else:
            for chunk in chunks:
                records += write_source_views(chunk, folder, spec)
                bar.update(len(chunk))
    records.sort(key=lambda r: (r["source_id"], r["view"]))
    table = pa.Table.from_pylist(records, schema=pa.schema([
        ("id", pa.int64()), ("uri", pa.string()), ("source_id", pa.int64()), ("source_uri", pa.string()),
        ("view", pa.int32()), ("homography", pa.list_(pa.float64(), 9))]))
    tmp, final = join_location(root, "views.parquet.tmp"), join_location(root, "views.parquet")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table.replace_schema_metadata({"spec": json.dumps(asdict(spec))}), f)
    fs.mv(tmp, final)
    return table


def selfsup_manifest(sources: pa.Table, views: pa.Table) -> pa.Table:
    """Training manifest: every source that has views and its views, each labelled by its source's id (random
    64-bit, so apart from a labelled split's class numbers when the two are mixed)."""
    kept = np.isin(sources.column("id").to_numpy(), views.column("source_id").to_numpy())
    ids = np.concatenate([sources.column("id").to_numpy()[kept], views.column("id").to_numpy()])
    uris = [u for u, k in zip(sources.column("uri").to_pylist(), kept) if k] + views.column("uri").to_pylist()
    labels = np.concatenate([sources.column("id").to_numpy()[kept], views.column("source_id").to_numpy()])
    return make_manifest(ids.tolist(), uris, "train", labels=labels.tolist())
