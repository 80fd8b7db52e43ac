"""The evaluation a report is made of: feature tables -> (training) -> search (± αQE) -> rerank -> metrics ->
report (JSON, Markdown, figures), identified by its dataset, splits, backbone, timings and what was reranked."""
from __future__ import annotations

import math
import time
from pathlib import Path

from omegaconf import OmegaConf

from rrt_dist.devices import exact_device
from rrt_dist.eval.costs import add_storage
from rrt_dist.eval.figures import qualitative_figure, structural_figure, structural_pairs
from rrt_dist.eval.methods import evaluate_methods, headline
from rrt_dist.eval.report import render_markdown, run_section, training_section, write_report
from rrt_dist.eval.runner import settings_of
from rrt_dist.rerank.methods import parse_method

from .browse import write_browse
from .features import absolute_location, benchmark_features, global_matrix, patch_features, unreadable_counts
from .index import setting_indexes
from .rerank import open_pool, scorer_options
from .train import trained_reranker


def qualitative_row(rows: dict, examples: dict, setting: str, wanted: str | None) -> str | None:
    """The reranked row the figure shows: that of method ``wanted``, else the best by headline in ``setting``."""
    reranked = [label for label in examples if "top-" in label]
    if wanted:
        return next(r for r in reranked if r.startswith(f"{parse_method(wanted).label} (top-"))
    scored = [(headline(rows[r][setting]), r) for r in reranked if not math.isnan(headline(rows[r][setting]))]
    return max(scored)[1] if scored else None


def check_evaluation(cfg) -> None:
    """Refuse, before any work, what an evaluation could not compute or would silently leave out: a reranker that
    reads what its extractor's tables do not hold, index options it would ignore, a reranking deeper than the
    sharded search keeps."""
    from rrt_dist.features import extractor_provides
    from rrt_dist.rerank.methods import check_inputs, parse_method
    from rrt_dist.schema import ConfigError

    check_inputs(list(cfg.reranker.methods), {key: extractor_provides(OmegaConf.select(cfg, key).name)
                                              for key in ("backbone", "reranker.patch_backbone")
                                              if OmegaConf.select(cfg, key)})

    index = cfg.index
    if index.dba_n and index.mode == "exact":
        raise ConfigError("index.dba_n: database-side augmentation changes the indexed vectors; index.mode=exact "
                          "ranks the stored ones. Add index.mode=sharded (index.factory=Flat keeps it exact)")
    if index.expand_queries:
        raise ConfigError("index.expand_queries is the search job's alpha-QE; evaluation reports alpha-QE as its own "
                          "rows: reranker.methods=[global,aqe,...] (both read reranker.aqe)")
    methods = [parse_method(m) for m in cfg.reranker.methods]
    if any(m.reranker and "checkpoint" in m.reranker.inputs for m in methods) and cfg.reranker.checkpoint not in (None, "train"):
        from rrt_dist.models.rrt import check_checkpoint

        check_checkpoint(cfg.reranker.checkpoint)          # loaded here once, not first in every actor after search
    reranked = any(m.reranker for m in methods)
    if index.mode == "sharded" and reranked and cfg.reranker.depth > index.neighbours:
        raise ConfigError(f"reranker.depth={cfg.reranker.depth} > index.neighbours={index.neighbours}: the sharded "
                          f"search keeps {index.neighbours} candidates per query; raise index.neighbours or lower "
                          f"reranker.depth")


def evaluate(cfg, training: dict | None = None) -> dict:
    """Run the evaluation ``cfg`` describes and write its report to ``cfg.output_dir``; returns the payload.
    ``training``: how the evaluated extractor was trained (``train_metric``), for the report."""
    check_evaluation(cfg)
    timings, start = {}, time.perf_counter()
    bench, stores = benchmark_features(cfg)
    patch_stores = patch_features(cfg, bench, stores)
    timings["features_s"] = time.perf_counter() - start
    t = time.perf_counter()
    reranker_training = trained_reranker(cfg)                 # reranker.checkpoint=train: RRT trained first
    if reranker_training:
        training = reranker_training
        timings["training_s"] = time.perf_counter() - t
    t = time.perf_counter()
    query_ids, queries = global_matrix(stores, ["query"])       # the gallery's are streamed, never loaded whole
    galleries = {name: stores[name] for name in ("gallery", "distractor") if name in stores}
    # none in index.mode=exact: the exact ranking of the whole gallery
    indexes = setting_indexes(cfg.index, bench, stores, OmegaConf.to_object(cfg.ray.search))
    rerank_resources = OmegaConf.to_object(cfg.ray.rerank)
    k_search = cfg.index.neighbours if indexes else None
    examples: dict = {}
    per_query: dict = {}
    costs: dict = {}
    try:
        rows = evaluate_methods(bench, query_ids, queries, galleries, cfg.reranker,
                                lambda name: open_pool(cfg.reranker, name, stores, patch_stores, rerank_resources),
                                k_search, examples, {setting: index.search for setting, index in indexes.items()},
                                exact_device(cfg.index.exact_device), per_query, costs)
    finally:                       # the shard actors stop however the evaluation ends
        for index in indexes.values():
            index.close()
    timings["search_rerank_s"] = time.perf_counter() - t
    settings = list(settings_of(bench))
    rerankers = {method.reranker.name for method in map(parse_method, cfg.reranker.methods) if method.reranker}
    unreadable = unreadable_counts(bench, stores)
    shown = qualitative_row(rows, examples[settings[0]], settings[0], cfg.reranker.qualitative_row)
    run = {"dataset": bench.name, "root": absolute_location(bench.info["root"]),
           "queries": bench.queries.num_rows, "gallery": bench.gallery.num_rows - bench.n_distractors,
           "distractors": bench.n_distractors, "leave_one_out": bench.exclude_self, "unreadable": unreadable,
           "backbone": {"name": cfg.backbone.name, "fingerprint": stores["gallery"].fingerprint,
                        "options": OmegaConf.to_container(cfg.backbone.options, resolve=True)},
           **({"patch_backbone": {"name": cfg.reranker.patch_backbone.name,
                                  "fingerprint": patch_stores["gallery"].fingerprint,
                                  "options": OmegaConf.to_container(cfg.reranker.patch_backbone.options, resolve=True)}}
              if patch_stores is not stores else {}),
           "search": "exact (whole gallery)" if not indexes else f"{cfg.index.factory}, top-{cfg.index.neighbours}",
           **({"rrt": {"checkpoint": cfg.reranker.checkpoint,
                       "global_weight": scorer_options(cfg.reranker, "rrt")["global_weight"]}}
              if "rrt" in rerankers else {}),
           "qualitative_row": shown, "timings": timings}
    if bench.protocol.name == "metric_learning":
        run["metric_learning_r"] = ("the query counted in R (the ViT-reranking reference)" if
                                    bench.protocol.r_includes_query else "the other images of the label (standard)")
    global_bytes = add_storage(costs, stores["gallery"].dataset.schema,
                               patch_stores["gallery"].dataset.schema if patch_stores is not stores else None)
    title = f"{bench.name}: {cfg.backbone.name} descriptors"
    markdown = render_markdown(bench.protocol.name, rows, settings, title, costs, global_bytes)
    markdown += "\n" + run_section(run)
    payload = {"benchmark": bench.name, "protocol": bench.protocol.name, "settings": settings, "results": rows,
               "costs": {"global_bytes_per_image": global_bytes, "rows": costs}, "run": run,
               "feature_tables": {k: {"uri": s.uri, "version": s.version, "rows": len(s)} for k, s in stores.items()},
               **({"patch_tables": {k: {"uri": s.uri, "version": s.version, "rows": len(s)}
                                    for k, s in patch_stores.items()}} if patch_stores is not stores else {}),
               "config": OmegaConf.to_container(cfg, resolve=True)}
    if training:
        payload["training"] = training
        markdown += "\n" + training_section(training, run.get("rrt", {}).get("global_weight") or 0.0)
    json_path, _ = write_report(cfg.output_dir, payload, markdown)
    first = examples[settings[0]]
    structural = [label for label in first if label.startswith(("Structural", "αQE + Structural"))]
    if structural:
        options = OmegaConf.to_container(cfg.reranker.structural, resolve=True)
        pairs = structural_pairs(bench, patch_stores, first[structural[0]], options)
        figure = structural_figure(pairs, Path(cfg.output_dir) / "structural.png", options.get("temperature", 0.1))
        print(f"structural similarity maps and matches ({structural[0]}): {figure}")
    if shown:
        figure = qualitative_figure(bench, first[next(iter(first))], first[shown],
                                    Path(cfg.output_dir) / "qualitative.png", (next(iter(first)), shown))
        print(f"qualitative results ({shown}): {figure}")
    page = write_browse(cfg, bench, stores, patch_stores, rows, examples, per_query, title) if cfg.browse.enabled else None
    print(markdown)
    print(f"report: {json_path}")
    if page:
        print(f"results browser: open {page.as_uri()} or run: rrt-dist browse {Path(cfg.output_dir).resolve()}")
    return payload
