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
