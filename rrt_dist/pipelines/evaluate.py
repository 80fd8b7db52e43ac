"""The evaluation a report is made of: feature tables -> (training) -> search (± αQE) -> rerank -> metrics ->
report (JSON, Markdown, figures), identified by its dataset, splits, backbone, timings and what was reranked."""
from __future__ import annotations

import math
import time
from pathlib import Path

from omegaconf import OmegaConf

from rrt_dist.eval.figures import qualitative_figure
from rrt_dist.eval.methods import evaluate_methods, headline
from rrt_dist.rerank.methods import parse_method
from rrt_dist.eval.report import render_markdown, run_section, training_section, write_report
from rrt_dist.eval.runner import settings_of

from .features import benchmark_features, global_matrix, unreadable_counts
from .index import setting_indexes
from .rerank import pools_for
from .train import trained_reranker


def qualitative_row(rows: dict, examples: dict, setting: str, wanted: str | None) -> str | None:
    """The reranked row the figure shows: that of method ``wanted``, else the best by headline in ``setting``."""
    reranked = [label for label in examples if "top-" in label]
    if wanted:
        return next(r for r in reranked if r.startswith(f"{parse_method(wanted).label} (top-"))
    scored = [(headline(rows[r][setting]), r) for r in reranked if not math.isnan(headline(rows[r][setting]))]
    return max(scored)[1] if scored else None


def evaluate(cfg) -> dict:
    """Run the evaluation ``cfg`` describes and write its report to ``cfg.output_dir``; returns the payload."""
    timings, start = {}, time.perf_counter()
    bench, stores = benchmark_features(cfg)
    timings["features_s"] = time.perf_counter() - start
    t = time.perf_counter()
    training = trained_reranker(cfg)                          # reranker.checkpoint=train: RRT trained first
    if training:
        timings["training_s"] = time.perf_counter() - t
    t = time.perf_counter()
    query_ids, queries = global_matrix(stores, ["query"])
    gallery_ids, gallery = global_matrix(stores, ["gallery", "distractor"])
    pools = pools_for(cfg.reranker, stores)
    indexes = setting_indexes(cfg.index, bench, stores)      # none when index.k is unset: exact full ranking
    examples: dict = {}
    rows = evaluate_methods(bench, query_ids, queries, gallery_ids, gallery, cfg.reranker, pools, cfg.index.k,
                            examples, {setting: index.search for setting, index in indexes.items()})
    for closable in [*pools.values(), *indexes.values()]:
        closable.close()
    timings["search_rerank_s"] = time.perf_counter() - t
    settings = list(settings_of(bench))
    unreadable = unreadable_counts(bench, stores)
    shown = qualitative_row(rows, examples, settings[0], cfg.reranker.qualitative_row)
    run = {"dataset": bench.name, "root": str(Path(bench.info["root"]).resolve()),
           "queries": bench.queries.num_rows, "gallery": bench.gallery.num_rows - bench.n_distractors,
           "distractors": bench.n_distractors, "leave_one_out": bench.exclude_self, "unreadable": unreadable,
           "backbone": {"name": cfg.backbone.name, "fingerprint": stores["gallery"].fingerprint,
                        "options": OmegaConf.to_container(cfg.backbone.options, resolve=True)},
           "search": "exact (whole gallery)" if not cfg.index.k else f"{cfg.index.factory}, top-{cfg.index.k}",
           "qualitative_row": shown, "timings": timings}
    if bench.protocol.name == "metric_learning":
        run["metric_learning_r"] = ("the query counted in R (the ViT-reranking reference)" if
                                    bench.protocol.r_includes_query else "the other images of the label (standard)")
    markdown = render_markdown(bench.protocol.name, rows, settings, f"{bench.name}: {cfg.backbone.name} descriptors")
    markdown += "\n" + run_section(run)
    payload = {"benchmark": bench.name, "protocol": bench.protocol.name, "settings": settings, "results": rows,
               "run": run,
               "feature_tables": {k: {"uri": s.uri, "version": s.version, "rows": len(s)} for k, s in stores.items()},
               "config": OmegaConf.to_container(cfg, resolve=True)}
    if training:
        payload["training"] = training
        markdown += "\n" + training_section(training)
    json_path, _ = write_report(cfg.output_dir, payload, markdown)
    if shown:
        figure = qualitative_figure(bench, examples[next(iter(examples))], examples[shown],
                                    Path(cfg.output_dir) / "qualitative.png", (next(iter(examples)), shown))
        print(f"qualitative results ({shown}): {figure}")
    print(markdown)
    print(f"report: {json_path}")
    return payload
