"""The results browser: what every evaluation writes beside its report (``browse/``: a static page, its data and
thumbnails of the images it shows) and ``rrt-dist browse RUN [RUN2]``, which serves one run or two side by side
on 127.0.0.1.

A query page shows the query and, per row of the report (Global, αQE, each reranker), its top-K with positives
and junk marked by protocol and each reranked image's move; clicking a reranked pair draws why it moved: GV's
verified matches, the structural reranker's heaviest transport matches and marginals, RRT's last-layer attention of
its classification token to each local (``scorer.explain``).
"""
from __future__ import annotations

import http.server
import json
import re
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np

from rrt_dist.eval.browse import (chosen_queries, crop_origin, normalised, normalised_weights, query_record,
                                  query_summary, write_data, write_thumbnails)
from rrt_dist.rerank.core import RerankCore
from rrt_dist.rerank.methods import get_reranker, parse_method
from rrt_dist.schema import ConfigError

from .rerank import scorer_options

ASSETS = ("browse.html", "browse.js", "style.css")     # browse.html is written as index.html


def row_bases(methods: list[str], labels: list[str]) -> dict[str, str]:
    """Reranked row label -> the label of the row whose ranking it reranked (Global, or αQE), where both are rows."""
    by_method = {parse_method(m): label for m, label in zip(methods, labels)}
    plain = {m.expand: label for m, label in by_method.items() if m.reranker is None}
    return {label: plain[m.expand] for m, label in by_method.items() if m.reranker and m.expand in plain}


def pair_evidence(cfg, stores: dict, patch_stores: dict, reranker: str, pairs: dict[int, set]) -> dict:
    """``{query id: {candidate id: evidence}}`` from reranker ``reranker``'s ``explain`` over the tables it reads
    (in this process: a few thousand pairs at most)."""
    entry = get_reranker(reranker)
    tables = patch_stores if "patches" in entry.inputs else stores
    core = RerankCore(reranker, scorer_options(cfg.reranker, reranker), tables["query"],
                      [tables[n] for n in ("gallery", "distractor") if n in tables])
    out = {}
    for qid, cands in pairs.items():
        ids = sorted(cands)
        out[qid] = dict(zip(ids, core.explain(qid, np.asarray(ids, np.int64))))
    return out


def write_browse(cfg, bench, stores: dict, patch_stores: dict, rows: dict, examples: dict, per_query: dict,
                 title: str) -> Path:
    """``<output_dir>/browse/``: the page, ``data/`` and ``thumbs/`` (see :mod:`rrt_dist.eval.browse`)."""
    out = Path(cfg.output_dir) / "browse"
    labels = list(rows)
    methods = list(cfg.reranker.methods)
    bases = row_bases(methods, labels)
    queries = chosen_queries(per_query, bases, cfg.browse.max_queries)
    records = {q: query_record(bench, q, examples, bases, cfg.browse.top) for q in queries}

    q_uris, q_boxes = bench.queries.column("uri").to_pylist(), bench.queries.column("bbox").to_pylist()
    g_uris = bench.gallery.column("uri").to_pylist()
    query_ids = bench.queries.column("id").to_numpy()
    images = {f"q{query_ids[q]}": (q_uris[q], q_boxes[q]) for q in queries}
    shown = {int(g) for r in records.values() for by_row in r["rows"].values() for row in by_row.values() for g, *_ in row}
    shown |= {int(g) for r in records.values() for g, _ in r["missed"]}
    ids = np.asarray(sorted(shown), np.int64)
    images.update({f"g{g}": (g_uris[i], None) for g, i in zip(ids.tolist(), bench.gallery_indices(ids).tolist())})
    sizes = write_thumbnails(images, out / "thumbs", cfg.browse.thumbnail_px)

    reranker_of = {label: parse_method(m).reranker.name for m, label in zip(methods, labels)
                   if parse_method(m).reranker and parse_method(m).reranker.explains}
    for reranker in sorted(set(reranker_of.values())):
        pairs: dict[int, set] = {}
        for q, record in records.items():
            for by_row in record["rows"].values():
                for label, row in by_row.items():
                    if reranker_of.get(label) == reranker:
                        pairs.setdefault(int(query_ids[q]), set()).update(int(g) for g, *_ in row)
        evidence = pair_evidence(cfg, stores, patch_stores, reranker, pairs)
        for q, record in records.items():
            qid = int(query_ids[q])
            size_q, origin = sizes[f"q{qid}"], crop_origin(q_boxes[q])
            record.setdefault("evidence", {})[reranker] = {
                str(g): {key: (normalised(value, origin, size_q, sizes[f"g{g}"]) if key == "matches" else
                               normalised_weights(value, origin if key == "query_weights" else np.zeros(2),
                                                  size_q if key == "query_weights" else sizes[f"g{g}"]))
                         for key, value in found.items()}
                for g, found in evidence.get(qid, {}).items() if size_q and sizes[f"g{g}"]}

    summary = {"title": title, "benchmark": bench.name, "protocol": bench.protocol.name,
               "settings": list(examples), "rows": labels, "bases": bases, "rerankers": reranker_of,
               "results": rows, "top": cfg.browse.top, "queries_total": bench.queries.num_rows,
               "queries": [query_summary(bench, q, per_query) for q in queries],
               "sizes": {name: size for name, size in sizes.items() if size}}
    write_data(out, summary, records)
    for asset in ASSETS[1:]:
        shutil.copyfile(str(files("rrt_dist.pipelines").joinpath(asset)), out / asset)
    (out / "index.html").write_text(files("rrt_dist.pipelines").joinpath("browse.html").read_text())
    (out / "config.js").write_text("rrtBrowse.configure(" + json.dumps({"runs": [{"base": "", "name": title}]}) + ");\n")
    return out / "index.html"


def run_summary(run: Path) -> dict:
    """The summary a run's browser reads (``browse/data/run.js``)."""
    path = run / "browse" / "data" / "run.js"
    if not path.is_file():
        raise ConfigError(f"{run} has no results browser ({path} is missing): an evaluation writes one in its "
                          "output folder (browse.enabled=true)")
    text = path.read_text()
    return json.loads(text[text.index(",") + 1:text.rindex(")")])


def comparable(first: dict, second: dict) -> str | None:
    """Why two runs cannot be compared query by query (None when they can): another benchmark, or other queries."""
    if first["benchmark"] != second["benchmark"] or first["protocol"] != second["protocol"]:
        return (f"the runs evaluate different benchmarks: {first['benchmark']} ({first['protocol']}) and "
                f"{second['benchmark']} ({second['protocol']})")
    if first["queries_total"] != second["queries_total"]:
        return (f"the runs evaluate {first['queries_total']} and {second['queries_total']} queries of "
                f"{first['benchmark']}: not the same query set")
    return None


class BrowseHandler(http.server.SimpleHTTPRequestHandler):
    """``/`` the page; ``/config.js`` which runs it shows; ``/run<i>/...`` run i's ``browse/`` folder."""
    runs: list[Path] = []

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        match = re.fullmatch(r"/run(\d+)/([\w./-]+)", path)
        if match and int(match[1]) < len(self.runs) and ".." not in match[2]:
            return str(self.runs[int(match[1])] / "browse" / match[2])
        if path in ("/", "/index.html") or path.lstrip("/") in ASSETS[1:]:
            return str(self.runs[0] / "browse" / (path.lstrip("/") or "index.html"))
        return str(self.runs[0] / "browse" / "missing")

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/config.js":
            body = ("rrtBrowse.configure(" + json.dumps({"runs": [{"base": f"run{i}/", "name": str(r)}
                                                                   for i, r in enumerate(self.runs)]}) + ");\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args):              # one line per request would bury the URL
        pass


def browse_server(runs: list[str], port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server of ``runs`` (one, or two to compare: the same benchmark and queries) on 127.0.0.1:``port`` (0: any
    free port), not yet serving."""
    paths = [Path(r).resolve() for r in runs]
    summaries = [run_summary(p) for p in paths]
    if len(paths) == 2 and (reason := comparable(*summaries)):
        raise ConfigError(f"cannot compare {paths[0]} with {paths[1]}: {reason}")
    handler = type("Handler", (BrowseHandler,), {"runs": paths})
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
