"""What RRT training needs around the Ray Train loop: the training rows, the validation set, the run.

* training rows: the labelled training table, each image's global top-k (the exact searcher, or the
  sharded index in ``index.mode=sharded``, as for GLDv2's 1.5M images) and the anchors the paper's rules allow;
* validation: the dataset's held-out split (synthetic: its ``val`` benchmark), else ``val_holdout_labels``
  labels taken out of the training rows and scored leave-one-out; never the test split;
* the run: Ray Train under ``train.storage_path / name``; the best checkpoint (validation score) copied
  next to the job's outputs with the training curve.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf, open_dict

from rrt_dist.datasets import Benchmark, get_dataset, load_benchmark
from rrt_dist.datasets.base import MetricLearningProtocol
from rrt_dist.datasets.selfsup import WARPS
from rrt_dist.features import config_fingerprint
from rrt_dist.index.exact import block_searcher
from rrt_dist.config import TrainConfig, rrt_overrides
from rrt_dist.runtime import init_ray
from rrt_dist.schema import NO_ID, TrainSettings
from rrt_dist.store import FeatureStore
from rrt_dist.train.sampler import eligible_anchors, training_neighbours

from .features import backbone_features, decodable_rows, require_labels, training_features, training_pairs

log = logging.getLogger(__name__)


def train_settings(cfg) -> TrainSettings:
    """The loop's settings; with self-supervised pairs a positive is any other view of the anchor's image
    (``positive_scope=label``): a view is a positive by construction, whether or not it is in the top-k."""
    train = {**OmegaConf.to_container(cfg.train, resolve=True), "model": rrt_overrides(cfg.train.model)}
    settings = TrainSettings(**{f.name: train[f.name] for f in fields(TrainSettings)})
    return settings if training_pairs(cfg) == "labels" else replace(settings, positive_scope="label")


def min_positives(cfg) -> int:
    """Same-label images an anchor needs among its top-k; self-supervised anchors need none there (their views
    are positives wherever they rank), only a negative."""
    return cfg.train.min_positives if training_pairs(cfg) == "labels" else 0


# Settings added after runs were named, at the value that trains (and exports) as before: left out of the name,
# so that finished runs keep their names (and are reused) across the upgrade. global_fusion changes no weight but
# what the checkpoints record.
LATER_DEFAULTS = {"warmup_steps": 0, "global_fusion": False}
# Keys renamed after runs were named keep their old names in the digest, so finished runs are still found.
NAMES_BEFORE_RENAME = {"neighbours": "k", "val_depth": "val_k", "top_locals": "max_local"}
REMOVED_KEYS = {f.name for f in fields(TrainConfig) if "renamed" in f.metadata}


def run_name(cfg, prefix: str = "rrt", decisive_extra: dict | None = None) -> str:
    """``train.name``, or one derived from everything that decides the trained weights (``decisive_extra``:
    what else does, for the caller's kind of run)."""
    if cfg.train.name:
        return cfg.train.name
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k not in ("split", "distractors", "queries")}   # the evaluated split / queries do not change training
    decisive = {"dataset": dataset,
                "backbone": config_fingerprint(cfg.backbone.name, **OmegaConf.to_container(cfg.backbone.options,
                                                                                             resolve=True)),
                # locals decoded from int8 are not the fp16 ones (fp16 runs keep their names)
                **({"local_storage": cfg.backbone.local_storage, "local_pq_m": cfg.backbone.local_pq_m}
                   if cfg.backbone.local_storage != "fp16" else {}),
                # self-supervised views: how they are rendered, beyond the settings (cfg.train.selfsup)
                **({"pairs": training_pairs(cfg), "warps": WARPS} if training_pairs(cfg) in ("selfsup", "mixed") else {}),
                # GV-taught pairs: the teacher's options and, when approximate, the search that found the pairs
                **({"pairs": "gv", **mining_settings(cfg)} if training_pairs(cfg) == "gv" else {}),
                "train": {NAMES_BEFORE_RENAME.get(k, k): v
                          for k, v in {**OmegaConf.to_container(cfg.train, resolve=True),
                                       "model": rrt_overrides(cfg.train.model)}.items()
                          if k not in ("name", "storage_path", "max_failures", "fail_at_epoch", "fail_at_step", "keep_checkpoints",
                                       "data_cpus")    # where it runs does not change the weights
                          and k not in REMOVED_KEYS and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])
                          and not (k == "gv" and training_pairs(cfg) != "gv")},     # added later, read by gv only
                **(decisive_extra or {})}
    digest = hashlib.sha1(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:10]
    return f"{prefix}-{cfg.dataset.name}-{digest}"


def row_values(manifest: pa.Table, ids: np.ndarray, column: str = "label") -> np.ndarray:
    """The manifest's ``column`` (label, uri, ...) of each of ``ids``."""
    manifest_ids = manifest.column("id").to_numpy()
    order = np.argsort(manifest_ids, kind="stable")
    pos = order[np.clip(np.searchsorted(manifest_ids, ids, sorter=order), 0, len(order) - 1)]
    if not np.array_equal(manifest_ids[pos], ids):
        raise KeyError(f"ids not in the manifest: {ids[manifest_ids[pos] != ids][:5].tolist()}")
    return manifest.column(column).take(pa.array(pos)).to_numpy(zero_copy_only=False)


def training_rows(manifest: pa.Table, store, ids: np.ndarray, search, k: int, min_positives: int,
                  block_rows: int = 8192) -> dict:
    """Labels, URIs, neighbours and anchors of the training rows ``ids`` of ``store`` (row order = ``ids``'s),
    their globals streamed through ``search`` ``block_rows`` at a time."""
    labels = row_values(manifest, ids).astype(np.int64)
    neighbours = training_neighbours(search, store.take_global_blocks(ids, block_rows), ids, k)
    anchors = eligible_anchors(neighbours, labels, min_positives)
    return {"ids": ids, "labels": labels, "uris": row_values(manifest, ids, "uri"), "neighbours": neighbours,
            "anchors": anchors}


def holdout_split(labels: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """Boolean mask of the rows whose label is among ``n_labels`` held out (seeded, labels with >= 2 images);
    at most a quarter of the labels, so that a small gallery keeps most of its images for training."""
    values, counts = np.unique(labels, return_counts=True)
    candidates = values[counts >= 2]
    size = min(n_labels, max(1, len(candidates) // 4))
    held = np.random.default_rng(seed).choice(candidates, size=size, replace=False)
    return np.isin(labels, held)


def _ranking_set(bench: Benchmark, query_table, gallery_table) -> dict:
    from rrt_dist.eval.runner import global_rankings
    from rrt_dist.schema import NO_ID

    query_ids, queries = query_table.globals()
    ranked, scores = global_rankings(bench, query_ids, queries, {"gallery": gallery_table}, None, False)
    row_ids = bench.queries.column("id").to_numpy().copy()
    row_ids[~np.isin(row_ids, query_ids)] = NO_ID
    return {"bench": bench, "query_ids": row_ids, "ranked": ranked, "scores": scores,
            "query": (query_table.uri, query_table.version),
            "gallery": [(gallery_table.uri, gallery_table.version)]}


def validation_set(cfg, manifest: pa.Table, store, ids: np.ndarray) -> tuple[dict, np.ndarray]:
    """The validation set (see ``rrt_dist.train.core.validate``) and the mask of training rows it keeps out: the
    synthetic benchmark's ``val`` split when training on its labels, else labels (self-supervised: source
    images with their views) held out of the training rows and scored leave-one-out."""
    if get_dataset(cfg.dataset.name).validation_split and training_pairs(cfg) == "labels":
        val_cfg = OmegaConf.merge(cfg.dataset, {"split": "val", "distractors": {"name": "none"}})
        bench = load_benchmark(val_cfg)
        stores = backbone_features(cfg, bench, cfg.backbone)
        return _ranking_set(bench, stores["query"], stores["gallery"]), np.zeros(len(ids), bool)
    labels = row_values(manifest, ids).astype(np.int64)
    held = holdout_split(labels, cfg.train.val_holdout_labels, cfg.train.seed)
    held_manifest = manifest.filter(pa.array(np.isin(manifest.column("id").to_numpy(), ids[held])))
    bench = Benchmark(name=f"{cfg.dataset.name}-holdout", queries=held_manifest, gallery=held_manifest,
                      protocol=MetricLearningProtocol(held_manifest.column("label").to_numpy()), exclude_self=True)
    held_table = FeatureStore(store.uri, store.version, only=ids[held])
    return _ranking_set(bench, held_table, held_table), held


def neighbour_search(cfg, store, ids: np.ndarray, block_rows: int = 8192):
    """Search over the training rows ``ids`` of ``store``: exact (their globals streamed block by block, in id
    order), or the sharded index in ``index.mode=sharded`` (large tables)."""
    if cfg.index.mode == "exact":
        return block_searcher(lambda: store.take_global_blocks(ids, block_rows), len(ids)), None
    from .index import ensure_index

    # indexed: the training rows only; held-out rows or other selections' would take neighbour places
    rows = FeatureStore(store.uri, store.version, only=ids)
    index = ensure_index(cfg.index, f"{cfg.dataset.name}-train", [rows], OmegaConf.to_object(cfg.ray.search))
    return index.search, index


def mining_settings(cfg) -> dict:
    """What decides the pairs ``train.pairs=gv`` mines beyond ``train.gv``: GV's options and, in
    ``index.mode=sharded``, the index that finds the neighbours."""
    from .rerank import scorer_options

    return {"gv": scorer_options(cfg.reranker, "gv"),
            **({"index": OmegaConf.to_container(cfg.index, resolve=True)} if cfg.index.mode != "exact" else {})}


def gallery_table(cfg) -> tuple[pa.Table, FeatureStore]:
    """The evaluated gallery's manifest (distractors left out) and its feature table, extracted where missing: the
    images ``train.pairs=gv`` mines and trains on (the table evaluation reads, no other extraction)."""
    from .features import benchmark_manifests, ensure_tables, extract_settings, table_paths

    bench = load_benchmark(cfg.dataset, start_ray=partial(init_ray, cfg.ray))
    init_ray(cfg.ray)
    manifest = benchmark_manifests(bench)["gallery"]
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    settings = extract_settings(cfg.backbone)
    path = table_paths(bench, cfg.features_dir, cfg.backbone.name, options, settings)["gallery"]
    return manifest, ensure_tables({"gallery": manifest}, {"gallery": path}, cfg.backbone.name, options, settings,
                                   OmegaConf.to_object(cfg.ray.extract))["gallery"]


def gv_training(cfg) -> tuple:
    """:func:`prepare_training` of ``train.pairs=gv``: mine the gallery's pairs (``rrt_dist.pipelines.mine``), hold
    out ``train.gv.holdout`` of its images, choose the inlier threshold on their pairs (Otsu's, unless
    ``train.gv.min_inliers`` sets it), and build the training rows' pair lists (held-out images in no training pair)
    and the validation set: each held-out image's mined top-k, reranked, with GV's accepted pairs as positives."""
    from rrt_dist.datasets.base import PositivesProtocol
    from rrt_dist.index.core import rows_digest
    from rrt_dist.train.gv_pairs import holdout_rows, otsu_threshold, pair_rows

    from .mine import mine_pairs, mined_blocks
    from .rerank import open_pool

    gv = cfg.train.gv
    manifest, store = gallery_table(cfg)
    ids = np.sort(store.ids)
    decisive = {"fingerprint": store.fingerprint, "rows": rows_digest(*store.sources()), "seed": cfg.train.seed,
                **{k: gv[k] for k in ("neighbours", "random")}, **mining_settings(cfg)}
    folder = Path(gv.root) / hashlib.sha1(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]
    search, index = neighbour_search(cfg, store, ids)
    resources = OmegaConf.to_object(cfg.ray.rerank)
    try:
        mine_pairs(store, ids, search, lambda: open_pool(cfg.reranker, "gv", {"query": store, "gallery": store},
                                                         None, resources),
                   folder, gv.neighbours, gv.random, cfg.train.seed, gv.block_rows)
    finally:
        if index is not None:
            index.close()
    # one pass over the blocks: each pair as (anchor, candidate) positions in ids, int32 (1M x 60 pairs: 720 MB)
    parts = [(np.searchsorted(ids, b.column("anchor").to_numpy()).astype(np.int32),
              np.searchsorted(ids, b.column("candidate").to_numpy()).astype(np.int32),
              b.column("inliers").to_numpy(), b.column("random").to_numpy(zero_copy_only=False),
              b.column("global").to_numpy()) for b in mined_blocks(folder)]
    anchor, candidate, inliers, is_random, global_score = (np.concatenate(c) for c in zip(*parts))
    held = holdout_rows(len(ids), gv.holdout, gv.max_holdout, cfg.train.seed)
    held_pair = held[anchor]
    threshold = gv.min_inliers or otsu_threshold(inliers[held_pair])
    train_row = np.full(len(ids), -1, np.int64)
    train_row[~held] = np.arange(int((~held).sum()))
    rows = {"ids": ids[~held], **pair_rows(train_row[anchor], train_row[candidate], inliers, threshold,
                                           int((~held).sum()))}
    rows["mining"] = {"folder": str(folder), "threshold": int(threshold), "pairs": int(len(anchor)),
                      "accepted": int((inliers >= threshold).sum()), "held_out_images": int(held.sum()),
                      "random_accepted": int((inliers[is_random] >= threshold).sum())}
    log.info("GV-taught pairs (%s): %d mined, %d accepted at >= %d inliers (chosen on %d held-out images' pairs); "
             "%d training images, %d anchors, %d positive pairs an epoch", folder, len(anchor),
             rows["mining"]["accepted"], threshold, held.sum(), len(rows["ids"]), len(rows["anchors"]),
             len(rows["units"]))

    # validation: the held-out images with at least one accepted neighbour, their top-k in global order
    top = held_pair & ~is_random
    queries = np.unique(anchor[top & (inliers >= threshold)])
    if len(queries) == 0:
        raise ValueError(f"GV accepts no pair among the {held.sum()} held-out images' top-{gv.neighbours} at >= "
                         f"{threshold} inliers: nothing to validate on (more images, train.gv.holdout, or "
                         "train.gv.min_inliers)")
    width = gv.neighbours
    ranked = np.full((len(queries), width), NO_ID, np.int64)
    scores = np.full((len(queries), width), -np.inf, np.float32)
    positives = []
    for q, a in enumerate(queries):
        mine = np.flatnonzero(top & (anchor == a))
        mine = mine[np.argsort(-global_score[mine], kind="stable")]
        ranked[q, :len(mine)], scores[q, :len(mine)] = ids[candidate[mine]], global_score[mine]
        positives.append(ids[candidate[mine[inliers[mine] >= threshold]]])
    in_view = np.isin(manifest.column("id").to_numpy(), np.concatenate([ids[queries], ranked[ranked != NO_ID]]))
    gallery = manifest.filter(pa.array(in_view))
    query_manifest = manifest.filter(pa.array(np.isin(manifest.column("id").to_numpy(), ids[queries])))
    query_manifest = query_manifest.take(np.argsort(query_manifest.column("id").to_numpy(), kind="stable"))
    gallery_ids = gallery.column("id").to_numpy()
    order = np.argsort(gallery_ids, kind="stable")
    bench = Benchmark(name=f"{cfg.dataset.name}-gv-holdout", queries=query_manifest, gallery=gallery,
                      protocol=PositivesProtocol([order[np.searchsorted(gallery_ids[order], p)] for p in positives]))
    table = (store.uri, store.version)
    val = {"bench": bench, "query_ids": ids[queries], "ranked": ranked, "scores": scores, "query": table,
           "gallery": [table]}
    return store, rows, val


def prepare_training(cfg) -> tuple:
    """(training table, rows, validation set): everything the workers need, computed once on the driver."""
    if training_pairs(cfg) == "gv":
        store, rows, val = gv_training(cfg)
        if len(rows["units"]) < cfg.train.num_workers * cfg.train.batch_size:
            raise ValueError(f"GV accepts only {len(rows['units'])} pairs of training images that also have a pair it "
                             f"rejects: too few for {cfg.train.num_workers} workers x {cfg.train.batch_size} triplets "
                             "(a larger gallery, train.gv.neighbours, or train.gv.min_inliers)")
        return store, rows, val
    manifest, store = training_features(cfg)
    # Rows in id order, not table order (which follows extraction): the same images give the same
    # anchors and triplets whichever way the table was filled, so seeded runs and resumes reproduce.
    # Only the table's ids are loaded; its globals stream through search (GLDv2's would be 12 GB).
    listed = np.isin(store.ids, manifest.column("id").to_numpy())     # the table may hold rows of other selections
    ids = np.sort(store.ids[listed])
    val, held = validation_set(cfg, manifest, store, ids)
    search, index = neighbour_search(cfg, store, ids[~held])
    rows = training_rows(manifest, store, ids[~held], search, cfg.train.neighbours, min_positives(cfg))
    if index is not None:
        index.close()
    log.info("training rows: %d images, %d labels, %d anchors; validation on %s", len(rows["ids"]),
             len(np.unique(rows["labels"])), len(rows["anchors"]), val["bench"].name)
    if len(rows["anchors"]) < cfg.train.num_workers * cfg.train.batch_size:
        raise ValueError(f"only {len(rows['anchors'])} training images have >= {min_positives(cfg)} same-label "
                         f"images among their top-{cfg.train.neighbours}: too few for {cfg.train.num_workers} workers x "
                         f"{cfg.train.batch_size} triplets")
    return store, rows, val


def _best(result) -> tuple:
    """The run's best checkpoint by validation score (ties: the later epoch) and its metrics."""
    if result.error:
        raise result.error
    unscored = [cm[1].get("epoch") for cm in result.best_checkpoints if "val_score" not in cm[1]]
    if unscored:           # every epoch reports its validation; one without it must not pass as a score of 0
        raise RuntimeError(f"training run {result.path}: checkpoints of epochs {unscored} carry no validation score")
    return max(result.best_checkpoints, key=lambda cm: (cm[1]["val_score"], cm[1]["epoch"]))


def _history(result) -> list[dict]:
    from rrt_dist.train.core import load_trainer_state

    with result.checkpoint.as_directory() as folder:
        return load_trainer_state(folder)["history"]


def train_joint(cfg, store, rows: dict, val: dict, name: str, out_dir: Path) -> tuple:
    """The SOP joint protocol: one run per stage of ``train.joint_stages`` (``<name>-<stage>``), each starting
    from the previous stage's best weights; the final backbone and projection exported to ``out_dir``.
    Returns (last run's result, its best checkpoint and metrics, history over all stages, exported files)."""
    import torch

    from rrt_dist.features.grid import DenseGrid
    from rrt_dist.train.distributed import fit
    from rrt_dist.train.joint import JointReranker, export_backbone

    if cfg.backbone.name != "dense-grid":
        raise ValueError(f"joint training finetunes a dense-grid backbone (backbone=dense_grid_r50), not {cfg.backbone.name!r}")
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    settings, init, history = train_settings(cfg), None, []
    for stage in cfg.train.joint_stages:
        result = fit(cfg.train, store, rows, val, f"{name}-{stage}", settings, task="joint",
                     task_config={"stage": stage, "init": init, "backbone": {"name": cfg.backbone.name, "options": options},
                                  "crop_scale": list(cfg.train.crop_scale), "data_cpus": cfg.train.data_cpus},
                     resources=OmegaConf.to_object(cfg.ray.train))
        best, metrics = _best(result)
        init = str(out_dir / f"joint_{stage}.pt")
        with best.as_directory() as folder:
            shutil.copy(Path(folder) / "joint.pt", init)
        offset = len(history)
        history += [{**h, "epoch": h["epoch"] + offset, "stage": stage} for h in _history(result)]
    model = JointReranker(DenseGrid(**{**options, "device": "cpu"}), **settings.model)
    model.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    return result, (best, {**metrics, "epoch": metrics["epoch"] + offset}), history, export_backbone(model, out_dir)


def train_rrt(cfg, out_dir: str | Path) -> dict:
    """Train RRT as ``cfg.train`` says (resuming a run of the same name); copy the best checkpoint to
    ``out_dir/rrt_best.pt`` and plot the curve. Returns ``checkpoint``, ``history``, ``best_epoch``, ``run``
    (and, for joint training, ``backbone``: the finetuned extractor's ``checkpoint`` and ``local_projection``)."""
    from rrt_dist.eval.figures import training_curve
    from rrt_dist.train.distributed import fit

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store, rows, val = prepare_training(cfg)
    name = run_name(cfg)
    exported = None
    if cfg.train.joint_stages:
        result, (best, metrics), history, exported = train_joint(cfg, store, rows, val, name, out_dir)
    else:
        result = fit(cfg.train, store, rows, val, name, train_settings(cfg),
                     task="gv_pairs" if training_pairs(cfg) == "gv" else "features",
                     resources=OmegaConf.to_object(cfg.ray.train))
        (best, metrics), history = _best(result), _history(result)
    with best.as_directory() as folder:
        shutil.copy(Path(folder) / "model.pt", out_dir / "rrt_best.pt")
    curve = training_curve(history, out_dir / "training_curve.png")
    print(f"trained RRT ({name}): best epoch {metrics['epoch']} (validation {100 * metrics['val_score']:.2f}) "
          f"-> {out_dir / 'rrt_best.pt'}")
    return {"checkpoint": str(out_dir / "rrt_best.pt"), "history": history, "best_epoch": metrics["epoch"],
            "run": f"{result.path}", "curve": str(curve), "anchors": int(len(rows["anchors"])),
            "training_images": int(len(rows["ids"])), **({"backbone": exported} if exported else {}),
            **({"gv_pairs": rows["mining"]} if "mining" in rows else {})}


def trained_reranker(cfg) -> dict | None:
    """``reranker.checkpoint=train``: train RRT (or reuse the finished run) and point the config at it.

    Returns what ``train_rrt`` returns, for the report (None when the checkpoint is a path or unused).
    """
    from rrt_dist.rerank.methods import parse_method

    uses_rrt = any(m.reranker and m.reranker.name == "rrt" for m in map(parse_method, cfg.reranker.methods))
    if cfg.reranker.checkpoint != "train" or not uses_rrt:
        return None
    if cfg.train.joint_stages:
        # Its RRT embeds positions in the network input's frame, while tables store original-image pixels.
        raise ValueError("evaluate reranks stored descriptors; a jointly finetuned model is trained with the "
                         "train_rrt job, and its exported backbone.pt / local_projection.npz extract new tables")
    training = train_rrt(cfg, cfg.output_dir)
    with open_dict(cfg):
        cfg.reranker.checkpoint = training["checkpoint"]
    return training


# ----------------------------------------------------------------------------- metric learning (extractor)

def metric_training_set(cfg) -> tuple[dict, dict]:
    """(rows, validation set) of metric-learning training: the dataset's labelled training split with
    ``train.val_holdout_labels`` classes held out (at most a quarter; never test classes). ``rows``: ``ids``,
    ``uris`` and ``labels`` renumbered 0..n-1; validation: the held-out images as a leave-one-out benchmark, decoded
    and prepared once as the extractor prepares them."""
    from rrt_dist.datasets import load_training_set
    from rrt_dist.features import create_preparer
    from rrt_dist.features.core import decode_and_prepare

    _, manifest = load_training_set(cfg.dataset, start_ray=partial(init_ray, cfg.ray))
    init_ray(cfg.ray)
    manifest = decodable_rows(require_labels(manifest, "labels"), "metric training set")
    manifest = manifest.sort_by("id")                               # id order: seeded batches do not depend on listing
    labels = manifest.column("label").to_numpy()
    held = holdout_split(labels, cfg.train.val_holdout_labels, cfg.train.seed)
    train = manifest.filter(pa.array(~held))
    _, classes = np.unique(labels[~held], return_inverse=True)
    rows = {"ids": train.column("id").to_numpy(), "uris": np.asarray(train.column("uri").to_pylist()),
            "labels": classes.astype(np.int64)}
    held_manifest = manifest.filter(pa.array(held))
    bench = Benchmark(name=f"{cfg.dataset.name}-holdout", queries=held_manifest, gallery=held_manifest,
                      protocol=MetricLearningProtocol(held_manifest.column("label").to_numpy()), exclude_self=True)
    preparer = create_preparer(cfg.backbone.name, **OmegaConf.to_container(cfg.backbone.options, resolve=True))
    images = np.stack([decode_and_prepare(row["uri"], row["bbox"], preparer)[0].image
                       for row in held_manifest.select(["uri", "bbox"]).to_pylist()])
    log.info("metric training: %d images of %d classes; validation on %d images of %d held-out classes",
             len(classes), classes.max() + 1, len(images), len(np.unique(labels[held])))
    return rows, {"bench": bench, "images": images}


def metric_run_name(cfg, rows: dict, val: dict) -> str:
    """:func:`run_name` of a metric-learning run: its settings, the structural transport, and which image files it
    trains and validates on (id and file identity), so a changed, added or repaired image starts another run
    instead of resuming one trained on other pixels."""
    from rrt_dist.index.core import rows_digest

    from .extract import file_identities

    held = val["bench"].gallery
    ids = np.concatenate([rows["ids"], held.column("id").to_numpy()])
    uris = [*rows["uris"].tolist(), *held.column("uri").to_pylist()]
    return run_name(cfg, "ml", {"structural": OmegaConf.to_container(cfg.reranker.structural, resolve=True),
                                "images": rows_digest(ids, file_identities(uris))})


def train_metric(cfg, out_dir: str | Path) -> dict:
    """Train the extractor with ``train.metric``'s loss (resuming a run of the same name) and export the best
    epoch (validation MAP@R) as the extractor's options. Returns ``backbone`` (the options to extract with),
    ``history``, ``best_epoch``, ``run``, ``curve``."""
    import torch

    from rrt_dist.eval.figures import training_curve
    from rrt_dist.features import create_extractor
    from rrt_dist.train.distributed import fit
    from rrt_dist.train.metric import TRAINABLE_EXTRACTORS, MetricEmbedder, export_extractor

    if cfg.backbone.name not in TRAINABLE_EXTRACTORS:
        raise ValueError(f"metric-learning training trains a dense-grid or vit extractor (backbone=dense_grid_r50, "
                         f"cvt13, deit_s, swin_t), not {cfg.backbone.name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    structural = OmegaConf.to_container(cfg.reranker.structural, resolve=True)
    rows, val = metric_training_set(cfg)
    name = metric_run_name(cfg, rows, val)
    result = fit(cfg.train, None, rows, val, name, train_settings(cfg), task="metric",
                 task_config={"metric": OmegaConf.to_container(cfg.train.metric, resolve=True),
                              "backbone": {"name": cfg.backbone.name, "options": options}, "structural": structural,
                              "crop_scale": list(cfg.train.crop_scale), "data_cpus": cfg.train.data_cpus},
                 resources=OmegaConf.to_object(cfg.ray.train))
    (best, metrics), history = _best(result), _history(result)
    model = MetricEmbedder(create_extractor(cfg.backbone.name, **{**options, "device": "cpu"}))
    with best.as_directory() as folder:
        model.load_state_dict(torch.load(Path(folder) / "metric.pt", map_location="cpu", weights_only=True)["model"])
    exported = export_extractor(model, out_dir)
    curve = training_curve(history, out_dir / "training_curve.png", loss=f"loss ({cfg.train.metric.loss})",
                           accuracy="batch P@1", score="validation MAP@R (held-out classes)")
    print(f"trained extractor ({name}): best epoch {metrics['epoch']} (validation MAP@R "
          f"{100 * metrics['val_score']:.2f}) -> {exported['checkpoint']}")
    return {"backbone": exported, "history": history, "best_epoch": metrics["epoch"], "run": f"{result.path}",
            "curve": str(curve), "training_images": int(len(rows["labels"]))}
