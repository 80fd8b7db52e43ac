"""What only a GPU shows, in one run; the last line is JSON.

    python benchmarks/gpu_smoke.py [--quick] [--images 64] [--gallery 1000000] [--queries 70]

- extraction: images/s of the DELG-style multi-scale extractor (7 scales, longest side 1024; batches of
  ``--batch-size`` images of one size, one forward pass per scale, as the extraction actors run it) and of the
  dense-grid extractor (batched 224 crops), GPU against this machine's CPUs, with the GPU's utilisation
  (nvidia-smi sampled every 100 ms) during the GPU run;
- exact block scoring (``rrt_dist.index.exact.block_scores``, what exact-mode evaluation runs): GB/s of gallery
  scored from host memory on the GPU and by FAISS on the CPUs, for 1, 16, 70 and 1000 queries (where it pays);
- search of a GPU-resident gallery (FAISS GPU when installed, else the same fp32 product on the GPU with torch)
  against FAISS's CPU flat search: queries/s, and agreement (same top-100 ids wherever scores differ by more
  than fp16 resolution);
- RRT: top-100 reranking latency per query (500 locals per image) in fp32 and in bf16 (what the rerank actors
  run on a GPU), and the largest logit difference between them;
- structural rerank: top-100 latency per query (7x7 patches of 384-d), GPU and CPU;
- a 2-process NCCL training step of RRT (DDP) when there are 2 GPUs.

Random weights and data (speed does not depend on them). Imports only the pure cores (torch, timm, numpy and
faiss), so it runs in any Python with those. Without a usable GPU it says why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time

import numpy as np
import torch

FP16_RESOLUTION = 2.0 ** -10      # relative spacing of fp16 values near 1 (scores of unit vectors)


class Utilisation:
    """Samples ``nvidia-smi`` GPU utilisation (%) in the background while the block runs."""

    def __init__(self, period_ms: int = 100):
        self.period_ms, self.samples, self.process = period_ms, [], None

    def __enter__(self):
        try:
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                             f"-lms={self.period_ms}", "-i", "0"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            return self
        self.reader = threading.Thread(target=lambda: self.samples.extend(
            float(line) for line in self.process.stdout if line.strip().isdigit()), daemon=True)
        self.reader.start()
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.reader.join(timeout=2)

    def summary(self) -> dict:
        s = np.asarray(self.samples or [np.nan])
        return {"mean": round(float(np.nanmean(s)), 1), "max": float(np.nanmax(s)), "samples": len(self.samples)}


def timed(fn, repeat: int = 1) -> float:
    """Seconds of one call of ``fn`` (the best of ``repeat``), GPU work finished."""
    best = np.inf
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def extraction(n_images: int, batch_size: int = 8) -> dict:
    from rrt_dist.features import create_extractor, create_preparer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(n_images)]
    out = {}
    for name, cfg, cpu_images in (("multiscale-cnn", {"model": "resnet50", "pretrained": False}, 2),
                                  ("dense-grid", {"model": "resnet50", "pretrained": False, "resize": 256}, 16)):
        prepare = create_preparer(name, **cfg)
        prepared = [prepare(im) for im in images]
        rates = {}
        for device, n in (("cuda", n_images), ("cpu", cpu_images)):
            extractor = create_extractor(name, **cfg, device=device)
            batch = batch_size if name == "multiscale-cnn" else n

            def run():
                for i in range(0, n, batch):
                    extractor.extract(prepared[i:min(n, i + batch)])

            extractor.extract(prepared[:min(n, batch)])                      # warm-up (cuDNN autotune)
            if device == "cuda":
                with Utilisation() as util:
                    seconds = timed(run)
                out[f"{name}_gpu_utilisation_pct"] = util.summary()
            else:
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
            rates[device] = n / seconds
            del extractor
        out[f"{name}_images_per_s"] = {"gpu": round(rates["cuda"], 1), "cpu": round(rates["cpu"], 2),
                                       "ratio": round(rates["cuda"] / rates["cpu"], 1),
                                       **({"batch_size": batch_size} if name == "multiscale-cnn" else {})}
    torch.cuda.empty_cache()
    return out


def block_scoring(dim: int = 2048, rows: int = 8192, blocks: int = 8) -> dict:
    """GB/s of gallery scored per device and query count, from host memory (as exact-mode evaluation reads it)."""
    from rrt_dist.index.exact import block_scores

    rng = np.random.default_rng(1)
    gallery = [rng.standard_normal((rows, dim), dtype=np.float32) for _ in range(blocks)]
    gb = blocks * rows * dim * 4 / 1e9
    out = {}
    for nq in (1, 16, 70, 1000):
        queries = rng.standard_normal((nq, dim), dtype=np.float32)
        rate = {}
        for device in ("cuda", None):                                      # None: FAISS on the CPUs
            block_scores(queries, gallery[0], device=device)                # warm-up
            start = time.perf_counter()
            for block in gallery:
                block_scores(queries, block, device=device)
            rate[device] = gb / (time.perf_counter() - start)
        out[f"q{nq}"] = {"gpu_GBps": round(rate["cuda"], 2), "cpu_GBps": round(rate[None], 2),
                         "ratio": round(rate["cuda"] / rate[None], 2)}
    return out


def resident_search(n: int, dim: int, n_queries: int, k: int = 100) -> dict:
    """GPU-resident flat search against FAISS's CPU flat search on the same vectors; agreement of the top-k."""
    import faiss

    g = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda"), dim=1)
    q = torch.nn.functional.normalize(g[torch.randperm(n, device="cuda")[:n_queries]]
                                      + 0.5 * torch.randn(n_queries, dim, device="cuda"), dim=1)
    gallery, queries = g.cpu().numpy(), q.cpu().numpy()
    has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if has_gpu_faiss:
        from rrt_dist.index.core import gpu_index

        resources = faiss.StandardGpuResources()
        index = gpu_index(faiss.IndexFlatIP(dim), resources)
        index.add(gallery)
        engine = "faiss-gpu (fp16 vectors)"

        def gpu_search():
            return index.search(queries, k)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        engine = "torch fp32 matmul + topk (no GPU FAISS in this Python)"

        def gpu_search():
            scores, ids = torch.topk(q @ g.T, k, dim=1)
            return scores.cpu().numpy(), ids.cpu().numpy()
    gpu_search()
    gpu_seconds = timed(gpu_search, repeat=3)
    gpu_scores, gpu_ids = gpu_search()
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(gallery)
    start = time.perf_counter()
    cpu_scores, cpu_ids = cpu.search(queries, k)
    cpu_seconds = time.perf_counter() - start
    # a difference in ids is a disagreement only where the two lists' scores differ by more than fp16 resolution
    differ = gpu_ids != cpu_ids
    real = differ & (np.abs(gpu_scores - cpu_scores) > FP16_RESOLUTION)
    del g, q
    torch.cuda.empty_cache()
    return {"engine": engine, "gallery": n, "dim": dim, "queries": n_queries, "k": k,
            "gpu_queries_per_s": round(n_queries / gpu_seconds, 1), "cpu_queries_per_s": round(n_queries / cpu_seconds, 1),
            "ratio": round(cpu_seconds / gpu_seconds, 1), "positions_differing": int(differ.sum()),
            "positions_differing_beyond_fp16": int(real.sum()), "queries_identical": int((~differ.any(axis=1)).sum())}


def rrt_inputs(b: int, n_local: int = 500, device="cuda"):
    gen = torch.Generator(device="cpu").manual_seed(2)
    one = lambda *shape: torch.randn(*shape, generator=gen)                                   # noqa: E731
    src = (one(1, 2048).expand(b, -1), one(1, n_local, 128).expand(b, -1, -1),
           torch.zeros(b, n_local, dtype=torch.bool), torch.randint(0, 7, (1, n_local), generator=gen).expand(b, -1))
    tgt = (one(b, 2048), one(b, n_local, 128), torch.zeros(b, n_local, dtype=torch.bool),
           torch.randint(0, 7, (b, n_local), generator=gen))
    return [t.contiguous().to(device) for t in (*src, *tgt)]


def rrt_latency(k: int = 100) -> dict:
    from rrt_dist.models.rrt import RerankingTransformer

    model = RerankingTransformer().cuda().eval()
    inputs = rrt_inputs(k)
    out = {}
    with torch.inference_mode():
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = model(*inputs)
        out["fp32_ms_per_query"] = round(1e3 * timed(lambda: model(*inputs), repeat=5), 2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(*inputs)
            out["bf16_ms_per_query"] = round(1e3 * timed(lambda: model(*inputs), repeat=5), 2)
    out["max_logit_difference"] = float((fp32.float() - bf16.float()).abs().max())
    out["logit_std"] = float(fp32.float().std())
    out["same_order"] = bool(torch.equal(fp32.argsort(descending=True), bf16.float().argsort(descending=True)))
    return out


def structural_latency(k: int = 100, r: int = 49, c: int = 384) -> dict:
    from rrt_dist.rerank.structural import structural_similarity

    gen = torch.Generator().manual_seed(3)
    qp, qc, cp, cc = (torch.randn(r, c, generator=gen), torch.randn(c, generator=gen),
                      torch.randn(k, r, c, generator=gen), torch.randn(k, c, generator=gen))
    out = {}
    for device in ("cuda", "cpu"):
        args = [t.to(device) for t in (qp, qc, cp, cc)]
        structural_similarity(*args)
        if device == "cuda":
            out["gpu_ms_per_query"] = round(1e3 * timed(lambda: structural_similarity(*args), repeat=5), 2)
        else:
            start = time.perf_counter()
            structural_similarity(*args)
            out["cpu_ms_per_query"] = round(1e3 * (time.perf_counter() - start), 2)
    return out


def _ddp_step(rank: int, world: int, port: int, result) -> None:
    import torch.distributed as dist

    from rrt_dist.models.rrt import RerankingTransformer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    model = torch.nn.parallel.DistributedDataParallel(RerankingTransformer().cuda(), device_ids=[rank])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs, labels = rrt_inputs(32), torch.ones(32, device="cuda")
    for step in range(4):                                              # the first steps warm NCCL up
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(*inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
    if rank == 0:
        result.put(time.perf_counter() - start)
    dist.destroy_process_group()


def nccl_step() -> dict:
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: a 2-worker step needs 2"}
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    result = context.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [context.Process(target=_ddp_step, args=(rank, 2, port, result)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return {"workers": 2, "batch_per_worker": 32, "step_ms": round(1e3 * result.get(timeout=5), 2)}


def environment() -> dict:
    import faiss

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return {"gpu": torch.cuda.get_device_name(0), "nvidia_smi": smi, "gpus": torch.cuda.device_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "faiss": faiss.__version__,
            "faiss_gpu": hasattr(faiss, "StandardGpuResources"), "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images, a 100k gallery")
    parser.add_argument("--images", type=int, default=64, help="images extracted on the GPU")
    parser.add_argument("--batch-size", type=int, default=8, help="multi-scale extraction: images per call")
    parser.add_argument("--gallery", type=int, default=1_000_000, help="vectors of the GPU-resident search")
    parser.add_argument("--queries", type=int, default=70, help="queries of the resident search (revisitop: 70)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.gallery = 8, 100_000

    from rrt_dist.devices import cuda_problem

    problem = cuda_problem()
    if problem:
        result = {"gpu": None, "reason": problem}
        print(f"no usable GPU here ({problem}): nothing to measure")
        print(json.dumps(result))
        return
    result = {"environment": environment()}
    for name, step in (("extraction", lambda: extraction(args.images, args.batch_size)), ("block_scoring", block_scoring),
                       ("resident_search", lambda: resident_search(args.gallery, 2048, args.queries)),
                       ("rrt_top100", rrt_latency), ("structural_top100", structural_latency), ("nccl", nccl_step)):
        start = time.perf_counter()
        try:
            result[name] = step()
        except Exception as err:                     # one broken measurement must not cost the others
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{name} ({time.perf_counter() - start:.1f} s): {json.dumps(result[name])}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
