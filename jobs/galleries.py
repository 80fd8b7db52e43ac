"""List the galleries under ``gallery.root``: rows, index version and size, extractor fingerprint, ingests.

    rrt-dist galleries [gallery.root=/data/rrt-dist/galleries]
"""
from __future__ import annotations

import datetime
import json

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> list:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.ingest import list_galleries

    galleries = list_galleries(cfg.gallery.root)
    if not galleries:
        print(f"no gallery under {cfg.gallery.root}")
    for g in galleries:
        when = datetime.datetime.fromtimestamp(g["last_ingest"]).isoformat(timespec="seconds") if g["last_ingest"] else "-"
        if g["state"] != "ready":
            print(f"{g['name']}: {g['state']} ({g['ingests']} ingests, last {when})")
            continue
        print(f"{g['name']}: {g['rows']} rows, index v{g['index_version']} ({g['index_rows']} rows, "
              f"{g.get('factory', '-')}, {g.get('shards', 0)} shards), extractor {g['fingerprint']}, "
              f"{g['ingests']} ingests, last {when}")
    print(json.dumps(galleries))
    return galleries


main = entry_point(run)

if __name__ == "__main__":
    main()
