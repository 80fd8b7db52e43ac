"""Procedural instance-level retrieval benchmark (the project's embedded default).

Every image is a deterministic function of ``(seed, split, landmark, view)``, so any subset can
be (re)rendered in parallel and a rerun reproduces identical files.

- A *landmark* is a structured scene: sky, ground and a facade with a window grid and roof in
  its *family* style (palette, window shape, roof), plus instance-specific details (shapes,
  glyphs, patterns) at random places. Landmarks of one family look alike globally and differ
  in their local details, which is what makes reranking with local descriptors worth it.
- A *view* warps the scene by a homography (scale, rotation, perspective, partial crop) over a
  random clutter background, adds occluders, and changes illumination, colour, blur, noise
  and JPEG quality. ``difficulty`` in [0, 1] scales all of it.
- Ground truth follows revisitop: for each query (a mild view with a bbox around the facade),
  a gallery view of the same landmark is *junk* when less than ``junk_below`` of the query
  region is visible in it, *hard* when the visible part is below ``hard_below`` or the view's
  difficulty is at least ``hard_difficulty``, and *easy* otherwise.

On disk it is written in the official layouts, so the same readers serve it:
``gnd_synthetic.pkl`` / ``gnd_synthetic-val.pkl`` + ``jpg/`` (revisitop), ``distractors/``
(R1M layout) and ``train/gallery.csv`` (folder layout, labels = landmark).
"""
from __future__ import annotations

import pickle
import string
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .options import SyntheticSpec

SPLIT_CODES = {"test": 1, "val": 2, "train": 3, "distractor": 4}
_FAMILY, _LANDMARK, _VIEW = 11, 12, 13
SCENE = 512          # scene canvas side (pixels)
MASK = 128           # resolution of the visibility masks (scene coordinates / 4)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _colour(rng, lo=0, hi=255):
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Style:
    palette: np.ndarray      # [6, 3] BGR
    sky: tuple
    sky2: tuple
    ground: tuple
    facade: tuple
    rows: int
    cols: int
    window: int              # 0 rectangle, 1 arch, 2 circle
    roof: int                # 0 flat, 1 gable, 2 dome


def family_style(seed: int, split_code: int, family: int) -> Style:
    rng = _rng(seed, _FAMILY, split_code, family)
    return Style(palette=rng.integers(0, 255, size=(6, 3)), sky=_colour(rng, 120, 255), sky2=_colour(rng, 60, 220),
                 ground=_colour(rng, 30, 160), facade=_colour(rng, 90, 240), rows=int(rng.integers(2, 5)),
                 cols=int(rng.integers(3, 7)), window=int(rng.integers(0, 3)), roof=int(rng.integers(0, 3)))


def _texture(rng, h, w, scale, amplitude):
    """Smooth random texture: upsampled noise."""
    small = rng.normal(0, 1, size=(max(2, h // scale), max(2, w // scale), 1)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[..., None] * amplitude


def _draw_element(img, rng, x, y, size, colour):
    """One distinctive local element: polygon, circle, star, checker, stripes or glyphs."""
    kind = int(rng.integers(0, 6))
    s = int(size)
    if kind == 0:
        pts = np.stack([x + rng.integers(-s, s, 5), y + rng.integers(-s, s, 5)], 1).astype(np.int32)
        cv2.fillPoly(img, [cv2.convexHull(pts)], colour, cv2.LINE_AA)
    elif kind == 1:
        cv2.circle(img, (x, y), max(3, s // 2), colour, -1, cv2.LINE_AA)
        cv2.circle(img, (x, y), max(2, s // 4), _colour(rng), -1, cv2.LINE_AA)
    elif kind == 2:
        angles = np.linspace(0, 2 * np.pi, 11)[:-1] + rng.uniform(0, np.pi)
        radii = np.where(np.arange(10) % 2 == 0, s, s / 2.5)
        pts = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
    elif kind == 3:
        cell = max(3, s // 3)
        other = _colour(rng)
        for i in range(3):
            for j in range(3):
                c = colour if (i + j) % 2 == 0 else other
                cv2.rectangle(img, (x - s // 2 + i * cell, y - s // 2 + j * cell),
                              (x - s // 2 + (i + 1) * cell, y - s // 2 + (j + 1) * cell), c, -1)
    elif kind == 4:
        for k in range(-s, s, max(3, s // 4)):
            cv2.line(img, (x + k, y - s // 2), (x + k + s // 2, y + s // 2), colour, max(1, s // 8), cv2.LINE_AA)
    else:
        text = "".join(rng.choice(list(string.ascii_uppercase + string.digits), size=int(rng.integers(2, 4))))
        cv2.putText(img, text, (x - s, y + s // 3), int(rng.choice([0, 1, 2, 3, 4, 6, 7])), s / 22.0, colour,
                    max(1, s // 10), cv2.LINE_AA)


def render_landmark(seed: int, style: Style, split_code: int, landmark: int):
    """The scene of one landmark: ``(image [SCENE, SCENE, 3] uint8 BGR, facade rect x1, y1, x2, y2)``."""
    rng = _rng(seed, _LANDMARK, split_code, landmark)
    t = np.linspace(0, 1, SCENE, dtype=np.float32)[:, None, None]
    img = (1 - t) * np.array(style.sky, np.float32) + t * np.array(style.sky2, np.float32)
    img = np.repeat(img, SCENE, axis=1)
    horizon = int(SCENE * rng.uniform(0.74, 0.82))
    img[horizon:] = np.array(style.ground, np.float32) + _texture(rng, SCENE - horizon, SCENE, 8, 18)
    x1, x2 = int(SCENE * rng.uniform(0.12, 0.24)), int(SCENE * rng.uniform(0.76, 0.88))
    y1 = int(SCENE * rng.uniform(0.2, 0.32))
    facade = np.array(style.facade, np.float32) + _texture(rng, horizon - y1, x2 - x1, 16, 14)
    img[y1:horizon, x1:x2] = facade
    img = np.clip(img, 0, 255).astype(np.uint8)
    roof_colour = tuple(int(c) for c in style.palette[0])
    if style.roof == 1:
        peak = (int((x1 + x2) / 2 + rng.uniform(-20, 20)), int(y1 - SCENE * rng.uniform(0.08, 0.16)))
        cv2.fillPoly(img, [np.array([(x1 - 8, y1), (x2 + 8, y1), peak], np.int32)], roof_colour, cv2.LINE_AA)
    elif style.roof == 2:
        cv2.ellipse(img, ((x1 + x2) // 2, y1), ((x2 - x1) // 3, int(SCENE * 0.1)), 0, 180, 360, roof_colour, -1,
                    cv2.LINE_AA)
    else:
        cv2.rectangle(img, (x1 - 6, y1 - 10), (x2 + 6, y1), roof_colour, -1)
    # Window grid in the family style; some windows carry instance details instead.
    cell_w, cell_h = (x2 - x1) / style.cols, (horizon - y1) / (style.rows + 0.4)
    for r in range(style.rows):
        for c in range(style.cols):
            cx, cy = int(x1 + (c + 0.5) * cell_w), int(y1 + (r + 0.6) * cell_h)
            ww, wh = int(cell_w * 0.28), int(cell_h * 0.3)
            colour = tuple(int(v) for v in style.palette[1 + (r % 2)])
            if style.window == 0:
                cv2.rectangle(img, (cx - ww, cy - wh), (cx + ww, cy + wh), colour, -1)
            elif style.window == 1:
                cv2.rectangle(img, (cx - ww, cy - wh // 3), (cx + ww, cy + wh), colour, -1)
                cv2.ellipse(img, (cx, cy - wh // 3), (ww, ww), 0, 180, 360, colour, -1, cv2.LINE_AA)
            else:
                cv2.circle(img, (cx, cy), min(ww, wh), colour, -1, cv2.LINE_AA)
            if rng.random() < 0.3:
                _draw_element(img, rng, cx, cy, min(ww, wh) * 0.9, _colour(rng))
    # Instance-specific details across the facade and around it.
    for _ in range(int(rng.integers(10, 16))):
        ex, ey = int(rng.uniform(x1 + 10, x2 - 10)), int(rng.uniform(y1 + 10, horizon - 10))
        colour = tuple(int(v) for v in style.palette[int(rng.integers(3, 6))]) if rng.random() < 0.5 else _colour(rng)
        _draw_element(img, rng, ex, ey, rng.uniform(10, 28), colour)
    for _ in range(int(rng.integers(2, 5))):
        _draw_element(img, rng, int(rng.uniform(10, SCENE - 10)), int(rng.uniform(horizon, SCENE - 10)),
                      rng.uniform(8, 20), _colour(rng))
    return img, (x1, y1, x2, horizon)


def render_clutter(rng, width: int, height: int) -> np.ndarray:
    """Background clutter that is no landmark: gradient, texture and random shapes."""
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = (1 - t) * np.array(_colour(rng), np.float32) + t * np.array(_colour(rng), np.float32)
    img = np.repeat(img, width, axis=1) + _texture(rng, height, width, 12, 25)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(6, 16))):
        _draw_element(img, rng, int(rng.integers(0, width)), int(rng.integers(0, height)), rng.uniform(6, 30),
                      _colour(rng))
    return img


# ----------------------------------------------------------------------------- views

def view_homography(rng, rect, difficulty: float, width: int, height: int) -> np.ndarray:
    """Scene -> view homography: the facade placed in the view, then scaled, rotated, shifted, skewed."""
    x1, y1, x2, y2 = rect
    src = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
    d = difficulty
    obj_w = width * rng.uniform(0.55, 0.8) * 2.0 ** (rng.uniform(-1.3, 0.9) * d)
    obj_h = obj_w * (y2 - y1) / (x2 - x1)
    if obj_h > height * 0.95 * 2.0 ** (0.6 * d):  # keep tall facades in frame at low difficulty
        obj_w, obj_h = obj_w * height * 0.9 / obj_h, height * 0.9
    centre = np.array([width / 2, height / 2]) + rng.uniform(-1, 1, 2) * d * np.array([width, height]) * 0.5
    if rng.random() < 0.6 * d:
        # A close-up of part of the facade (revisitop's partial views): much of it leaves the frame.
        zoom = rng.uniform(1.6, 3.0)
        obj_w, obj_h = obj_w * zoom, obj_h * zoom
        centre = centre + rng.uniform(-0.45, 0.45, 2) * np.array([obj_w, obj_h])
    angle = np.deg2rad(rng.uniform(-1, 1) * 30 * d)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    half = np.array([[-obj_w, -obj_h], [obj_w, -obj_h], [obj_w, obj_h], [-obj_w, obj_h]]) / 2
    jitter = rng.uniform(-1, 1, size=(4, 2)) * d * 0.22 * np.array([obj_w, obj_h])
    dst = ((half + jitter) @ rot.T + centre).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def render_view(scene, rect, rng, difficulty: float, width: int, height: int, occlude: bool = True):
    """Render one view. Returns ``(image, H scene->view, visible mask in scene coords [MASK, MASK])``."""
    H = view_homography(rng, rect, difficulty, width, height)
    background = render_clutter(rng, width, height)
    warped = cv2.warpPerspective(scene, H, (width, height), flags=cv2.INTER_LINEAR)
    inside = cv2.warpPerspective(np.ones(scene.shape[:2], np.uint8), H, (width, height), flags=cv2.INTER_NEAREST)
    img = np.where(inside[..., None] > 0, warped, background)
    visible = np.ones((height, width), np.uint8)
    if occlude:
        for _ in range(int(rng.poisson(4 * difficulty))):
            cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
            ax, ay = int(rng.uniform(10, 60) * (0.5 + difficulty)), int(rng.uniform(20, 90) * (0.5 + difficulty))
            colour = _colour(rng, 0, 120)
            if rng.random() < 0.5:
                cv2.ellipse(img, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
                cv2.ellipse(visible, (cx, cy), (ax, ay), 0, 0, 360, 0, -1)
            else:
                cv2.rectangle(img, (cx - ax // 2, cy - ay), (cx + ax // 2, cy + ay), colour, -1)
                cv2.rectangle(visible, (cx - ax // 2, cy - ay), (cx + ax // 2, cy + ay), 0, -1)
    img = photometric_change(img, rng, difficulty)
    # Which scene points are seen: the view frame minus occluders, mapped back to the scene.
    to_mask = np.diag([MASK / SCENE, MASK / SCENE, 1.0]) @ np.linalg.inv(H)
    seen = cv2.warpPerspective(visible, to_mask, (MASK, MASK), flags=cv2.INTER_NEAREST)
    return img, H, seen.astype(bool)


def photometric_change(img, rng, d: float) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    x = x * (1 + rng.uniform(-0.45, 0.35) * d) * (1 + rng.uniform(-0.25, 0.25, size=3) * d)
    x = np.clip(x, 0, 1) ** (2.0 ** (rng.uniform(-1, 1) * 0.8 * d))
    sigma = rng.uniform(0, 2.2) * d
    if sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    x = x + rng.normal(0, rng.uniform(0, 0.045) * d, size=x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def facade_mask(rect) -> np.ndarray:
    x1, y1, x2, y2 = (int(round(v * MASK / SCENE)) for v in rect)
    mask = np.zeros((MASK, MASK), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def query_bbox(H, rect, width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = rect
    corners = cv2.perspectiveTransform(np.array([[[x1, y1], [x2, y1], [x2, y2], [x1, y2]]], np.float32), H)[0]
    lo = np.clip(corners.min(0), 0, [width - 1, height - 1])
    hi = np.clip(corners.max(0), 0, [width - 1, height - 1])
    return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]


def classify(query_region: np.ndarray, seen: np.ndarray, difficulty: float, spec: SyntheticSpec) -> str:
    """easy / hard / junk for one gallery view of the query's landmark."""
    visible = float((query_region & seen).sum()) / max(1, int(query_region.sum()))
    if visible < spec.junk_below:
        return "junk"
    if visible < spec.hard_below or difficulty >= spec.hard_difficulty:
        return "hard"
    return "easy"


# ----------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class Item:
    """One image to render. ``style_split`` / ``family`` choose the look, ``split`` / ``landmark`` the instance."""
    name: str            # path relative to the benchmark root, without extension
    split: str           # test | val | train | distractor
    role: str            # query | gallery | train | distractor
    landmark: int
    family: int
    style_split: str
    view: int


def plan(spec: SyntheticSpec) -> list[Item]:
    """Every image of the benchmark, in a fixed order."""
    items = []
    for split, n in (("test", spec.n_landmarks), ("val", spec.n_val_landmarks)):
        for lm in range(n):
            fam = lm // spec.family_size
            for q in range(spec.queries_per_landmark):
                items.append(Item(f"jpg/{split}/q{lm:05d}_{q}", split, "query", lm, fam, split, q))
            for v in range(spec.views_per_landmark):
                items.append(Item(f"jpg/{split}/g{lm:05d}_{v:02d}", split, "gallery", lm, fam, split, v))
    for lm in range(spec.n_train_landmarks):
        for v in range(spec.train_views_per_landmark):
            items.append(Item(f"train/{lm:05d}_{v:02d}", "train", "train", lm, lm // spec.family_size, "train", v))
    n_test_families = max(1, -(-spec.n_landmarks // spec.family_size))
    family_rng = _rng(spec.seed, _FAMILY, SPLIT_CODES["distractor"])
    for i in range(spec.n_distractors):
        # Distractors are new instances of the test families: globally similar, never relevant.
        fam = int(family_rng.integers(0, n_test_families))
        items.append(Item(f"distractors/jpg/{i // 1000:03d}/{i:07d}", "distractor", "distractor", i, fam, "test", 0))
    return items


def render_item(spec: SyntheticSpec, item: Item, scene_cache: dict | None = None) -> tuple[np.ndarray, dict]:
    """Render one planned image; returns it and the metadata ground truth needs."""
    key = (item.split, item.landmark)
    if scene_cache is not None and key in scene_cache:
        scene, rect = scene_cache[key]
    else:
        style = family_style(spec.seed, SPLIT_CODES[item.style_split], item.family)
        scene, rect = render_landmark(spec.seed, style, SPLIT_CODES[item.split], item.landmark)
        if scene_cache is not None:
            scene_cache[key] = (scene, rect)
    rng = _rng(spec.seed, _VIEW, SPLIT_CODES[item.split], item.landmark, item.view, item.role == "query")
    difficulty = float(rng.uniform(0, 0.2) if item.role == "query" else rng.uniform(0, 1))
    img, H, seen = render_view(scene, rect, rng, difficulty, spec.view_width, spec.view_height,
                               occlude=item.role != "query")
    meta = {"name": item.name, "difficulty": difficulty}
    if item.role == "query":
        meta["bbox"] = query_bbox(H, rect, spec.view_width, spec.view_height)
        meta["region"] = np.packbits(facade_mask(rect) & seen)
    elif item.role == "gallery":
        meta["seen"] = np.packbits(seen)
    return img, meta


def render_and_write(spec: SyntheticSpec, root: str, items: list[Item]) -> list[dict]:
    """Render ``items`` and write them as JPEG under ``root``; the unit of parallel work."""
    cache: dict = {}
    out = []
    for item in items:
        img, meta = render_item(spec, item, cache)
        path = Path(root) / f"{item.name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.jpg")
        if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality]):
            raise OSError(f"cannot write {tmp}")
        tmp.replace(path)  # atomic: a killed run never leaves a truncated image under the final name
        out.append(meta)
    return out


def write_ground_truth(spec: SyntheticSpec, root: str | Path, items: list[Item], metas: dict[str, dict]) -> dict:
    """Write the revisitop / R1M / folder layouts and return per-split statistics."""
    root = Path(root)
    stats = {}
    unpack = lambda bits: np.unpackbits(bits)[: MASK * MASK].reshape(MASK, MASK).astype(bool)  # noqa: E731
    for split, suffix in (("test", ""), ("val", "-val")):
        gallery = [it for it in items if it.split == split and it.role == "gallery"]
        queries = [it for it in items if it.split == split and it.role == "query"]
        by_landmark: dict[int, list[int]] = {}
        for idx, it in enumerate(gallery):
            by_landmark.setdefault(it.landmark, []).append(idx)
        gnd, counts = [], {"easy": 0, "hard": 0, "junk": 0}
        for q in queries:
            qmeta = metas[q.name]
            region = unpack(qmeta["region"])
            entry = {"bbx": qmeta["bbox"], "easy": [], "hard": [], "junk": []}
            for idx in by_landmark.get(q.landmark, []):
                g = metas[gallery[idx].name]
                label = classify(region, unpack(g["seen"]), g["difficulty"], spec)
                entry[label].append(idx)
                counts[label] += 1
            gnd.append(entry)
        cfg = {"imlist": [it.name[len("jpg/"):] for it in gallery], "qimlist": [it.name[len("jpg/"):] for it in queries],
               "gnd": gnd}
        with open(root / f"gnd_synthetic{suffix}.pkl", "wb") as f:
            pickle.dump(cfg, f, protocol=4)
        stats[split] = {"queries": len(queries), "gallery": len(gallery), **counts}
    train = [it for it in items if it.split == "train"]
    (root / "train").mkdir(exist_ok=True)
    with open(root / "train" / "gallery.csv", "w") as f:
        f.write("path,label\n")
        f.writelines(f"{it.name[len('train/'):]}.jpg,{it.landmark}\n" for it in train)
    stats["train"] = {"images": len(train), "landmarks": spec.n_train_landmarks}
    distractors = [it for it in items if it.split == "distractor"]
    (root / "distractors").mkdir(exist_ok=True)
    with open(root / "distractors" / "revisitop1m.txt", "w") as f:
        f.writelines(f"{it.name[len('distractors/jpg/'):]}.jpg\n" for it in distractors)
    stats["distractors"] = {"images": len(distractors)}
    return stats


def read_ground_truth(root: str | Path, split: str = "test") -> dict:
    with open(Path(root) / f"gnd_synthetic{'' if split == 'test' else '-' + split}.pkl", "rb") as f:
        return pickle.load(f)


def landmark_labels(gnd: dict, root: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """(landmark of each gallery image, landmark of each query) of a split's ground truth, numbered from 0."""
    place = np.full(len(gnd["imlist"]), -1)
    q_place = []
    for entry in gnd["gnd"]:           # a query's easy + hard + junk views are all of its landmark's
        members = np.asarray(entry["easy"] + entry["hard"] + entry["junk"], np.int64)
        known = place[members][place[members] >= 0]
        q_place.append(int(known[0]) if len(known) else int(place.max()) + 1)
        place[members] = q_place[-1]
    if (place < 0).any():
        raise ValueError(f"{root}: {int((place < 0).sum())} gallery images belong to no query's landmark")
    return place, np.asarray(q_place, np.int64)


def synthetic_as_metric_learning(bench, root: str | Path, split: str = "test"):
    """The ``split``'s queries and gallery views as one metric-learning set (landmark = class, query set =
    gallery, self excluded): the landmarks are disjoint from the training split's, as the zero-shot protocol
    of CUB200 / Cars196 / SOP wants. ``bench`` is the split read as revisitop."""
    import pyarrow as pa

    from .base import Benchmark, MetricLearningProtocol

    place, q_place = landmark_labels(read_ground_truth(root, split), root)
    images = pa.concat_tables([bench.queries, bench.gallery])
    labels = np.concatenate([q_place, place])
    images = images.set_column(images.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    return Benchmark(name=f"{bench.name}-classes", queries=images, gallery=images,
                     protocol=MetricLearningProtocol(labels), exclude_self=True, info=bench.info)


def synthetic_as_msls(root: str | Path, out: str | Path, city: str = "cph", spacing_m: float = 100.0,
                      split: str = "test") -> dict:
    """The synthetic benchmark's ``split`` in MSLS layout (``read_msls``), to run the place-recognition
    protocol end to end without Mapillary's data: a landmark is a place, its gallery views the database
    images within 10 m of it (UTM), ``spacing_m`` between places (> the 25 m radius, so a query's positives
    are exactly its landmark's views, junk included: MSLS has no junk), queries whole images at the place.
    Images are hard-linked (copied across file systems). Returns the counts written."""
    import os
    import shutil

    root, out = Path(root), Path(out)
    gnd = read_ground_truth(root, split)
    place, q_place = landmark_labels(gnd, root)
    jitter = np.random.default_rng(0).uniform(-7, 7, (len(place), 2))     # within 10 m of the place
    sides = {"database": (gnd["imlist"], place, jitter), "query": (gnd["qimlist"], np.asarray(q_place),
                                                                   np.zeros((len(q_place), 2)))}
    for side, (names, places, offset) in sides.items():
        folder = out / "train_val" / city / side
        (folder / "images").mkdir(parents=True, exist_ok=True)
        keys = [f"{side[0]}{i:06d}" for i in range(len(names))]
        for key, name in zip(keys, names):
            target = folder / "images" / f"{key}.jpg"
            if not target.exists():
                try:
                    os.link(root / "jpg" / f"{name}.jpg", target)
                except OSError:
                    shutil.copyfile(root / "jpg" / f"{name}.jpg", target)
        easting, northing = 500_000 + places * spacing_m + offset[:, 0], 6_100_000 + offset[:, 1]
        # raw.csv's lon / lat are for display only; postprocessed.csv's UTM decides positives
        lat, lon = northing / 111_320.0, easting / 62_700.0
        with open(folder / "raw.csv", "w") as f:
            f.write(",key,lon,lat,ca,captured_at,pano\n")
            f.writelines(f"{i},{k},{lon[i]:.7f},{lat[i]:.7f},0,0,False\n" for i, k in enumerate(keys))
        with open(folder / "postprocessed.csv", "w") as f:
            f.write(",key,easting,northing\n")
            f.writelines(f"{i},{k},{easting[i]:.3f},{northing[i]:.3f}\n" for i, k in enumerate(keys))
    return {"queries": len(q_place), "database": len(place), "places": int(place.max()) + 1}
