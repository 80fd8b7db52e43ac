"""Metric-learning training with structural similarity on the synthetic benchmark used as a metric-learning
set (``experiment=ml_synthetic``: landmark = class; 50 training landmarks, 10 held out for validation, the
test split's 50 other landmarks evaluated leave-one-out), from the shipped Lite0 weights.

    python benchmarks/metric_learning.py [--seeds 0 1] [--losses margin triplet multisimilarity]
                                         [--trained-on G G+S] [--work DIR]

Rows: the untrained extractor, then per loss, training similarity (``--trained-on``: G, the global only,
``train.metric.structural=false``; G+S, global + structural) and seed, the trained extractor; each evaluated as
Global and Global + structural (top-100): P@1, RP, MAP@R on the test landmarks, and the training curve
(validation MAP@R per epoch). Finished runs are reused on a rerun. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = {"Global only": "G", "Structural (top-100)": "G+S"}


def compose(work: Path, out: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=["experiment=ml_synthetic", f"features_dir={work / 'features'}",
                                                  f"train.storage_path={work / 'runs'}", f"output_dir={work / out}",
                                                  *overrides])


def test_metrics(payload: dict) -> dict:
    return {ROWS[row]: {k: round(100 * v, 2) for k, v in next(iter(settings.values())).items()
                        if k in ("P@1", "RP", "MAP@R")}
            for row, settings in payload["results"].items()}


def main() -> None:
    from omegaconf import open_dict

    from rrt_dist.pipelines.evaluate import evaluate
    from rrt_dist.pipelines.train import train_metric

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--losses", nargs="+", default=["margin", "triplet", "multisimilarity"])
    parser.add_argument("--trained-on", nargs="+", default=["G", "G+S"], choices=["G", "G+S"])
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench-metric")
    args = parser.parse_args()
    results = {"untrained": test_metrics(evaluate(compose(args.work, "untrained", [])))}
    curves = {}
    for loss in args.losses:
        for trained_on in args.trained_on:
            for seed in args.seeds:
                name = f"{loss} on {trained_on}, seed {seed}"
                cfg = compose(args.work, f"{loss}-{trained_on}-s{seed}", [
                    f"train.metric.loss={loss}", f"train.metric.structural={trained_on == 'G+S'}",
                    f"train.seed={seed}"])
                training = train_metric(cfg, cfg.output_dir)
                with open_dict(cfg):
                    cfg.backbone.options.update(training["backbone"])
                results[name] = test_metrics(evaluate(cfg, training))
                curves[name] = [round(100 * h["val_score"], 2) for h in training["history"]]
                print(name, results[name], "validation MAP@R per epoch:", curves[name], flush=True)
    print("\n| extractor | G P@1 | G RP | G MAP@R | G+S P@1 | G+S RP | G+S MAP@R |\n|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | " + " | ".join(f"{rows[r][k]:.2f}" for r in ("G", "G+S") for k in ("P@1", "RP", "MAP@R"))
              + " |")
    print(json.dumps({"results": results, "validation_curves": curves}))


if __name__ == "__main__":
    main()
