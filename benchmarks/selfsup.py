"""Self-supervised RRT (trained on a gallery's own images, no labels) against global-only, GV and the RRT trained
on the synthetic benchmark's labels, on real photographs and on the synthetic benchmark.

    python benchmarks/selfsup.py [--seeds 0 1] [--work data/bench-selfsup] [--quick]

1. Synthetic benchmark (the demo's setting, ``experiment=demo``), per seed: the RRT trained on the training
   split's labels, and one trained self-supervised on the test gallery's own images (``train.pairs=selfsup``,
   2 views each, the same number of optimizer steps: 16 epochs of ~43 steps vs 40 of 17); Medium / Hard mAP.
2. Real photographs (``rrt_dist.datasets.photos``: 10 query photos, 3 hard views of each among 70 gallery
   images): global only, GV, the labels-trained demo RRT of seed 0, the self-supervised RRT trained on the
   10 other photos (16 views each; none of the query photos or their views) with the demo's 32 locals and
   ordered by its logits, per seed, and ones trained on the evaluated gallery's own 70 images (4 views each),
   as a user would (the folder recipe, ``train=rrt_selfsup``), per seed, with each of ``--gallery-locals`` per
   image (200: the recipe's; 32: the demo's; then fed each of ``--test-locals`` at test), each ordered by
   logit + the fusion weight its validation chose × global cosine (the recipe's order) and by its logits alone;
   mAP and R@1.

Each run is the evaluate job in-process; finished trainings are reused on a rerun. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_evaluate(work: Path, out: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.pipelines.evaluate import evaluate

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"features_dir={work / 'features'}", f"train.storage_path={work / 'runs'}",
                                           f"train.selfsup.root={work / 'views'}", f"output_dir={work / out}",
                                           "reranker.methods=[global,gv,rrt]", *overrides])
    payload = evaluate(cfg)
    payload["output_dir"] = str(work / out)
    return payload


def metrics(payload: dict, keys: dict[str, tuple[str, ...]]) -> dict:
    """``{row: {name: value in %}}`` of each results row in the first setting; ``keys``: name -> path in its metrics."""
    def value(values: dict, path: tuple[str, ...]) -> float:
        for key in path:
            values = values[key]
        return round(100 * values, 2)

    return {row: {name: value(next(iter(settings.values())), path) for name, path in keys.items()}
            for row, settings in payload["results"].items()}


def matching_ceiling(report: dict, n_locals: tuple[int, ...] = (32, 100, 500),
                     global_weights: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0, 16.0)) -> dict:
    """mAP (%) of ranking a folder benchmark's whole gallery by the count of mutual nearest-neighbour locals
    (cosine > 0.5) among each image's best ``n`` locals, ties broken by the global score: how much
    evidence ``n`` locals hold, whatever a reranker does with them. Also by that count / ``n`` + each
    of ``global_weights`` × global cosine: what the evidence adds to the global order (weights seen on
    the test set, a diagnostic, not a result)."""
    import numpy as np

    from rrt_dist.datasets import read_folder
    from rrt_dist.eval.metrics import average_precision, positive_positions
    from rrt_dist.rerank.scorers import truncate_locals
    from rrt_dist.store import FeatureStore

    bench = read_folder(report["run"]["root"])
    tables = report["feature_tables"]
    query_ids, gallery_ids = bench.queries.column("id").to_numpy(), bench.gallery.column("id").to_numpy()
    queries = FeatureStore(tables["query"]["uri"], tables["query"]["version"]).take_locals(query_ids)
    gallery = FeatureStore(tables["gallery"]["uri"], tables["gallery"]["version"]).take_locals(gallery_ids)
    out = {}
    for n in n_locals:
        q, g = truncate_locals(queries, n), truncate_locals(gallery, n)
        aps: dict[float, list] = {}
        for i, positives in enumerate(bench.protocol.positives):
            a = q["local"][i][~q["mask"][i]]
            counts = np.empty(len(gallery_ids))
            for j in range(len(gallery_ids)):
                sim = a @ g["local"][j][~g["mask"][j]].T
                counts[j] = ((sim.argmax(0)[sim.argmax(1)] == np.arange(len(a))) & (sim.max(1) > 0.5)).sum()
            cosine = g["global"] @ q["global"][i]
            for weight in global_weights:
                # weight 0: the global cosine (< 1) scaled below one match only breaks ties
                order = np.argsort(-(counts / n + (weight or 1e-3 / n) * cosine), kind="stable")
                aps.setdefault(weight, []).append(average_precision(positive_positions(order, positives),
                                                                    len(positives)))
        for weight, values in aps.items():
            out[f"{n} locals" + (f" + {weight:g} × global" if weight else "")] = round(100 * float(np.mean(values)), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default=str(REPO / "data" / "bench-selfsup"))
    parser.add_argument("--quick", action="store_true", help="2 epochs each (a smoke run, numbers meaningless)")
    parser.add_argument("--gallery-locals", type=int, nargs="+", default=[200, 32],
                        help="train on the evaluated gallery with this many locals per image (train.top_locals)")
    parser.add_argument("--test-locals", type=int, nargs="*", default=[],
                        help="and rerank with that model fed this many locals (reranker.rrt.top_locals, gv too)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    quick = ["train.epochs=2", "train.milestones=[]"] if args.quick else []
    synthetic_root = f"dataset.root={work / 'synthetic'}"
    revisitop = {"Medium": ("medium", "mAP"), "Hard": ("hard", "mAP")}
    result: dict = {"synthetic": {seed: {} for seed in args.seeds}, "photos": {}}

    def synthetic(seed: int, pairs: str) -> dict:
        extra = (["train.pairs=selfsup", "train.selfsup.views=2", "train.epochs=16", "train.milestones=[12]"]
                 if pairs == "selfsup" else [])
        payload = run_evaluate(work, f"synthetic-{pairs}-{seed}", ["experiment=demo", synthetic_root,
                                                                   f"train.seed={seed}", *extra, *quick])
        result["synthetic"][seed][pairs] = metrics(payload, revisitop)
        print(json.dumps({"synthetic": {seed: {pairs: result["synthetic"][seed][pairs]}}}), flush=True)
        return payload

    # The demo's labels-trained RRT (first seed) is also the "demo-trained RRT" row on the photographs.
    demo_checkpoint = synthetic(args.seeds[0], "labels")["training"]["checkpoint"]

    from rrt_dist.datasets.photos import write_photo_benchmark

    photos = work / "photos"
    result["photos_benchmark"] = write_photo_benchmark(photos)
    folder = ["dataset=folder", f"dataset.root={photos}"]
    ranked = {"mAP": ("mAP",), "R@1": ("R@1",)}
    demo = run_evaluate(work, "photos-demo-rrt", folder + [f"reranker.checkpoint={demo_checkpoint}"])
    result["photos"]["demo RRT (synthetic labels)"] = metrics(demo, ranked)
    result["photos"]["mutual-NN match count, mAP"] = matching_ceiling(demo)
    for seed in args.seeds:
        selfsup = run_evaluate(work, f"photos-selfsup-{seed}", folder + [
            "reranker=trained", f"train.selfsup.images={photos / 'train'}", "train.selfsup.views=16",
            "train.top_locals=32", "reranker.rrt.global_weight=0", f"train.seed={seed}", *quick])
        result["photos"][f"self-supervised RRT on the 10 training photos, seed {seed}"] = metrics(selfsup, ranked)
        print(json.dumps({"photos": result["photos"]}), flush=True)

    def on_gallery(row: str, out: str, overrides: list[str]) -> dict:
        """The RRT rows of one training run on the gallery: logit + the fusion weight its validation chose × global
        cosine (the folder recipe's order), then its logits alone (the paper's RRT; the training is reused)."""
        fused = run_evaluate(work, out, folder + ["reranker=trained", *overrides, *quick])
        weight = fused["run"]["rrt"]["global_weight"]
        result["photos"][f"{row}, + {weight:g} × global (the weight its validation chose)"] = metrics(fused, ranked)
        logits = run_evaluate(work, f"{out}-logits", folder + ["reranker=trained", "reranker.rrt.global_weight=0",
                                                                *overrides, *quick])
        result["photos"][f"{row}, logits alone"] = metrics(logits, ranked)
        print(json.dumps({"photos": result["photos"]}), flush=True)
        return fused

    # What a user does: train on the gallery itself (its 70 images; the query photos stay out).
    for n in args.gallery_locals:
        for seed in args.seeds:
            gallery = on_gallery(f"self-supervised RRT on the evaluated gallery, {n} locals, seed {seed}",
                                 f"photos-selfsup-gallery-{n}-{seed}", [f"train.top_locals={n}", f"train.seed={seed}"])
        for m in args.test_locals:
            fed = run_evaluate(work, f"photos-selfsup-gallery-{n}-test{m}", folder + [
                "reranker=trained", f"train.top_locals={n}", f"train.seed={args.seeds[-1]}", f"reranker.rrt.top_locals={m}",
                f"reranker.gv.top_locals={m}", *quick])
            result["photos"][f"the {n}-local RRT of the last seed fed {m} locals at test (GV too)"] = \
                metrics(fed, ranked)
    result["photos"]["mutual-NN match count, mAP"].update(matching_ceiling(gallery, tuple(args.gallery_locals)))
    print(json.dumps({"photos": result["photos"]}), flush=True)

    for seed in args.seeds:
        synthetic(seed, "selfsup")
        if seed != args.seeds[0]:
            synthetic(seed, "labels")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
