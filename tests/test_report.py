"""The report's training section: what the exported epoch's validation says about reranking with it."""
from rrt_dist.eval.report import training_section


def trained(val_score: float, fused: float, global_score: float, weight: float = 64.0) -> dict:
    fusion = {"global_weight": weight, "score": fused, "global_score": global_score}
    epoch = {"epoch": 1, "loss": 0.5, "accuracy": 0.8, "pairs_per_s": 10.0, "val_score": val_score,
             "val_fusion": fusion}
    # epoch 0 (not exported) beats the global order; only the exported epoch counts
    return {"run": "rrt-x", "training_images": 280, "anchors": 70, "best_epoch": 1, "curve": "/out/curve.png",
            "history": [{**epoch, "epoch": 0, "val_score": 0.99, "val_fusion": {**fusion, "score": 0.99}}, epoch]}


def test_training_section_warns_when_validation_falls_below_the_global_order():
    below = training_section(trained(0.7159, 0.9765, 0.9765))
    assert "**Warning:**" in below and "71.59 %" in below and "+ 64 × global (97.65 %)" in below
    assert "| 1 | 0.5000 | 0.800 | 71.59 | 10.0 | 97.65 (weight 64; global only 97.65) |" in below

    fusion_only = training_section(trained(0.7159, 0.9819, 0.9765, 128.0))
    assert "Warning" not in fusion_only
    assert "logit + 128 × global (98.19 %) beats it: `reranker.rrt.global_weight=128`" in fusion_only
    fused_rows = training_section(trained(0.7159, 0.9819, 0.9765, 128.0), rrt_global_weight=128.0)
    assert "beats it; the RRT rows here are logit + 128 × global." in fused_rows and "global_weight=" not in fused_rows

    beats = training_section(trained(0.99, 0.995, 0.9765, 0.0))
    assert "Warning" not in beats and "global_weight=" not in beats


def test_cost_table_counts_what_each_reranker_needs_stored_beyond_the_global():
    import numpy as np

    from rrt_dist.eval.costs import add_storage
    from rrt_dist.eval.report import render_markdown
    from rrt_dist.store import features_schema

    fp16 = features_schema(2048, 128, 500, "x", {}, "f")
    int8 = features_schema(2048, 128, 500, "x", {}, "f", "int8")
    pq = features_schema(2048, 128, 500, "x", {}, "f", "pq", np.zeros((16, 256, 8), np.float32))
    patches = features_schema(320, 320, 49, "grid", {}, "g")
    rows = ["global", "aqe", "superglobal", "gv", "rrt", "structural"]
    costs = {name: {"method": name, "stage_s_per_query": None if name == "global" else 0.125} for name in rows}
    # every locals reader: 500 x (local, scale index) + n_local; GV also 500 (x, y) float32 positions
    assert add_storage(costs, fp16, patches) == 2048 * 2
    stored = {name: c["stored_bytes_per_image"] for name, c in costs.items()}
    assert stored == {"global": 0, "aqe": 0, "superglobal": 0, "gv": 500 * 128 * 2 + 500 + 4 + 500 * 8,
                      "rrt": 500 * 128 * 2 + 500 + 4, "structural": 320 * 2 + 49 * 320 * 2 + 49 * 8 + 49 + 4}
    add_storage(costs, int8)                    # one byte a value and a float32 scale per local
    assert costs["rrt"]["stored_bytes_per_image"] == 500 * 128 + 500 * 4 + 500 + 4
    add_storage(costs, pq)                      # 16 codes a local
    assert costs["gv"]["stored_bytes_per_image"] == 500 * 16 + 500 + 4 + 500 * 8
    add_storage(costs, fp16)                    # patches from the run's own tables: its locals and positions
    assert costs["structural"]["stored_bytes_per_image"] == 500 * 128 * 2 + 4 + 500 * 8
    markdown = render_markdown("recall", {"Global only": {"s": {"R@1": 0.5}}}, ["s"], "t",
                               {"Global only": costs["global"], "αQE": costs["aqe"], "GV (top-100)": costs["gv"]}, 4096)
    assert "| Global only | — | 0 B |" in markdown and "| αQE | 0.125 (second search) | 0 B |" in markdown
    assert "| GV (top-100) | 0.125 | 132.5 KB |" in markdown and "global descriptor, 4.1 KB an image" in markdown
