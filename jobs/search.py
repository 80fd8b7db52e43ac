"""Search a gallery with query images, or a benchmark's queries in its sharded index.

    rrt-dist search gallery.name=shop search.queries=/data/queries            # folder, CSV or Parquet of images
    rrt-dist search gallery.name=shop search.queries=/data/q.csv search.rerank=gv
    rrt-dist search                                         # the synthetic benchmark's queries, top-100
    rrt-dist search index.expand_queries=true               # with alpha-QE (reranker.aqe: n=2, alpha=0.3)

Output: a gallery search writes ``<output_dir>/results.parquet`` and ``results.csv`` (query path, rank, gallery
id and path, global score, reranked order, index version) and ``results.html`` (the first search.page_queries
queries, as thumbnails); its queries are searched search.chunk at a time, each chunk committed as it ends, so the
same command finishes a run that was killed. A benchmark search writes ``neighbours.parquet`` (query_id,
neighbour_ids, scores; best first).
"""
from __future__ import annotations

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.search import search_benchmark, search_gallery

    return search_gallery(cfg) if cfg.search.queries else search_benchmark(cfg)


main = entry_point(run)

if __name__ == "__main__":
    main()
