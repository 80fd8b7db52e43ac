"""The search service under load, on loopback: requests/s and latency percentiles of closed-loop clients.

    python benchmarks/serve.py [--quick] [--gallery 10000] [--seconds 15]

A gallery of ``--gallery`` images is written directly (a feature table of random descriptors with the serving
extractor's shapes and fingerprint, its Flat index, image paths; as ``benchmarks/scale.py`` does) and served by
``rrt-dist serve``'s application; the queries are real JPEGs, extracted by the service (one-scale
EfficientNet-Lite0, 100 locals). Closed-loop clients (each sends its next request when the last one is answered)
at 1, 4 and 16 concurrent requests, global-only and with GV reranking of the top-100; 1 against 2 reranker
replicas; during an ingest (new rows and a new index version committed, which the searcher picks up); and with a
reranker replica killed mid-run (failed requests counted: the target is zero). The baseline of each row is the
service's own single-client global-only rate. The last line is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from rrt_dist.config import CONFIG_DIR, RayConfig, validate_config
from rrt_dist.features import create_extractor, fingerprint
from rrt_dist.features.core import schema_for
from rrt_dist.index.sharded import build_index, update_index
from rrt_dist.pipelines.features import extract_settings, table_folder
from rrt_dist.pipelines.ingest import IMAGES, write_record
from rrt_dist.pipelines.serve import start_service
from rrt_dist.runtime import init_ray
from rrt_dist.store import FeatureStore, commit_fragments, features_to_table, write_fragment

BACKBONE = ["backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]", "backbone.options.max_local=100"]
ZERO_CPUS = ["serve.extractor.num_cpus=0", "serve.searcher.num_cpus=0", "serve.reranker.num_cpus=0",
             "serve.gateway.num_cpus=0"]


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate_config(cfg)
    return cfg


def add_rows(table: str, schema, extractor, ids: np.ndarray, seed: int) -> None:
    """Random unit descriptors for ``ids``, committed as one table version (in chunks of 2,000)."""
    rng = np.random.default_rng(seed)
    fragments = []
    for start in range(0, len(ids), 2000):
        part = ids[start:start + 2000]
        n, width = len(part), extractor.max_local
        glob = rng.standard_normal((n, extractor.global_dim)).astype(np.float32)
        local = rng.standard_normal((n, width, extractor.local_dim)).astype(np.float32)
        fragments += write_fragment(table, features_to_table(
            schema, part, glob / np.linalg.norm(glob, axis=1, keepdims=True),
            local / np.linalg.norm(local, axis=2, keepdims=True), rng.uniform(0, 640, (n, width, 2)),
            np.zeros((n, width), np.int64), np.full(n, width)))
    commit_fragments(table, schema, fragments)


def write_gallery(root: Path, cfg, n: int) -> dict:
    """Gallery ``bench`` as an ingest leaves it: record, feature table, image list and index version 1."""
    import lance
    import pyarrow as pa
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    extractor = create_extractor(cfg.backbone.name, **options)
    folder = table_folder(cfg.backbone.name, options, extract_settings(cfg.backbone))
    directory = root / "bench"
    table, index = f"{directory}/features/{folder}/gallery.lance", f"{directory}/index/{folder}/Flat-1s"
    schema = schema_for(extractor, fingerprint(extractor))
    ids = np.arange(1, n + 1, dtype=np.int64)
    add_rows(table, schema, extractor, ids, seed=0)
    lance.write_dataset(pa.table({"id": ids, "uri": [f"/bench/{i}.jpg" for i in ids]}), f"{directory}/{IMAGES}")
    build_index(FeatureStore(table), index, "Flat", 1, 200_000, 8 * 2**30)
    write_record(str(directory), {"name": "bench", "extractor": cfg.backbone.name, "fingerprint": folder,
                                  "table": table, "index": index, "history": []})
    return {"table": table, "index": index, "schema": schema, "extractor": extractor, "next_id": n + 1}


def query_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)       # smooth blobs once upsampled
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((640, 480), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def closed_loop(url: str, queries: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending its next request when the last one is answered, for ``seconds``."""
    latencies, failures, versions, lock = [], [], set(), threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int):
        n = c
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                request = urllib.request.Request(url, data=queries[n % len(queries)], method="POST")
                with urllib.request.urlopen(request, timeout=120) as response:
                    body = json.loads(response.read())
                with lock:
                    latencies.append(time.perf_counter() - start)
                    versions.add(body["index_version"])
            except (urllib.error.URLError, OSError) as err:
                with lock:
                    failures.append(str(err))
            n += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return {"clients": clients, "requests": len(latencies), "failed": len(failures),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "index_versions": sorted(versions),
            "failure_samples": failures[:3]}


def kill_a_reranker_replica_after(delay: float) -> threading.Thread:
    def kill():
        import ray

        time.sleep(delay)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "GalleryReranker" in a["name"]]
        if replicas:                         # Serve's replicas are named actors in its namespace
            ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
            print(f"killed replica {replicas[0]['name']}", flush=True)
        else:
            print("no reranker replica found to kill", flush=True)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2,000-image gallery, 5 s per row")
    parser.add_argument("--gallery", type=int, default=10_000, help="gallery images (random descriptors)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each row's duration")
    args = parser.parse_args()
    if args.quick:
        args.gallery, args.seconds = 2000, 5.0
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [f"gallery.root={work}", "gallery.name=bench", *BACKBONE, f"serve.port={port}", "reranker.depth=100",
            "serve.batch_size=8", *ZERO_CPUS]
    rows = []
    try:
        init_ray(RayConfig())
        cfg = config(base)
        gallery = write_gallery(work, cfg, args.gallery)
        queries = query_jpegs(16)
        url = start_service(cfg, token=None)
        closed_loop(url + "search?k=10", queries, 1, 3.0)                      # warm-up: models, shards, JIT
        for rerank in ("", "gv"):
            for clients in (1, 4, 16):
                row = closed_loop(url + f"search?k=10&rerank={rerank}", queries, clients, args.seconds)
                rows.append({"case": f"{rerank or 'global'}, 1 reranker replica", **row})
                print(json.dumps(rows[-1]), flush=True)
        url = start_service(config([*base, "serve.reranker.min_replicas=2", "serve.reranker.max_replicas=2"]), None)
        closed_loop(url + "search?k=10&rerank=gv", queries, 2, 3.0)
        for clients in (4, 16):
            row = closed_loop(url + "search?k=10&rerank=gv", queries, clients, args.seconds)
            rows.append({"case": "gv, 2 reranker replicas", **row})
            print(json.dumps(rows[-1]), flush=True)

        def ingest():                            # rows and an index version committed while clients run
            time.sleep(args.seconds / 4)
            new = np.arange(gallery["next_id"], gallery["next_id"] + args.gallery // 10, dtype=np.int64)
            add_rows(gallery["table"], gallery["schema"], gallery["extractor"], new, seed=1)
            update_index(FeatureStore(gallery["table"]), gallery["index"], 0.2)

        writer = threading.Thread(target=ingest)
        writer.start()
        row = closed_loop(url + "search?k=10&rerank=gv", queries, 4, args.seconds)
        writer.join()
        rows.append({"case": "gv, 2 replicas, during an ingest (+10 % rows, index v2)", **row})
        print(json.dumps(rows[-1]), flush=True)
        killer = kill_a_reranker_replica_after(args.seconds / 3)      # Serve replaces it; requests retry
        row = closed_loop(url + "search?k=10&rerank=gv", queries, 4, args.seconds)
        killer.join()
        rows.append({"case": "gv, 2 replicas, one killed mid-run", **row})
        print(json.dumps(rows[-1]), flush=True)
    finally:
        from ray import serve

        serve.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    baseline = rows[0]["requests_per_s"]
    print(json.dumps({"gallery": args.gallery, "seconds_per_row": args.seconds, "baseline_requests_per_s": baseline,
                      "rows": [{**r, "ratio_to_baseline": round(r["requests_per_s"] / baseline, 2)} for r in rows],
                      "failed_total": sum(r["failed"] for r in rows)}))


if __name__ == "__main__":
    main()
