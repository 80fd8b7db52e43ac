"""The search service under load, on loopback, at 10k and at 1M gallery images: requests/s, latency percentiles,
how full each deployment's batches are, and what a request costs outside the index search.

    python benchmarks/serve.py [--quick] [--galleries 10000 1000000] [--seconds 15] [--work /big/disk]

Per gallery size, gallery ``bench`` is written as an ingest leaves it (a feature table of random descriptors with
the serving extractor's shapes and fingerprint, locals as 16-byte PQ codes, the image catalog, a Flat index and
the snapshot) and served the way ``rrt-dist serve`` serves it: its own embedded Ray, every part sized to this
machine (no resource override). The queries are real JPEGs extracted by the service (one-scale EfficientNet-Lite0,
100 locals). Closed-loop clients (each sends its next request when the last one is answered) at 1, 4, 8 and 16
concurrent requests, global-only and with GV reranking of the top 100. Per row: requests/s, p50/p95/p99, non-200
answers, each deployment's mean batch over the row, the median of each stage the gateway times (reading the upload,
extraction, search, rerank: each from the gateway's call to its answer, queueing included), and the median time a
request spends outside the index search
(``total_ms - index_ms``: upload, extraction, catalog paths, rerank, the hops), which must not grow with the
gallery. On the first size also: during an ingest (new rows, a new snapshot the searcher moves to) and with a
reranker replica killed mid-run (failed requests counted: the target is zero). Baseline: the service's own
single-client global-only rate at the first size. The last line is JSON.
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
import pyarrow as pa
from hydra import compose, initialize_config_dir
from PIL import Image

from rrt_dist.config import CONFIG_DIR, RayConfig, available_cpus, validate_config
from rrt_dist.features import create_extractor, fingerprint
from rrt_dist.features.core import schema_for
from rrt_dist.gallery import Gallery, Snapshot
from rrt_dist.index.sharded import build_index, update_index
from rrt_dist.pipelines.features import extract_settings, table_folder
from rrt_dist.pipelines.serve import start_service
from rrt_dist.runtime import init_ray
from rrt_dist.store import FeatureStore, commit_fragments, write_fragment
from rrt_dist.store.features import train_pq, write_codebook

BACKBONE = ["backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]", "backbone.options.max_local=100",
            "backbone.local_storage=pq"]
CHUNK = 20_000                         # images generated and committed at a time


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate_config(cfg)
    return cfg


def add_rows(table: str, schema, extractor, codebook, ids: np.ndarray, seed: int) -> int:
    """Random unit globals and random PQ codes of locals for ``ids`` (as a pq table stores them: no encoding to
    pay for at 1M), committed as one table version; returns it."""
    rng = np.random.default_rng(seed)
    fragments = []
    width, m = extractor.max_local, codebook.shape[0]

    def fixed(values, typ):
        flat = np.ascontiguousarray(values).reshape(len(values), -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=typ), flat.shape[1])

    for start in range(0, len(ids), CHUNK):
        part = ids[start:start + CHUNK]
        n = len(part)
        glob = rng.standard_normal((n, extractor.global_dim)).astype(np.float32)
        glob /= np.linalg.norm(glob, axis=1, keepdims=True)
        rows = pa.Table.from_arrays([
            pa.array(part, pa.int64()), fixed(glob.astype(np.float16), pa.float16()),
            fixed(rng.integers(0, 256, (n, width * m), dtype=np.uint8), pa.uint8()),
            fixed(rng.uniform(0, 640, (n, width * 2)).astype(np.float32), pa.float32()),
            fixed(np.zeros((n, width), np.int8), pa.int8()), pa.array(np.full(n, width, np.int32)),
            pa.nulls(n, pa.string())], schema=schema)
        fragments += write_fragment(table, rows)
    return commit_fragments(table, schema, fragments).version


def write_gallery(root: Path, cfg, n: int) -> dict:
    """Gallery ``bench`` as an ingest leaves it: feature table, catalog, index version 1 and its snapshot."""
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    extractor = create_extractor(cfg.backbone.name, **options)
    folder = table_folder(cfg.backbone.name, options, extract_settings(cfg.backbone))
    gallery = Gallery.open(str(root), "bench")
    table, index = gallery.table_uri(folder), gallery.index_dir(folder, "Flat", 1)
    sample = np.random.default_rng(9).standard_normal((4096, extractor.local_dim)).astype(np.float32)
    codebook = train_pq(sample / np.linalg.norm(sample, axis=1, keepdims=True), 16)
    write_codebook(table, codebook)
    schema = schema_for(extractor, fingerprint(extractor), "pq", codebook)
    ids = np.arange(1, n + 1, dtype=np.int64)
    add_rows(table, schema, extractor, codebook, ids, seed=0)
    catalog = gallery.catalog.rewrite(pa.table({"id": ids, "uri": [f"/bench/{i}.jpg" for i in ids]}))
    store = FeatureStore(table)
    manifest = build_index(store, index, "Flat", 1, 200_000, 8 * 2**30)
    gallery.commit(Snapshot("bench", folder, index, manifest.version, table, store.version, gallery.catalog.uri,
                            catalog), extractor=cfg.backbone.name)
    return {"gallery": gallery, "folder": folder, "table": table, "index": index, "schema": schema,
            "extractor": extractor, "codebook": codebook, "next_id": n + 1}


def ingest(bench: dict, n_new: int) -> None:
    """What an ingest commits, in its order: rows, catalog rows, index version, snapshot."""
    new = np.arange(bench["next_id"], bench["next_id"] + n_new, dtype=np.int64)
    add_rows(bench["table"], bench["schema"], bench["extractor"], bench["codebook"], new, seed=1)
    gallery = bench["gallery"]
    gallery.catalog.upsert(new, [f"/bench/{i}.jpg" for i in new])
    catalog = gallery.catalog.tidy()
    store = FeatureStore(bench["table"])
    manifest, _ = update_index(store, bench["index"], 0.2)
    gallery.commit(Snapshot("bench", bench["folder"], bench["index"], manifest.version, bench["table"], store.version,
                            gallery.catalog.uri, catalog))


def query_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)       # smooth blobs once upsampled
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((640, 480), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def batch_stats() -> dict:
    """Each batched deployment's (calls, items) so far (one replica each in these rows)."""
    from ray import serve

    return {name: serve.get_deployment_handle(name, app_name="rrt-dist").batch_stats.remote().result()
            for name in ("QueryExtractor", "GallerySearcher", "GalleryReranker")}


def closed_loop(url: str, queries: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending its next request when the last one is answered, for ``seconds``."""
    latencies, outside, failures, versions, lock = [], [], [], set(), threading.Lock()
    stages = {name: [] for name in ("read_ms", "extract_ms", "search_ms", "rerank_ms")}
    before = batch_stats()
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
                    outside.append(body["timings_ms"]["total_ms"] - body["timings_ms"]["index_ms"])
                    versions.add(body["index_version"])
                    for name, values in stages.items():
                        if name in body["timings_ms"]:
                            values.append(body["timings_ms"][name])
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
    after = batch_stats()
    # a replica replaced during the row (killed) counts from zero: its own batches only
    start = {name: before[name] if after[name]["calls"] >= before[name]["calls"] else {"calls": 0, "items": 0}
             for name in after}
    batches = {name: round((after[name]["items"] - start[name]["items"])
                           / max(1, after[name]["calls"] - start[name]["calls"]), 2) for name in after}
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return {"clients": clients, "requests": len(latencies), "non_200": len(failures),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "outside_index_ms": round(float(np.median(outside)), 1) if outside else None,
            "median_stage_ms": {name: round(float(np.median(v)), 1) for name, v in stages.items() if v},
            "mean_batch": batches, "index_versions": sorted(versions), "failure_samples": failures[:3]}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_gallery(work: Path, size: int, args, queries: list[bytes], first: bool) -> list[dict]:
    from ray import serve

    root = work / f"g{size}"
    base = [f"gallery.root={root}", "gallery.name=bench", *BACKBONE, f"serve.port={free_port()}", "reranker.depth=100"]
    cfg = config(base)
    start = time.perf_counter()
    bench = write_gallery(root, cfg, size)
    print(f"gallery of {size} images written in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    try:
        url = start_service(cfg, token=None, cpus=float(available_cpus()))
        closed_loop(url + "search?k=10&rerank=gv", queries, 2, 5.0)           # warm-up: models, shards, catalog
        for rerank in ("", "gv"):
            for clients in (1, 4, 8, 16):
                row = closed_loop(url + f"search?k=10&rerank={rerank}", queries, clients, args.seconds)
                rows.append({"gallery": size, "case": rerank or "global", **row})
                print(json.dumps(rows[-1]), flush=True)
        if first:
            writer = threading.Thread(target=lambda: (time.sleep(args.seconds / 4), ingest(bench, size // 10)))
            writer.start()
            row = closed_loop(url + "search?k=10&rerank=gv", queries, 4, args.seconds)
            writer.join()
            rows.append({"gallery": size, "case": "gv, during an ingest (+10 % rows, a new snapshot)", **row})
            print(json.dumps(rows[-1]), flush=True)
            killer = kill_a_reranker_replica_after(args.seconds / 3)      # Serve replaces it; requests retry
            row = closed_loop(url + "search?k=10&rerank=gv", queries, 4, args.seconds)
            killer.join()
            rows.append({"gallery": size, "case": "gv, the reranker replica killed mid-run", **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="galleries of 2,000 and 20,000 images, 5 s per row")
    parser.add_argument("--galleries", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=15.0, help="each row's duration")
    parser.add_argument("--work", default=None, help="where the galleries are written (about 3.3 GB at 1M)")
    args = parser.parse_args()
    if args.quick:
        args.galleries, args.seconds = [2000, 20_000], 5.0
    work = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=args.work))
    rows = []
    try:
        init_ray(RayConfig())
        queries = query_jpegs(16)
        for n, size in enumerate(args.galleries):
            rows += bench_gallery(work, size, args, queries, first=n == 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    baseline = rows[0]["requests_per_s"]
    summary = {}
    for size in args.galleries:
        mine = {(r["case"], r["clients"]): r for r in rows if r["gallery"] == size}
        summary[size] = {"outside_index_ms_gv_1_client": mine[("gv", 1)]["outside_index_ms"],
                         "extractor_batch_at_8": mine[("global", 8)]["mean_batch"]["QueryExtractor"],
                         "throughput_8_over_1": round(mine[("global", 8)]["requests_per_s"]
                                                      / mine[("global", 1)]["requests_per_s"], 2),
                         "p99_over_p50_at_4": round(mine[("global", 4)]["p99_ms"] / mine[("global", 4)]["p50_ms"], 2)}
    small, large = args.galleries[0], args.galleries[-1]
    print(json.dumps({"galleries": args.galleries, "seconds_per_row": args.seconds, "baseline_requests_per_s": baseline,
                      "rows": [{**r, "ratio_to_baseline": round(r["requests_per_s"] / baseline, 2)} for r in rows],
                      "summary": summary,
                      "outside_index_large_over_small": round(summary[large]["outside_index_ms_gv_1_client"]
                                                              / summary[small]["outside_index_ms_gv_1_client"], 3),
                      "non_200_total": sum(r["non_200"] for r in rows)}))


if __name__ == "__main__":
    main()
