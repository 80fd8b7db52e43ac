"""A small retrieval benchmark of real photographs, from the ones scikit-image and matplotlib ship (no download),
to see what a reranker does outside the synthetic benchmark's domain.

Photos are split by a seeded permutation into ``train`` (for self-supervised training, ``train/``) and
``test``. Each test photo is a query; the gallery holds ``views`` warped views of each (its positives, drawn
as self-supervised views are, at ``difficulty``, seeded apart from any training views; 1.4 by default, harder
than training views (<= 1): close-ups of down to 5 % of the photo, rotated up to 42 degrees) and, as
distractors, the training photos and as many views of each. Written in the ``folder`` layout (``dataset=folder dataset.root=<root>``)::

    <root>/gallery.csv  queries.csv  images/  train/
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .selfsup import ViewSpec, render_views

# Real photographs (not charts, drawings or synthetic patterns); motorcycle_right is the same scene as
# motorcycle_left from another viewpoint, so it is left out rather than made a false negative.
SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell",
                  "clock", "microaneurysms", "motorcycle_left")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)


def shipped_photos() -> dict[str, np.ndarray]:
    """Name -> RGB uint8 image of every photograph above (scikit-image is a test dependency)."""
    from matplotlib import cbook
    from skimage import data

    def rgb(image):
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(image.max() - image.min(), 1e-9)).astype(np.uint8)
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]

    photos = {}
    for name in SKIMAGE_PHOTOS:
        photos[name] = rgb(data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)())
    for name in MATPLOTLIB_PHOTOS:
        photos[name.rsplit(".", 1)[0]] = rgb(cv2.cvtColor(cv2.imread(str(cbook.get_sample_data(name, asfileobj=False))),
                                                          cv2.COLOR_BGR2RGB))
    return photos


def write_photo_benchmark(root: str | Path, n_test: int = 10, views: int = 3, difficulty: float = 1.4,
                          seed: int = 0) -> dict:
    """Write the benchmark under ``root`` (idempotent for the same arguments); returns its description."""
    root = Path(root)
    settings = {"n_test": n_test, "views": views, "difficulty": difficulty, "seed": seed}
    meta_path = root / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["settings"] == settings:
        return json.loads(meta_path.read_text())
    photos = shipped_photos()
    names = sorted(photos)
    order = np.random.default_rng(seed).permutation(len(names))
    test, train = [names[i] for i in order[:n_test]], sorted(names[i] for i in order[n_test:])
    for folder in ("images", "train"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    def save(image, path):
        cv2.imwrite(str(root / path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        return path

    # Evaluation views are seeded apart from the self-supervised training views (seed + 10**6).
    spec = ViewSpec(views=views, difficulty=difficulty, seed=seed + 10 ** 6)
    gallery, queries = [], []
    for q, name in enumerate(test):
        query = save(photos[name], f"images/query_{name}.png")
        positives = [save(view, f"images/{name}_view{v}.jpg")
                     for v, (view, _) in enumerate(render_views(photos[name], q, spec))]
        gallery += positives
        queries.append({"path": query, "positives": ";".join(positives)})
    for d, name in enumerate(train):
        gallery.append(save(photos[name], f"images/{name}.png"))
        gallery += [save(view, f"images/{name}_view{v}.jpg")
                    for v, (view, _) in enumerate(render_views(photos[name], len(test) + d, spec))]
        save(photos[name], f"train/{name}.png")
    pd.DataFrame({"path": gallery}).to_csv(root / "gallery.csv", index=False)
    pd.DataFrame(queries).to_csv(root / "queries.csv", index=False)
    meta = {"settings": settings, "test": test, "train": train, "gallery": len(gallery)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
