"""The results browser at R1M-like scale: how long an evaluation takes to write it and how soon it paints, for 70
queries over a 100k gallery against the same 70 queries over 1k (the baseline: the page should not care how large
the gallery is; it only reads each query's top-K and positives).

    python benchmarks/browse.py                        # 1k and 100k
    python benchmarks/browse.py --sizes 1000 1000000 --work /big/disk

The tables are the scale benchmark's (``benchmarks/scale.py``: DELG-shaped, PQ locals, 8 planted positives a
query); their manifests point at a few generated JPEGs (each gallery image one of them), so thumbnails are really
decoded and written. Rows: Global only and GV (top-100), computed as the evaluate job does (exact summarised
ranking, a one-actor GV pool). Measured in headless Chromium (Debian's chromium + chromium-driver) from a file URL:
first contentful paint of the table, and the time from following a link to a query page until its rows' images
are all decoded. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import write_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sample_images(folder: Path, count: int = 16) -> list[str]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (1024, 768), interpolation=cv2.INTER_CUBIC)
        paths.append(str(folder / f"img{i}.jpg"))
        cv2.imwrite(paths[-1], image)
    return paths


def browse_run(work: Path, n: int, images: list[str]) -> dict:
    """Write the browser of a Global + GV evaluation of the scale tables of ``n`` images; returns its timings."""
    from hydra import compose, initialize_config_dir

    from rrt_dist.datasets.base import Benchmark, make_manifest
    from rrt_dist.eval.methods import evaluate_methods
    from rrt_dist.pipelines.browse import write_browse
    from rrt_dist.pipelines.rerank import open_pool

    bench, qstore, gstore = write_benchmark(work / f"tables-{n}", n)
    q_ids, g_ids = bench.queries.column("id").to_numpy(), bench.gallery.column("id").to_numpy()
    bench = Benchmark(bench.name, make_manifest(q_ids, [images[i % len(images)] for i in range(len(q_ids))], "query"),
                      make_manifest(g_ids, [images[i % len(images)] for i in range(len(g_ids))], "gallery"),
                      bench.protocol)
    out = work / f"run-{n}"
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["reranker.methods=[global,gv]", f"output_dir={out}"])
    stores = {"query": qstore, "gallery": gstore}
    examples, per_query = {}, {}
    start = time.perf_counter()
    rows = evaluate_methods(bench, *qstore.globals(), {"gallery": gstore}, cfg.reranker,
                            lambda name: open_pool(cfg.reranker, name, stores), None, examples, None, "cpu", per_query)
    evaluated = time.perf_counter() - start
    start = time.perf_counter()
    page = write_browse(cfg, bench, stores, stores, rows, examples, per_query, f"scale {n}")
    written = time.perf_counter() - start
    folder = page.parent
    return {"page": page, "evaluate_s": round(evaluated, 2), "write_browse_s": round(written, 2),
            "browse_mb": round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 2),
            "thumbnails": len(list((folder / "thumbs").iterdir())),
            "gv_medium_map": rows["GV (top-100)"][bench.name]["medium"]["mAP"]}


def measure_page(driver, page: Path) -> dict:
    """First contentful paint of the table (file URL), then a query page's time until its images are decoded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")                                  # a new document, not a same-page hash change
    driver.get(page.as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.results tr.method"))
    paint = driver.execute_script(
        "return performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")
    table_ms = driver.execute_script("return performance.now()")
    query_ms = driver.execute_async_script("""
        const done = arguments[arguments.length - 1], start = performance.now();
        location.hash = '#q/0/scale/medium';
        (function wait() {
          const images = [...document.querySelectorAll('[data-row] img')];
          if (images.length && images.every(i => i.complete && i.naturalWidth > 0)) done(performance.now() - start);
          else requestAnimationFrame(wait);
        })();""")
    return {"first_contentful_paint_ms": round(dict(paint)["first-contentful-paint"], 1),
            "table_ready_ms": round(table_ms, 1), "query_page_ms": round(query_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000], help="gallery sizes; the first is "
                        "the baseline")
    parser.add_argument("--work", default=None, help="folder for tables and runs (default: a temporary one)")
    args = parser.parse_args()

    from selenium import webdriver

    from rrt_dist.config import RayConfig
    from rrt_dist.runtime import init_ray

    work = Path(args.work or tempfile.mkdtemp(prefix="browse-bench-"))
    init_ray(RayConfig(num_cpus=2))
    images = sample_images(work / "images")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={work / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    results = {}
    try:
        for n in args.sizes:
            run = browse_run(work, n, images)
            measure_page(driver, run["page"])                 # the first load warms Chromium's caches
            results[n] = {**{k: v for k, v in run.items() if k != "page"}, **measure_page(driver, run["page"])}
            print(f"{n} gallery images: {results[n]}", flush=True)
    finally:
        driver.quit()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    base, largest = results[args.sizes[0]], results[args.sizes[-1]]
    ratios = {k: round(largest[k] / base[k], 2) for k in ("first_contentful_paint_ms", "query_page_ms",
                                                         "write_browse_s", "browse_mb")}
    print(json.dumps({"sizes": args.sizes, "results": {str(k): v for k, v in results.items()},
                      f"ratio_{args.sizes[-1]}_vs_{args.sizes[0]}": ratios}))


if __name__ == "__main__":
    main()
