"""Reports: every number and the config as JSON, plus Markdown tables laid out like the papers'."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def revisitop_table(rows: dict[str, dict[str, dict]], settings: list[str]) -> str:
    """Paper layout (RRT Tables 1–3): rows = methods; mAP under Medium and Hard for each setting."""
    head = ["Method"] + [f"{p} {s}" for p in ("Medium", "Hard") for s in settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_setting in rows.items():
        cells = [_pct(by_setting.get(s, {}).get(p.lower(), {}).get("mAP")) for p in ("Medium", "Hard") for s in settings]
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines)


def revisitop_detail_table(rows: dict[str, dict[str, dict]], settings: list[str]) -> str:
    """Every revisitop number: mAP and mP@k for easy / medium / hard."""
    lines = ["| Method | Setting | Protocol | mAP | " + " | ".join(f"mP@{k}" for k in (1, 5, 10)) + " |",
             "|---|---|---|---|---|---|---|"]
    for method, by_setting in rows.items():
        for s in settings:
            for proto in ("easy", "medium", "hard"):
                m = by_setting.get(s, {}).get(proto)
                if m is None:
                    continue
                mpk = [_pct(m["mP@k"].get(k)) for k in (1, 5, 10)]
                lines.append(f"| {method} | {s} | {proto} | {_pct(m['mAP'])} | " + " | ".join(mpk) + " |")
    return "\n".join(lines)


def metrics_table(rows: dict[str, dict[str, dict]], settings: list[str]) -> str:
    """Generic layout for flat metric dicts (GLDv2, MSLS, metric learning, folder)."""
    names = []
    for by_setting in rows.values():
        for s in settings:
            names += [n for n in by_setting.get(s, {}) if n not in names]
    head = ["Method", "Setting"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_setting in rows.items():
        for s in settings:
            lines.append("| " + " | ".join([method, s] + [_pct(by_setting.get(s, {}).get(n)) for n in names]) + " |")
    return "\n".join(lines)


def size(n_bytes: int) -> str:
    return f"{n_bytes / 1e3:.1f} KB" if n_bytes >= 1000 else f"{n_bytes} B"


def cost_table(costs: dict[str, dict], global_bytes: int) -> str:
    """Per row: seconds per query of its own stage (a reranker's reading and scoring of one query's top-k; αQE's
    second search) and the bytes per gallery image it needs stored beyond the global descriptor."""
    lines = [f"Cost per query and storage per gallery image (every row reads the global descriptor, "
             f"{size(global_bytes)} an image)", "",
             "| Method | Seconds / query (its stage) | Stored beyond the global / image |", "|---|---|---|"]
    for method, cost in costs.items():
        seconds = cost.get("stage_s_per_query")
        stage = "—" if seconds is None else f"{seconds:.3g}" + (" (second search)" if method == "αQE" else "")
        lines.append(f"| {method} | {stage} | {size(cost.get('stored_bytes_per_image', 0))} |")
    return "\n".join(lines)


def render_markdown(protocol: str, rows: dict, settings: list[str], title: str, costs: dict | None = None,
                    global_bytes: int = 0) -> str:
    cost = f"\n\n{cost_table(costs, global_bytes)}" if costs else ""
    if protocol == "revisitop":
        body = (f"mAP (%)\n\n{revisitop_table(rows, settings)}{cost}\n\nAll revisitop numbers (%)\n\n"
                f"{revisitop_detail_table(rows, settings)}")
    else:
        body = metrics_table(rows, settings) + cost
    return f"## {title}\n\n{body}\n"


def run_section(run: dict) -> str:
    """What identifies a report: dataset root and split sizes, unreadable images, backbone, search, timings."""
    def described(backbone: dict) -> str:
        options = ", ".join(f"{k}={v}" for k, v in backbone["options"].items())
        return f"{backbone['name']} (fingerprint {backbone['fingerprint']}): {options}"

    splits = f"{run['queries']} queries, {run['gallery']} gallery images" + (
        f", {run['distractors']} distractors" if run["distractors"] else "") + (
        " (leave-one-out: every gallery image is a query, itself excluded)" if run["leave_one_out"] else "")
    unreadable = ", ".join(f"{name} {n}" for name, n in run["unreadable"].items())
    timings = ", ".join(f"{k.removesuffix('_s').replace('_', ' + ')} {v:.1f} s" for k, v in run["timings"].items())
    lines = ["## Run", "",
             f"- dataset: {run['dataset']} at `{run['root']}`: {splits}",
             f"- unreadable images (scored as misses): {unreadable}",
             f"- backbone: {described(run['backbone'])}",
             *([f"- patch grids of the structural rows: {described(run['patch_backbone'])}; their score is added "
                "to the backbone's global cosine"] if "patch_backbone" in run else []),
             f"- global search: {run['search']}",
             *([f"- RRT rows: `{run['rrt']['checkpoint']}`, ordered by " +
                (f"logit + {run['rrt']['global_weight']:g} × global cosine" if run["rrt"]["global_weight"] else
                 "logit (global cosine breaks ties)")] if "rrt" in run else []),
             *([f"- RP and MAP@R with R = {run['metric_learning_r']}"] if "metric_learning_r" in run else []),
             f"- qualitative figure: {run['qualitative_row'] or 'none (no reranked row)'} against the first row",
             f"- timings: {timings}"]
    return "\n".join(lines) + "\n"


def training_section(training: dict, rrt_global_weight: float = 0.0) -> str:
    """How the report's model was trained (RRT, or an extractor by metric learning: ``train_metric``): the curve,
    and loss / accuracy / validation score / throughput per epoch; ``rrt_global_weight``: the weight of the global
    cosine the report's RRT rows added to the logit."""
    rrt = "anchors" in training
    rate = "pairs_per_s" if rrt else "images_per_s"
    # RRT runs that chose a fusion weight: the validation score of logit + weight × global cosine
    fused = ((" Validation, + weight × global (%) |", "---|")
             if all("val_fusion" in h for h in training["history"]) and training["history"] else ("", ""))
    lines = [f"## {'RRT' if rrt else 'Extractor'} training ({training['run']})", "",
             f"{training['training_images']} training images" + (f", {training['anchors']} anchors" if rrt else "") +
             f"; best epoch {training['best_epoch']} by validation score "
             f"({'held-out split' if rrt else 'MAP@R on held-out training classes'}, never the test set).", "",
             f"![training curve]({Path(training['curve']).name})", "",
             f"| Epoch | Loss | {'Pair accuracy' if rrt else 'Batch P@1'} | Validation (%) | "
             f"{'Pairs' if rrt else 'Images'}/s |{fused[0]}", f"|---|---|---|---|---|{fused[1]}"]
    for h in training["history"]:
        fusion = h.get("val_fusion")
        lines.append(f"| {h['epoch']} | {h['loss']:.4f} | {h['accuracy']:.3f} | {_pct(h.get('val_score'))} | "
                     f"{h[rate]:.1f} |" + (f" {_pct(fusion['score'])} (weight {fusion['global_weight']:g}; global "
                                           f"only {_pct(fusion['global_score'])}) |" if fused[0] else ""))
    verdict = validation_verdict(training["history"], training["best_epoch"], rrt_global_weight) if fused[0] else ""
    return "\n".join(lines) + "\n" + (f"\n{verdict}\n" if verdict else "")


def validation_verdict(history: list[dict], best_epoch: int, used_weight: float = 0.0) -> str:
    """What the exported epoch's validation says about reranking with it (by its logits, or by logit +
    ``used_weight`` × global as the report's rows did), where it falls below the global order it reranks (a
    reranker trained off its domain does; say so rather than let the rows surprise)."""
    best = next(h for h in history if h["epoch"] == best_epoch)
    fusion, logits = best["val_fusion"], best["val_score"]
    global_only, fused, weight = fusion["global_score"], fusion["score"], fusion["global_weight"]
    if max(logits, fused) <= global_only:
        return (f"**Warning:** on its held-out validation images neither this RRT's logits ({_pct(logits)} %) nor "
                f"logit + {weight:g} × global ({_pct(fused)} %) beat the global order ({_pct(global_only)} %): expect "
                "its rows below Global. More locals per image (`train.top_locals`) or more training images may help.")
    if logits > global_only:
        return ""
    below = (f"On its held-out validation images this RRT's logits alone ({_pct(logits)} %) fall below the global "
             f"order ({_pct(global_only)} %), logit + {weight:g} × global ({_pct(fused)} %) beats it")
    if used_weight:
        return f"{below}; the RRT rows here are logit + {used_weight:g} × global."
    return (f"{below}: `reranker.rrt.global_weight={weight:g}` orders by the latter (training with "
            "`train.global_fusion=true` makes it the model's default).")


def write_report(out_dir: str | Path, payload: dict, markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default))
    md_path.write_text(markdown)
    return json_path, md_path


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
