"""Ingest new images into a named gallery: extract what its feature table lacks, commit a new index version.

    rrt-dist ingest gallery.name=shop gallery.images=/data/new-photos
    rrt-dist ingest gallery.name=shop gallery.manifest=/data/batch-0042.parquet ray=cluster \
        gallery.root=/data/rrt-dist/galleries index=auto

    rrt-dist ingest gallery.name=shop                   # no new images: re-extract lost rows, commit, upgrade

Rerunning the same command after an interruption finishes the work (committed batches are skipped, the index
gets the rows it lacks); a search service picks the new snapshot up without stopping. A row whose id the gallery
already lists with another path is refused (``gallery.replace=true`` replaces the image).
"""
from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from rrt_dist.runtime import init_ray, entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.gallery import Gallery
    from rrt_dist.pipelines.features import extract_settings
    from rrt_dist.pipelines.ingest import batch_of, ingest

    batch_of(cfg.gallery, Gallery.open(cfg.gallery.root, cfg.gallery.name))  # a bad input ends the job before Ray starts
    init_ray(cfg.ray)
    summary = ingest(cfg.gallery, cfg.backbone.name, OmegaConf.to_container(cfg.backbone.options, resolve=True),
                     extract_settings(cfg.backbone), cfg.index, OmegaConf.to_object(cfg.ray.extract))
    print(f"gallery {summary['gallery']}: {summary['batch']} images in this batch: {summary['new']} new, "
          f"{summary['changed']} changed (extracted again), {summary['skipped']} already there, {summary['failed']} "
          f"unreadable" + (f" (see {summary['errors_table']}, e.g. {summary['error_samples']})"
                           if summary['failed'] else "")
          + (f", {summary['refused']} refused ({next(iter(summary['refused_samples'].values()))})"
             if summary['refused'] else "")
          + (f"; {summary['restored']} lost image(s) extracted again" if summary['restored'] else ""))
    print(f"index version {summary['index_version']} ({summary['index_action']}: {summary['index_reason'] or '-'}); "
          f"{summary['rows']} rows; {summary['seconds']} s")
    print(json.dumps({k: v for k, v in summary.items() if k != "error_samples"}))
    return summary


main = entry_point(run)

if __name__ == "__main__":
    main()
