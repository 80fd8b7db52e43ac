"""Evaluate retrieval on a benchmark: extract (if missing) -> search (± αQE) -> rerank (GV / RRT) -> metrics -> report.

    rrt-dist evaluate                                   # synthetic benchmark, embedded Ray
    rrt-dist evaluate experiment=demo                   # + RRT trained on its training split (make demo)
    rrt-dist evaluate dataset=roxford5k dataset.root=/data/roxford5k dataset/distractors=r1m \
        dataset.distractors.root=/data/revisitop1m backbone=delg_r50 ray=cluster
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import rrt_dist.config  # noqa: F401  (registers the structured configs)
from rrt_dist.eval.report import render_markdown, training_section, write_report
from rrt_dist.eval.figures import qualitative_figure
from rrt_dist.eval.methods import evaluate_methods
from rrt_dist.eval.runner import settings_of
from rrt_dist.pipelines.index import setting_indexes
from rrt_dist.pipelines.rerank import pools_for
from rrt_dist.pipelines.features import benchmark_features, global_matrix
from rrt_dist.pipelines.train import trained_reranker


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> dict:
    bench, stores = benchmark_features(cfg)
    training = trained_reranker(cfg)                          # reranker.checkpoint=train: RRT trained first
    query_ids, queries = global_matrix(stores, ["query"])
    gallery_ids, gallery = global_matrix(stores, ["gallery", "distractor"])
    pools = pools_for(cfg.reranker, stores)
    indexes = setting_indexes(cfg.index, bench, stores)      # none when index.k is unset: exact full ranking
    examples: dict = {}
    rows = evaluate_methods(bench, query_ids, queries, gallery_ids, gallery, cfg.reranker, pools, cfg.index.k,
                            examples, {setting: index.search for setting, index in indexes.items()})
    for closable in [*pools.values(), *indexes.values()]:
        closable.close()
    settings = list(settings_of(bench))
    markdown = render_markdown(bench.protocol.name, rows, settings, f"{bench.name}: {cfg.backbone.name} descriptors")
    payload = {"benchmark": bench.name, "protocol": bench.protocol.name, "settings": settings, "results": rows,
               "feature_tables": {k: {"uri": s.uri, "version": s.version, "rows": len(s)} for k, s in stores.items()},
               "config": OmegaConf.to_container(cfg, resolve=True)}
    if training:
        payload["training"] = training
        markdown += "\n" + training_section(training)
    json_path, _ = write_report(cfg.output_dir, payload, markdown)
    reranked = [label for label in examples if "top-" in label]
    if reranked:
        figure = qualitative_figure(bench, examples[next(iter(examples))], examples[reranked[-1]],
                                    Path(cfg.output_dir) / "qualitative.png", ("global", reranked[-1]))
        print(f"qualitative results: {figure}")
    print(markdown)
    print(f"report: {json_path}")
    return payload


if __name__ == "__main__":
    main()
