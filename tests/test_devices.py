"""GPU code paths on a machine without a GPU: a stage Ray gave a GPU it cannot use stops with one line naming the
stage; the GPU scoring of exact search (run here on the CPU through the same torch code) ranks as FAISS does."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from rrt_dist.devices import cuda_problem, error_line, exact_device, require_gpu
from rrt_dist.schema import USER_ERRORS, GpuUnavailable

pytestmark = pytest.mark.skipif(cuda_problem() is None, reason="this machine has a usable GPU")


def test_a_stage_given_a_gpu_it_cannot_use_stops_naming_it():
    assert require_gpu("extract", gpus=[]) is False               # given none: the CPU, as asked
    with pytest.raises(GpuUnavailable) as err:
        require_gpu("rerank", gpus=["0"])
    message = str(err.value)
    assert message.startswith("ray.rerank asks for GPUs and Ray gave this process GPU 0, but torch ")
    assert cuda_problem() in message and "ray.rerank.num_gpus=0" in message and "\n" not in message


def test_exact_device_on_a_driver_without_gpu():
    assert exact_device("auto") is None and exact_device("cpu") is None
    with pytest.raises(GpuUnavailable, match="index.exact_device=cuda, but torch"):
        exact_device("cuda")


def test_ray_gives_an_extraction_actor_a_gpu_that_torch_cannot_use(tmp_path):
    """Simulated on a CPU machine: a Ray that advertises one GPU places the extraction actor (Ray sets
    CUDA_VISIBLE_DEVICES=0 for it), torch finds no device, and the driver gets the one line a job prints."""
    script = textwrap.dedent(f"""
        import ray
        from rrt_dist.devices import error_line
        from rrt_dist.pipelines.extract import ExtractAndWrite
        from rrt_dist.schema import USER_ERRORS
        ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
        actor = ray.remote(ExtractAndWrite).options(num_gpus=1).remote("tiny-image", {{}}, {str(tmp_path)!r}, 1,
                                                                       "fp16", None)
        try:
            ray.get(actor.__ray_ready__.remote())
        except Exception as err:
            print("LINE:", error_line(err, USER_ERRORS))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO)
    line = [out for out in done.stdout.splitlines() if out.startswith("LINE:")]
    assert line, done.stdout + done.stderr
    assert line[0].startswith("LINE: ray.extract asks for GPUs and Ray gave this process GPU 0, but torch "), line


def test_error_line_reads_a_user_error_from_a_remote_traceback():
    remote = RuntimeError("The actor died because of an error raised in its creation task\n  File \"x.py\", line 3\n"
                          "rrt_dist.schema.GpuUnavailable: ray.train asks for GPUs and ...: driver too old")
    assert error_line(remote, USER_ERRORS) == "ray.train asks for GPUs and ...: driver too old"
    assert error_line(RuntimeError("ValueError: not ours"), USER_ERRORS) is None


def test_search_shard_given_a_gpu_needs_gpu_faiss(tmp_path):
    import faiss

    from rrt_dist.index.core import write_index
    from rrt_dist.index.sharded import ShardActor

    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32))
    write_index(index, str(tmp_path / "shard.faiss"))
    assert ShardActor(str(tmp_path), "shard.faiss", False, None, 1).search(np.eye(8, dtype=np.float32)[:1], 1)[1][0, 0] == 0
    with pytest.raises(GpuUnavailable, match="ray.search asks for GPUs but this FAISS .* is the CPU build"):
        ShardActor(str(tmp_path), "shard.faiss", True, None, 1)


def test_gpu_block_scoring_ranks_as_faiss():
    """The GPU path of exact-mode evaluation (torch fp32 product, run here with device="cpu") against FAISS:
    the same summarised rankings (top entries, each relevant id's position), scores within 1e-5."""
    from rrt_dist.index.exact import block_scores, rank_relevant_blocks

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10_000, 13_000)
    queries = vectors[[5, 700, 2999]] + 0.3 * rng.standard_normal((3, 64)).astype(np.float32)
    blocks = lambda: ((ids[s:s + 512], vectors[s:s + 512]) for s in range(0, 3000, 512))   # noqa: E731
    relevant = [ids[[5, 1200]], ids[[700]], ids[[2999, 0, 1]]]
    on_faiss = rank_relevant_blocks(blocks, queries, relevant, top=20)
    on_torch = rank_relevant_blocks(blocks, queries, relevant, top=20, device="cpu")
    np.testing.assert_array_equal(on_torch[0], on_faiss[0])
    np.testing.assert_array_equal(on_torch[2], on_faiss[2])
    np.testing.assert_allclose(on_torch[1], on_faiss[1], atol=1e-5)
    exact = queries @ vectors[:512].T
    np.testing.assert_allclose(block_scores(queries, vectors[:512], device="cpu"), exact, atol=1e-5)


def test_search_shards_take_a_gpu_from_the_size_where_it_pays():
    from rrt_dist.schema import SearchResources

    where_it_pays = SearchResources(num_cpus=4, gpu_min_vectors=1_000_000)
    assert [where_it_pays.shard_gpus(n) for n in (999_999, 1_000_000, 5_000_000)] == [0.0, 1.0, 1.0]
    assert SearchResources(num_gpus=0, gpu_min_vectors=1).shard_gpus(10**9) == 0.0     # an explicit number wins
    assert SearchResources(num_gpus=0.5, gpu_min_vectors=10**9).shard_gpus(1) == 0.5
