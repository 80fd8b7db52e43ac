"""Which device a stage's process computes on, and a loud stop when the GPU Ray gave it cannot be used.

Ray schedules by resources, not by what a process can do with them: a node whose NVIDIA driver is older than the
CUDA that torch was built for still reports its GPU, the actor gets it, and ``torch.cuda.is_available()`` says
False. Choosing "cuda when available" there computes on the CPU while the GPU sits reserved, silently 10-100x
slower. A process that Ray gave a GPU therefore must be able to use it, or it stops with one line naming the stage.
"""
from __future__ import annotations

import os

from rrt_dist.schema import GpuUnavailable, first_line


def assigned_gpus() -> list[str]:
    """The GPU ids Ray assigned to this worker process ([] in a driver or outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    except ImportError:
        return []


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA device in this process, as torch says it (None: it can)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as err:          # torch raises RuntimeError / AssertionError with the driver's reason
        reason = first_line(err)
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}): {reason}"
    if torch.cuda.device_count() == 0:
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return None


def require_gpu(stage: str, gpus: list[str] | None = None) -> bool:
    """Whether this process of ``stage`` computes on a GPU: True when Ray gave it one (``gpus``, default
    :func:`assigned_gpus`) and torch can use it; :class:`GpuUnavailable` when Ray gave it one that torch cannot
    use; False when it was given none (``ray.<stage>.num_gpus: 0``, or null on a Ray without GPUs), or when it
    runs on Ray's fake multi-node cluster (``RAY_FAKE_CLUSTER=1``, autoscaling tests), whose GPUs are resources
    only."""
    gpus = assigned_gpus() if gpus is None else gpus
    if not gpus or os.environ.get("RAY_FAKE_CLUSTER") == "1":
        return False
    problem = cuda_problem()
    if problem:
        raise GpuUnavailable(f"ray.{stage} asks for GPUs and Ray gave this process GPU {','.join(gpus)}, but {problem}; "
                             f"fix the node's driver or image, or set ray.{stage}.num_gpus=0 to compute on CPUs")
    return True


def require_faiss_gpu(stage: str = "search") -> None:
    """FAISS in this process must have GPU support and see a GPU (the search shards a GPU actor serves)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        raise GpuUnavailable(f"ray.{stage} asks for GPUs but this FAISS ({faiss.__version__}) is the CPU build: install "
                             f"rrt-dist[gpu] (FAISS with GPU support, see constraints.txt), or set "
                             f"ray.{stage}.num_gpus=0")
    if faiss.get_num_gpus() == 0:
        raise GpuUnavailable(f"ray.{stage} asks for GPUs but FAISS {faiss.__version__} sees none "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set "
                             f"ray.{stage}.num_gpus=0 to search on CPUs")


def exact_device(setting: str) -> str | None:
    """``index.exact_device`` resolved in this (driver) process: ``"cuda"``, or None for FAISS on the CPU
    (``rrt_dist.index.exact.block_scores``). The driver holds no Ray GPU, so ``auto`` without a usable GPU is the
    CPU, not an error; ``cuda`` asked for and unusable is one."""
    if setting == "cpu":
        return None
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    if setting == "cuda":
        raise GpuUnavailable(f"index.exact_device=cuda, but {problem}; use auto or cpu")
    return None


def error_line(err: BaseException, known: tuple[type, ...]) -> str | None:
    """The one-line message of a ``known`` error raised inside a Ray actor's constructor or a Ray Data worker, which
    reaches the driver only as text (an ``ActorDiedError`` keeps the remote traceback, not the exception): the
    last ``module.Class: message`` line of that text whose class is one of ``known``."""
    names = {f"{k.__module__}.{k.__name__}": k.__name__ for k in known}
    found = None
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for line in str(err).splitlines():
            head, sep, message = line.strip().partition(": ")
            if sep and head in names:
                found = message.strip()
        err = err.__cause__ or err.__context__
    return found
