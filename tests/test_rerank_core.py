"""The reranker core's batch of requests (the service's reranker): the same orders and scores as each request alone,
whether the scorer scores all pairs in one run (RRT) or query by query (GV)."""
import numpy as np
import torch

from rrt_dist.models.rrt import RerankingTransformer
from rrt_dist.rerank.core import RerankCore
from rrt_dist.store import MemoryFeatures


def features(rng, n, width=12, local_dim=16, global_dim=32):
    local = rng.normal(size=(n, width, local_dim)).astype(np.float32)
    local /= np.linalg.norm(local, axis=-1, keepdims=True)
    n_local = rng.integers(4, width + 1, n)
    return {"global": rng.normal(size=(n, global_dim)).astype(np.float32), "local": local,
            "positions": rng.uniform(0, 99, (n, width, 2)).astype(np.float32),
            "scales": rng.integers(0, 7, (n, width)), "n_local": n_local,
            "mask": np.arange(width)[None] >= n_local[:, None]}


def test_a_batch_of_requests_reranks_as_each_request_alone():
    rng = np.random.default_rng(0)
    stored, queries = features(rng, 40), features(rng, 3)
    requests = [{k: v[i:i + 1] for k, v in queries.items()} for i in range(3)]
    ids = [rng.permutation(np.arange(100, 140))[:n] for n in (9, 5, 0)]          # one request found nothing
    for r in range(2):            # each query's fifth candidate shows the query's locals, moved: GV verifies it
        row = ids[r][4] - 100
        for key in ("local", "n_local", "mask", "scales"):
            stored[key][row] = queries[key][r]
        stored["positions"][row] = queries["positions"][r] + [7.0, -3.0]
    gallery = MemoryFeatures(np.arange(100, 140), stored)
    scores = [np.sort(rng.uniform(size=len(row)))[::-1].astype(np.float32) for row in ids]
    torch.manual_seed(0)
    model = RerankingTransformer(global_dim=32, local_dim=16, model_dim=16, mlp_dim=32, num_layers=2).eval()
    for method, options in (("rrt", {"model": model, "device": "cpu", "chunk": 4}), ("gv", {})):
        core = RerankCore(method, options, None, [gallery])
        batch = core.rerank_queries(requests, ids, scores, 7)
        for request, row, row_scores, (order, reranked) in zip(requests, ids, scores, batch):
            alone = core.rerank_query(request, row, row_scores, 7)
            np.testing.assert_array_equal(order, alone[0])
            np.testing.assert_allclose(reranked, alone[1], atol=1e-5)
            assert sorted(order.tolist()) == sorted(row.tolist()) and len(reranked) == min(7, len(row))
        assert not np.array_equal(batch[0][0], ids[0]) and batch[2][0].size == 0     # reordered; nothing to rerank
    assert batch[0][0][0] == ids[0][4] and batch[1][0][0] == ids[1][4]          # GV: the verified one first
