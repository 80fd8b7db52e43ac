"""The results browser every evaluation writes, in headless Chromium: the table, a query page whose rows hold the
images an independent ranking expects in its order, GV evidence with one line per verified match, two runs side by
side through `rrt-dist browse`, and no JavaScript error."""
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import console_errors

from rrt_dist.datasets import read_revisitop
from rrt_dist.eval.metrics import REVISITOP_PROTOCOLS
from rrt_dist.rerank.gv import gv_scores
from rrt_dist.rerank.options import GVConfig
from rrt_dist.store import FeatureStore


@pytest.fixture(scope="module")
def runs(run_job, small_preset, tmp_path_factory):
    """Two evaluations of the small preset: Global + GV, and Global + αQE + GV over αQE."""
    out = tmp_path_factory.mktemp("browse")
    run_job("evaluate", [*small_preset, "reranker.methods=[global,gv]"], out / "a")
    run_job("evaluate", [*small_preset, "reranker.methods=[global,aqe,aqe+gv]", "browse.top=5"], out / "b")
    return out / "a", out / "b"


def expected_rows(run: Path, q: int) -> dict:
    """Query ``q``'s Global and GV top-10 (medium protocol, no distractors) worked out here from the tables: exact
    search in numpy; GV of the junk-free top-100 with the report's options, ordered by inliers then global score."""
    report = json.loads((run / "report.json").read_text())
    stores = {name: FeatureStore(t["uri"]) for name, t in report["feature_tables"].items()}
    bench = read_revisitop(report["run"]["root"], "synthetic")
    qid = int(bench.queries.column("id")[q].as_py())
    query = stores["query"].take_locals([qid])
    g_ids, g = stores["gallery"].globals()
    scores = g @ query["global"][0]
    order = np.argsort(-scores, kind="stable")
    junk_keys = REVISITOP_PROTOCOLS["medium"][1]
    gallery_ids = bench.gallery.column("id").to_numpy()
    junk = set(gallery_ids[np.concatenate([bench.protocol.gnd[q][k] for k in junk_keys])].tolist())
    head = [i for i in order if int(g_ids[i]) not in junk][:100]
    cands = stores["gallery"].take_locals(g_ids[head])
    n = int(query["n_local"][0])
    inliers = gv_scores(query["local"][0][:n], query["positions"][0][:n], cands["local"], cands["positions"],
                        cands["n_local"], GVConfig(**{k: v for k, v in report["config"]["reranker"]["gv"].items()
                                                      if k != "max_local"}))     # the renamed key, refused
    gv_order = sorted(range(len(head)), key=lambda i: (-inliers[i], -scores[head[i]]))
    return {"global": [str(i) for i in g_ids[order[:10]]],
            "gv": [str(g_ids[head[i]]) for i in gv_order[:10]],
            "inliers": {str(g_ids[head[i]]): int(inliers[i]) for i in gv_order[:10]}}


def test_an_evaluation_writes_a_browser_of_the_images_it_shows(runs):
    a, b = runs
    data = (a / "browse" / "data" / "run.js").read_text()
    summary = json.loads(data[data.index(",") + 1:data.rindex(")")])
    assert summary["rows"] == ["Global only", "GV (top-100)"] and summary["bases"] == {"GV (top-100)": "Global only"}
    assert len(summary["queries"]) == 12 and summary["settings"] == ["synthetic", "synthetic+100"]
    chunk = (a / "browse" / "data" / "queries-0.js").read_text()
    records = json.loads(chunk[chunk.index(",") + 1:chunk.rindex(")")])
    shown = {f"g{g}" for r in records.values() for rows in r["rows"].values() for row in rows.values() for g, *_ in row}
    shown |= {f"g{g}" for r in records.values() for g, _ in r["missed"]} | {f"q{q['id']}" for q in summary["queries"]}
    thumbs = {p.stem for p in (a / "browse" / "thumbs").iterdir()}
    assert thumbs == shown                                     # the images shown, each once; nothing else
    assert len(thumbs) < 12 + 172                              # not the gallery
    # per-query APs average to the report's mAP
    report = json.loads((a / "report.json").read_text())
    medium = [q["ap"]["synthetic"]["GV (top-100)"]["medium"] for q in summary["queries"]]
    assert np.mean(medium) == pytest.approx(report["results"]["GV (top-100)"]["synthetic"]["medium"]["mAP"], abs=1e-4)


def test_the_browser_in_a_real_browser(runs, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from rrt_dist.cli import main
    from rrt_dist.pipelines.browse import browse_server

    a, b = runs
    driver, wait = browser, WebDriverWait(browser, 30)

    def shot(name):
        driver.save_screenshot(str(tmp_path / f"{name}.png"))
        print(f"screenshot: {tmp_path / name}.png")

    driver.get((a / "browse" / "index.html").as_uri())         # a file URL: no server
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.results tr.method"))
    assert [r.find_element(By.TAG_NAME, "td").text for r in driver.find_elements(By.CSS_SELECTOR, "tr.method")] \
        == ["Global only", "GV (top-100)"]
    assert driver.find_elements(By.CSS_SELECTOR, "#view h2") == []      # one run: the page's title is its heading
    shot("table")
    gv_medium = next(x for x in driver.find_elements(By.CSS_SELECTOR, "table.results a")
                     if x.get_attribute("href").endswith("#list/GV%20(top-100)/synthetic/medium"))
    gv_medium.click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.query")) == 12)
    changes = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "tr.query td:nth-child(5)")]
    values = [float(c) for c in changes if c != "–"]
    assert values == sorted(values, reverse=True) and values[0] > 0      # most improved first
    shot("queries")

    q = 0
    driver.get((a / "browse" / "index.html").as_uri() + f"#q/{q}/synthetic/medium")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-row='GV (top-100)'] figure"))
    ids = {row: [f.get_attribute("data-id") for f in driver.find_elements(By.CSS_SELECTOR, f"[data-row='{row}'] figure")]
           for row in ("Global only", "GV (top-100)")}
    expected = expected_rows(a, q)
    assert ids["Global only"] == expected["global"]
    assert ids["GV (top-100)"] == expected["gv"]
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)"))
    shot("query")
    first = driver.find_element(By.CSS_SELECTOR, "[data-row='GV (top-100)'] figure.explainable")
    first.click()
    wait.until(lambda d: d.find_element(By.ID, "evidence").is_displayed())
    lines = driver.find_elements(By.CSS_SELECTOR, "#evidence line.match")
    assert len(lines) == expected["inliers"][first.get_attribute("data-id")] > 0
    assert re.match(rf"GV: {len(lines)} verified matches", driver.find_element(By.ID, "evidence-title").text)
    shot("evidence")
    assert console_errors(driver) == []

    server = browse_server([str(a), str(b)], 0)                 # what `rrt-dist browse A B` serves
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/#q/{q}/synthetic/medium")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "section.run")) == 2
                   and d.find_elements(By.CSS_SELECTOR, "[data-run='1'] [data-row]"))
        rows = [[r.get_attribute("data-row") for r in s.find_elements(By.CSS_SELECTOR, "[data-row]")]
                for s in driver.find_elements(By.CSS_SELECTOR, "section.run")]
        assert rows == [["Global only", "GV (top-100)"], ["Global only", "αQE", "αQE + GV (top-100)"]]
        second = driver.find_elements(By.CSS_SELECTOR, "[data-run='1'] [data-row='Global only'] figure")
        assert [f.get_attribute("data-id") for f in second] == expected["global"][:5]       # browse.top=5
        shot("compare")
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")      # both tables, each under its run's heading
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "table.results")) == 2)
        headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#view h2")]
        assert [h.split(": ")[0] for h in headings] == ["Run 1", "Run 2"] and "synthetic: synthetic" not in " ".join(headings)
        assert console_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()

    with pytest.raises(SystemExit):                              # a folder that is no evaluation: one line
        main(["browse", str(tmp_path)])
    assert "has no results browser" in capsys.readouterr().err


def test_two_runs_of_different_benchmarks_are_not_compared():
    from rrt_dist.pipelines.browse import comparable, row_bases

    roxford = {"benchmark": "roxford5k", "protocol": "revisitop", "queries_total": 70}
    assert comparable(roxford, dict(roxford)) is None
    assert "different benchmarks: roxford5k (revisitop) and rparis6k" in comparable(
        roxford, {**roxford, "benchmark": "rparis6k"})
    assert "70 and 55 queries" in comparable(roxford, {**roxford, "queries_total": 55})
    assert row_bases(["global", "aqe", "gv", "aqe+gv", "rrt"], ["G", "A", "GV", "A+GV", "RRT"]) == \
        {"GV": "G", "A+GV": "A", "RRT": "G"}
