"""Serve ingested galleries over HTTP: the search API and the search page (Ray Serve).

    rrt-dist serve gallery.name=shop                              # http://127.0.0.1:8000/ (loopback, no token)
    RRT_SERVE_TOKEN=$(openssl rand -hex 32) rrt-dist serve gallery.name=shop serve.host=0.0.0.0
    rrt-dist serve serve.galleries=[shop,archive] reranker.checkpoint=/data/rrt.pth serve.reranker.num_gpus=1

    curl -s -X POST --data-binary @query.jpg 'http://127.0.0.1:8000/search?k=10&rerank=gv'

Every gallery served must have been ingested with the backbone given here (the same options). A new index
version that an ingest commits is served within serve.refresh_s seconds, without a restart.
"""
from __future__ import annotations

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> None:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from hydra.core.hydra_config import HydraConfig

    from rrt_dist.pipelines.serve import serve_galleries

    serve_galleries(cfg, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])


main = entry_point(run)

if __name__ == "__main__":
    main()
