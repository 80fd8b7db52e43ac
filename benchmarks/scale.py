"""The cost curve of the stages after extraction, from 10k towards 1M gallery images (R1M scale on one machine).

    python benchmarks/scale.py                         # 10k and 100k images
    python benchmarks/scale.py --sizes 10000 100000 1000000 --work /big/disk

Writes synthetic DELG-shaped feature tables straight into Lance (no images): clustered, L2-normalised 2048-d
globals (fp16) and 500 local descriptors of 128-d per image stored as PQ codes (``backbone.local_storage=pq``,
16 bytes each: in fp16 they would take 128 GB at 1M, more than this machine's disk), plus 70 queries whose
positives are planted (globals near the query's, 200 of its locals shared under an affine map, so geometric
verification finds them). Then runs what the evaluate job runs after extraction:

- ``index_build``: ``index.factory=auto`` (Flat while it fits 8 GB, then IVF), 2 shards filled by Ray tasks;
- ``search_top100``: the sharded index's top-100 for the 70 queries;
- ``metric_ranking``: what the revisitop metric needs of the exact ranking of the whole gallery, streamed from
  Lance twice: each query's top-100 (+ its relevant ids) and its positives' and junk's places
  (``rrt_dist.eval.runner.metric_rankings``, the evaluate job's exact path);
- ``pool_gv`` / ``pool_rrt`` / ``pool_superglobal``: a rerank pool of one actor started and warmed up on one query;
- ``rerank_gv`` / ``rerank_rrt`` / ``rerank_superglobal``: ``--rerank-queries`` other queries reranked by it (GV and
  RRT with random weights: the top-100; SuperGlobal: the top ``--superglobal-m``, 400 as its paper, from global
  descriptors only): their cost is per query, not per gallery image; each with the bytes per gallery image the
  reranker needs stored beyond the global descriptor (``rrt_dist.eval.costs``);
- ``metrics``: revisitop mAP from that summary (equal to the whole ranking's: tests/test_index.py).

``--skip-index`` leaves out the index build and the sharded search (the two 4.2 GB shard actors at 1M) where the
machine's memory is needed elsewhere: the reranking rows read the exact ranking either way.

Per stage: wall time, the driver's peak RSS and the largest Ray worker's peak RSS (both VmHWM, reset before the
stage through /proc/<pid>/clear_refs), and bytes on disk. Prints each stage's log-log growth exponent of time
and memory between consecutive sizes, writes ``scale.png`` beside ``--out``; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rrt_dist.config import RayConfig
from rrt_dist.datasets.base import Benchmark, RevisitopProtocol, make_manifest
from rrt_dist.eval.costs import stored_bytes
from rrt_dist.eval.runner import metric_rankings
from rrt_dist.index.sharded import ShardedIndex, build_index
from rrt_dist.pipelines.rerank import RerankPool
from rrt_dist.rerank.methods import get_reranker
from rrt_dist.runtime import init_ray
from rrt_dist.store import FeatureStore, commit_fragments, features_schema, write_fragment
from rrt_dist.store.features import write_codebook

GLOBAL_DIM, LOCAL_DIM, N_LOCAL, PQ_M = 2048, 128, 500, 16
N_QUERIES, POSITIVES, SHARED_LOCALS = 70, 8, 200
CHUNK = 5000                                    # images generated and written at a time


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _table(schema: pa.Schema, ids, globals_, codes, positions, scales) -> pa.Table:
    n = len(ids)

    def fixed(values, typ):
        flat = np.ascontiguousarray(values).reshape(n, -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=typ), flat.shape[1])

    return pa.Table.from_arrays([pa.array(ids, pa.int64()), fixed(globals_.astype(np.float16), pa.float16()),
                                 fixed(codes, pa.uint8()), fixed(positions.astype(np.float32), pa.float32()),
                                 fixed(scales.astype(np.int8), pa.int8()), pa.array(np.full(n, N_LOCAL, np.int32)),
                                 pa.nulls(n, pa.string())], schema=schema)


def write_benchmark(work: Path, n: int, seed: int = 0) -> tuple[Benchmark, FeatureStore, FeatureStore]:
    """Query and gallery tables of ``n`` images, and the benchmark whose ground truth the planting defines."""
    rng = np.random.default_rng(seed)
    # decoded locals of about unit norm, as extracted ones are (GV's match threshold assumes it)
    codebook = (rng.normal(size=(PQ_M, 256, LOCAL_DIM // PQ_M)) / np.sqrt(LOCAL_DIM)).astype(np.float32)
    schema = features_schema(GLOBAL_DIM, LOCAL_DIM, N_LOCAL, "synthetic-delg", {}, "scale-bench", "pq", codebook)
    centres = _unit(rng.normal(size=(4096, GLOBAL_DIM)))
    q_globals = _unit(centres[:N_QUERIES] + 0.3 * rng.normal(size=(N_QUERIES, GLOBAL_DIM)))
    q_codes = rng.integers(0, 256, (N_QUERIES, N_LOCAL, PQ_M), dtype=np.uint8)
    q_positions = rng.uniform(0, 768, (N_QUERIES, N_LOCAL, 2))
    # the planted positives: query q's at gallery rows planted[q]
    planted = rng.choice(n, size=(N_QUERIES, POSITIVES), replace=False)
    owner = np.full(n, -1)
    owner[planted.reshape(-1)] = np.repeat(np.arange(N_QUERIES), POSITIVES)
    uris = {}
    for name, count in (("query", N_QUERIES), ("gallery", n)):
        uri = str(work / f"{name}.lance")
        write_codebook(uri, codebook)
        uris[name] = uri
    ids_q = 10**12 + np.arange(N_QUERIES, dtype=np.int64)
    commit_fragments(uris["query"], schema, write_fragment(uris["query"], _table(
        schema, ids_q, q_globals, q_codes, q_positions, rng.integers(0, 7, (N_QUERIES, N_LOCAL)))))
    fragments = []
    for start in range(0, n, CHUNK):
        rows = np.arange(start, min(n, start + CHUNK))
        g = centres[rng.integers(0, len(centres), len(rows))] + 0.6 * rng.normal(size=(len(rows), GLOBAL_DIM))
        codes = rng.integers(0, 256, (len(rows), N_LOCAL, PQ_M), dtype=np.uint8)
        positions = rng.uniform(0, 1024, (len(rows), N_LOCAL, 2))
        for r in np.flatnonzero(owner[rows] >= 0):
            q = owner[rows[r]]
            g[r] = q_globals[q] + 0.25 * rng.normal(size=GLOBAL_DIM)
            codes[r, :SHARED_LOCALS] = q_codes[q, :SHARED_LOCALS]
            angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.7, 1.3)
            rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            positions[r, :SHARED_LOCALS] = q_positions[q, :SHARED_LOCALS] @ rotation.T + rng.uniform(0, 200, 2)
        fragments += write_fragment(uris["gallery"], _table(schema, rows + 1, _unit(g), codes, positions,
                                                            rng.integers(0, 7, (len(rows), N_LOCAL))))
        if len(fragments) >= 20 or start + CHUNK >= n:
            commit_fragments(uris["gallery"], schema, fragments)
            fragments = []
    gnd = [{"easy": planted[q, :POSITIVES // 2].tolist(), "hard": planted[q, POSITIVES // 2:].tolist(), "junk": []}
           for q in range(N_QUERIES)]
    bench = Benchmark(name="scale", queries=make_manifest(ids_q, [""] * N_QUERIES, "query"),
                      gallery=make_manifest(np.arange(1, n + 1), [""] * n, "gallery"), protocol=RevisitopProtocol(gnd))
    return bench, FeatureStore(uris["query"]), FeatureStore(uris["gallery"])


def ray_worker_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::") or b"default_worker.py" in cmdline:
            pids.append(int(pid))
    return pids


def reset_peaks() -> None:
    for pid in [os.getpid(), *ray_worker_pids()]:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")      # VmHWM := current RSS
        except OSError:
            pass


def peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(stages: dict, name: str, fn):
    reset_peaks()
    start = time.perf_counter()
    out = fn()
    stages[name] = {"seconds": round(time.perf_counter() - start, 2), "driver_peak_rss": peak_rss(os.getpid()),
                    "actor_peak_rss": max([peak_rss(p) for p in ray_worker_pids()] or [0])}
    print(f"  {name}: {stages[name]['seconds']} s, driver peak {stages[name]['driver_peak_rss'] / 2**20:.0f} MiB, "
          f"largest worker {stages[name]['actor_peak_rss'] / 2**20:.0f} MiB", flush=True)
    return out


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(work: Path, n: int, rerank_queries: int, rrt_checkpoint: str, superglobal_m: int = 400,
             skip_index: bool = False) -> dict:
    stages: dict = {}
    bench, qstore, gstore = measure(stages, "write_tables", lambda: write_benchmark(work, n))
    stages["write_tables"]["bytes"] = disk_bytes(work)
    q_ids, queries = qstore.globals()
    index_dir = str(work / "index")
    if not skip_index:
        measure(stages, "index_build", lambda: build_index(gstore, index_dir, factory="auto", n_shards=2,
                                                           train_size=100_000))
        stages["index_build"]["bytes"] = disk_bytes(work / "index")

        def search_top100():
            index = ShardedIndex(index_dir)
            try:
                return index.search(queries, 100)
            finally:
                index.close()

        measure(stages, "search_top100", search_top100)
    depth = max(100, superglobal_m)
    ranked, scores, positions = measure(stages, "metric_ranking", lambda: metric_rankings(
        bench, q_ids, queries, {"gallery": gstore}, None, False, depth=depth))
    head = slice(0, rerank_queries)
    schema = gstore.dataset.schema
    for method, options, k in (("gv", {}, 100), ("rrt", {"checkpoint": rrt_checkpoint}, 100),
                               ("superglobal", {"m": superglobal_m}, superglobal_m)):
        # the pool's start (actors opening the tables: the gallery's ids are read once) is timed apart from
        # reranking, whose cost is per query; the warm-up query is not one of the timed ones (pair cache)
        pool = measure(stages, f"pool_{method}", lambda: _warm_pool(method, options, qstore, gstore, q_ids, ranked,
                                                                     scores, rerank_queries, k))
        try:
            reranked = measure(stages, f"rerank_{method}",
                               lambda: pool.rerank(q_ids[head], ranked[head, :k], scores[head, :k], k))
        finally:
            pool.close()
        stages[f"rerank_{method}"].update(queries=rerank_queries, depth=k, stored_bytes_per_image=stored_bytes(
            get_reranker(method).inputs, schema))
        # the planted positives share locals with their query: reranking must bring them up
        stages[f"rerank_{method}"]["positives_in_top10"] = int(sum(
            np.isin(reranked[q, :10], bench.gallery.column("id").to_numpy()[bench.protocol.gnd[q]["easy"]
                                                                               + bench.protocol.gnd[q]["hard"]]).sum()
            for q in range(rerank_queries)))
    metrics = measure(stages, "metrics", lambda: bench.evaluate(ranked, positions))
    return {"gallery": n, "stages": stages, "global_medium_map": round(100 * metrics["medium"]["mAP"], 2)}


def _warm_pool(method, options, qstore, gstore, q_ids, ranked, scores, warm_query: int, k: int) -> RerankPool:
    pool = RerankPool(method, options, qstore, [gstore], num_actors=1, chunk=2)
    one = slice(warm_query, warm_query + 1)
    pool.rerank(q_ids[one], ranked[one, :k], scores[one, :k], k)
    return pool


def growth(results: list[dict]) -> dict:
    """Per stage, log-log exponents of time and driver / actor memory between consecutive sizes."""
    out = {}
    for a, b in zip(results, results[1:]):
        ratio = np.log(b["gallery"] / a["gallery"])
        for stage in a["stages"]:
            for key in ("seconds", "driver_peak_rss", "actor_peak_rss"):
                x, y = a["stages"][stage][key], b["stages"][stage][key]
                if x > 0 and y > 0:
                    out.setdefault(f"{a['gallery']}->{b['gallery']}", {}).setdefault(stage, {})[key] = round(
                        float(np.log(y / x) / ratio), 2)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["gallery"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage in results[0]["stages"]:
        axes[0].plot(sizes, [r["stages"][stage]["seconds"] for r in results], "o-", label=stage)
        axes[1].plot(sizes, [r["stages"][stage]["driver_peak_rss"] / 2**20 for r in results], "o-", label=stage)
    for ax, title in zip(axes, ("wall time (s)", "driver peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery images")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rerank-queries", type=int, default=4, help="queries whose top-100 is reranked")
    parser.add_argument("--work", default=None, help="folder for the tables (default: a temporary one)")
    parser.add_argument("--out", default="scale.png")
    parser.add_argument("--superglobal-m", type=int, default=400, help="the top-M SuperGlobal reranks")
    parser.add_argument("--skip-index", action="store_true", help="no index build or sharded search")
    args = parser.parse_args()
    import torch

    from rrt_dist.models.rrt import RerankingTransformer

    init_ray(RayConfig())
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    results = []
    try:
        torch.manual_seed(0)
        torch.save(RerankingTransformer().state_dict(), root / "rrt.pth")
        for n in args.sizes:
            work = root / str(n)
            work.mkdir()
            results.append(run_size(work, n, args.rerank_queries, str(root / "rrt.pth"), args.superglobal_m,
                                    args.skip_index))
            print(json.dumps(results[-1]))
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plot(results, Path(args.out))
    exponents = growth(results)
    for span, stages in exponents.items():
        print(f"growth exponents {span}: " + ", ".join(
            f"{stage} t^{v.get('seconds', '-')} driver^{v.get('driver_peak_rss', '-')}" for stage, v in stages.items()))
    print(json.dumps({"benchmark": "scale", "sizes": args.sizes, "results": results, "growth": exponents,
                      "plot": args.out}))


if __name__ == "__main__":
    main()
