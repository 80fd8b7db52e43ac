"""Every reranker on real photographs with natural positives (``rrt_dist.datasets.realphotos``): several camera views
of 29 places and objects from public repositories' sample data, 20 distractor photographs, queries held out of the
gallery (test and validation sets).

    python benchmarks/real_photos.py --mirrors DIR [--work data/bench-real] [--root DIR] [--queries test|val] [--quick]

``DIR`` holds git copies of the repositories ``rrt_dist.datasets.realphotos.SOURCES`` names (``git clone
https://github.com/<owner>/<name> DIR/<owner>/<name>``; the files are read at the pinned commits). Rows (each the
evaluate job in-process, ``dataset=folder``, Lite0 multi-scale descriptors, top-100 reranked; finished trainings are
reused on a rerun):

* global only, αQE, GV (500 locals), the structural reranker (Lite0's 7x7 grid), SuperGlobal where registered;
* the demo's RRT: trained on the synthetic benchmark's labels (``experiment=demo``, or ``--demo-checkpoint``);
* the GV-taught RRT (``train=rrt_gv``): trained on the gallery's own pairs that GV accepts / rejects, ordered by
  its logits alone;
* the self-supervised RRT (``train=rrt_selfsup``): trained on warped views of the gallery's images, ordered as its
  recipe says (logit + the fusion weight its validation chose × global cosine) and by its logits alone.

mAP, R@1 and R@5 (%) and each reranker's cost per query (seconds: its reranking of the top-100 in one process,
timed here, in the same run for every row; global: the exact search). Also how well the GV-taught pairs agree with
the ground truth (precision and recall of the accepted pairs among the gallery's top-k). Choose recipes with
``--queries val``, report ``--queries test``. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def run_evaluate(work: Path, out: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.pipelines.evaluate import evaluate

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"features_dir={work / 'features'}", f"storage_root={work}",
                                           f"output_dir={work / 'out' / out}", *overrides])
    return evaluate(cfg)


def metrics(payload: dict) -> dict:
    """``{row: {mAP, R@1, R@5}}`` in %."""
    return {row: {k: round(100 * values[k], 2) for k in ("mAP", "R@1", "R@5")}
            for row, settings in payload["results"].items() for values in [next(iter(settings.values()))]}


def cost_per_query(payload: dict, scorers: dict[str, tuple[str, dict, bool]], depth: int) -> dict:
    """Seconds per query of each of ``scorers`` (label -> (registry name, options, reads patch tables)) reranking
    the evaluated queries' global top-``depth``, one fresh in-process core each; and of the exact global search."""
    from rrt_dist.index.exact import block_searcher
    from rrt_dist.rerank.core import RerankCore
    from rrt_dist.store import FeatureStore

    def tables(key):
        t = payload.get(key, payload["feature_tables"])
        return FeatureStore(t["query"]["uri"], t["query"]["version"]), FeatureStore(t["gallery"]["uri"],
                                                                                   t["gallery"]["version"])
    query, gallery = tables("feature_tables")
    query_ids, vectors = query.globals()
    start = time.perf_counter()
    scores, ranked = block_searcher(lambda: gallery.global_blocks(4096), len(gallery))(vectors, depth)
    out = {"Global only": (time.perf_counter() - start) / len(query_ids)}
    for label, (name, options, patches) in scorers.items():
        q, g = tables("patch_tables") if patches else (query, gallery)
        core = RerankCore(name, options, q, [g])
        start = time.perf_counter()
        core.rerank(query_ids, ranked, scores, depth)
        out[label] = (time.perf_counter() - start) / len(query_ids)
    return out


def pair_agreement(mined: dict, meta: dict) -> dict:
    """Precision and recall (%) of the GV-accepted pairs against the ground truth: among mined top-k pairs of two
    gallery images of known places (distractors have none), the share of accepted ones that show one place, and the
    share of same-place top-k pairs accepted."""
    import pyarrow as pa

    from rrt_dist.datasets.base import stable_id
    from rrt_dist.pipelines.mine import mined_blocks

    place = {stable_id(row["path"]): row["place"] for row in meta["images"]["gallery"]}
    pairs = pa.concat_tables(list(mined_blocks(mined["folder"]))).to_pandas()
    pairs = pairs[~pairs.random]
    same = np.asarray([place[a] is not None and place[a] == place[c] for a, c in zip(pairs.anchor, pairs.candidate)])
    accepted = pairs.inliers.to_numpy() >= mined["threshold"]
    return {"threshold": mined["threshold"], "precision": round(100 * float(same[accepted].mean()), 2),
            "recall": round(100 * float(accepted[same].mean()), 2), "accepted": int(accepted.sum()),
            "same_place_in_top_k": int(same.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mirrors", required=True, help="folder of the repositories' git copies")
    parser.add_argument("--work", default=str(REPO / "data" / "bench-real"), help="tables, runs and reports")
    parser.add_argument("--root", help="where the benchmark is written (default: <work>/real)")
    parser.add_argument("--queries", choices=("test", "val"), default="test")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the trained RRTs")
    parser.add_argument("--demo-checkpoint", help="the demo's trained RRT (default: train experiment=demo here)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("demo", "gv", "selfsup"), help="RRT rows left out")
    parser.add_argument("--quick", action="store_true", help="2 epochs each (a smoke run, numbers meaningless)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    quick = ["train.epochs=2", "train.milestones=[]"] if args.quick else []

    from rrt_dist.datasets.realphotos import write_real_photos
    from rrt_dist.rerank.methods import list_rerankers

    root = Path(args.root).resolve() if args.root else work / "real"
    meta = write_real_photos(root, args.mirrors)
    print(json.dumps({"benchmark": meta["counts"]}), flush=True)
    folder = ["dataset=folder", f"dataset.root={root}",
              f"dataset.queries={'queries.csv' if args.queries == 'test' else 'queries_val.csv'}"]
    seed = [f"train.seed={args.seed}"]
    rows: dict = {}
    costs: dict = {}       # label -> (registry name, options, patch tables)

    methods = ["global", "aqe", "gv", "structural", *(["superglobal"] if "superglobal" in list_rerankers() else [])]
    base = run_evaluate(work, f"{args.queries}-baselines", folder + ["reranker=all", f"reranker.methods=[{','.join(methods)}]"])
    rows.update(metrics(base))
    from omegaconf import OmegaConf

    from rrt_dist.pipelines.rerank import scorer_options

    reranker = OmegaConf.create(base["config"]["reranker"])
    labels = {m: next(r for r in base["results"] if r.startswith(label)) for m, label in
              (("gv", "GV"), ("structural", "Structural"), ("superglobal", "SuperGlobal")) if m in methods}
    for name, label in labels.items():
        costs[label] = (name, scorer_options(reranker, name), name == "structural")

    def rrt_row(label: str, out: str, overrides: list[str]) -> dict:
        payload = run_evaluate(work, out, folder + ["reranker.methods=[global,rrt]", *overrides])
        rows[label] = next(v for k, v in metrics(payload).items() if k.startswith("RRT"))
        run = payload["run"]["rrt"]
        costs[label] = ("rrt", {"checkpoint": run["checkpoint"], "global_weight": run["global_weight"]}, False)
        print(json.dumps({label: rows[label]}), flush=True)
        return payload

    if "demo" not in args.skip:
        checkpoint = args.demo_checkpoint
        if not checkpoint:
            demo = run_evaluate(work, "demo", ["experiment=demo", f"dataset.root={work / 'synthetic'}",
                                               "reranker.methods=[global,rrt]", *seed, *quick])
            checkpoint = demo["training"]["checkpoint"]
        rrt_row("RRT, the demo's (synthetic labels)", f"{args.queries}-demo-rrt",
                [f"reranker.checkpoint={checkpoint}", "reranker.rrt.global_weight=0"])
    taught = None
    if "gv" not in args.skip:
        taught = rrt_row("RRT taught by GV on the gallery (logits alone)", f"{args.queries}-gv-rrt",
                         ["reranker=trained", "train=rrt_gv", "reranker.rrt.global_weight=0", *seed, *quick])
    if "selfsup" not in args.skip:
        fused = rrt_row("RRT self-supervised (its recipe: + w × global)", f"{args.queries}-selfsup-rrt",
                        ["reranker=trained", "train=rrt_selfsup", *seed, *quick])
        rows["RRT self-supervised (its recipe: + w × global)"]["w"] = fused["run"]["rrt"]["global_weight"]
        rrt_row("RRT self-supervised (logits alone)", f"{args.queries}-selfsup-rrt-logits",
                ["reranker=trained", "train=rrt_selfsup", "reranker.rrt.global_weight=0", *seed, *quick])

    depth = int(base["config"]["reranker"]["depth"])
    for label, seconds in cost_per_query(base, costs, depth).items():
        rows[label]["s_per_query"] = round(seconds, 4)
    if "αQE" in rows:
        rows["αQE"]["s_per_query"] = rows["Global only"]["s_per_query"]          # one more search: the same order
    print(f"\n{args.queries} queries ({meta['counts']}):\n")
    print("| Method | mAP | R@1 | R@5 | s / query |\n|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['mAP']:.2f} | {r['R@1']:.2f} | {r['R@5']:.2f} | {r.get('s_per_query', float('nan')):.4f} |")
    result = {"queries": args.queries, "rows": rows}
    if taught is not None:
        g, v = rows["Global only"]["mAP"], rows[labels["gv"]]["mAP"]
        t = rows["RRT taught by GV on the gallery (logits alone)"]
        result["gv_taught"] = {"share_of_gv_gain": round((t["mAP"] - g) / (v - g), 3) if v != g else None,
                               "cost_vs_gv": round(t["s_per_query"] / rows[labels["gv"]]["s_per_query"], 2),
                               "pairs": pair_agreement(taught["training"]["gv_pairs"], meta),
                               "training": {k: taught["training"][k] for k in ("best_epoch", "anchors",
                                                                                "training_images", "gv_pairs")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
