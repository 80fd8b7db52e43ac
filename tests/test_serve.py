"""The search service over real HTTP on loopback, against a gallery ingested here from generated images: it
answers as the batch search job does, refuses bad input with a 4xx and a reason, switches to an ingest's new
index version with no failed request, and enforces its token."""
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import console_errors

from rrt_dist.config import CONFIG_DIR, validate_config
from rrt_dist.datasets import read_revisitop

LITE = ["backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]", "backbone.options.max_local=16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def service(local_ray, small_synthetic, tmp_path_factory):
    """Gallery ``shop`` (10 images) ingested, then served on a free loopback port; yields what tests need."""
    from ray import serve

    from rrt_dist.jobs import ingest as ingest_job
    from rrt_dist.pipelines.serve import start_service

    tmp = tmp_path_factory.mktemp("serve")
    _, root = small_synthetic
    uris = read_revisitop(root, "synthetic").gallery.column("uri").to_pylist()
    (tmp / "gallery.csv").write_text("uri\n" + "\n".join(uris[:10]) + "\n")
    port = free_port()
    common = [f"gallery.root={tmp / 'g'}", "gallery.name=shop", *LITE]
    serving = [f"serve.port={port}", "serve.refresh_s=0.5", "serve.max_bytes=300000", "reranker.depth=5",
               "serve.extractor.num_cpus=0",
               "serve.searcher.num_cpus=0", "serve.reranker.num_cpus=0", "serve.gateway.num_cpus=0"]

    def config(overrides, output):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*common, *overrides, f"output_dir={output}"])
        validate_config(cfg)
        return cfg

    ingest_job.run(config([f"gallery.manifest={tmp / 'gallery.csv'}"], tmp / "ingest"))
    cfg = config(serving, tmp / "serve")
    url = start_service(cfg, token=None)
    yield {"url": url, "uris": uris, "tmp": tmp, "config": config, "serving": serving}
    serve.shutdown()


def image_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_served_results_equal_the_batch_search_job(service, run_job):
    """Two queries over HTTP, global and GV-reranked, against `rrt-dist search` on the same images and version."""
    import pyarrow.parquet as pq

    uris, tmp = service["uris"], service["tmp"]
    (tmp / "queries.csv").write_text("uri\n" + "\n".join(uris[2:4]) + "\n")
    common = [f"gallery.root={tmp / 'g'}", "gallery.name=shop", *LITE]
    batch = run_job("search", [*common, f"search.queries={tmp / 'queries.csv'}", "search.rerank=gv",
                               "index.neighbours=5", "reranker.depth=5"], tmp / "batch")
    rows = pq.read_table(batch["results"]).to_pylist()
    service["batch_page"] = batch["page"]                                  # the browser test opens it
    for q, query in enumerate(uris[2:4]):
        want = [r for r in rows if r["query_path"] == query]
        status, plain = post(service["url"] + "search?k=5", image_bytes(query))
        assert status == 200, plain
        assert plain["index_version"] == batch["index_version"] and plain["gallery"] == "shop"
        assert [r["id"] for r in plain["results"]] == [r["gallery_id"] for r in want]
        assert [r["path"] for r in plain["results"]] == [r["gallery_path"] for r in want]
        np.testing.assert_allclose([r["global_score"] for r in plain["results"]], [r["global_score"] for r in want],
                                   atol=1e-6)
        status, reranked = post(service["url"] + "search?k=5&rerank=gv", image_bytes(query))
        assert status == 200, reranked
        by_place = sorted(want, key=lambda r: r["reranked_rank"])
        assert [r["id"] for r in reranked["results"]] == [r["gallery_id"] for r in by_place]
        assert [r["id"] for r in reranked["global"]] == [r["gallery_id"] for r in want]
        np.testing.assert_allclose([r["rerank_score"] for r in reranked["results"]],
                                   [r["rerank_score"] for r in by_place])
        assert set(reranked["timings_ms"]) >= {"extract_ms", "search_ms", "rerank_ms", "total_ms"}
    status, listing = get(service["url"] + "galleries")
    info = json.loads(listing)
    assert status == 200 and info["galleries"] == [{"name": "shop", "index_version": 1, "images": 10}]
    assert "gv" in info["rerankers"] and "rrt" not in info["rerankers"]           # no RRT weights given
    status, body = get(service["url"] + f"images/shop/{plain['results'][0]['id']}")
    assert status == 200 and body == image_bytes(plain["results"][0]["path"])
    status, page = get(service["url"])
    assert status == 200 and b"rrt-dist search" in page
    assert get(service["url"] + "healthz") == (200, b'{"status":"ok"}')


def test_bad_input_gets_a_4xx_with_its_reason(service):
    url = service["url"]
    good = image_bytes(service["uris"][0])
    bomb = io.BytesIO()
    Image.new("1", (11_000, 10_000)).save(bomb, "PNG")                  # 110 M pixels in a few kB
    cases = [
        (url + "search", b"this is not an image", 400, "not a readable image"),
        (url + "search", good[: len(good) // 2], 400, "not a readable image"),
        (url + "search", bomb.getvalue(), 413, "exceed the limit of 100000000"),
        (url + "search", b"\xff" * 400_000, 413, "over the limit of 300000 (serve.max_bytes)"),
        (url + "search", b"", 400, "no image"),
        (url + "search?gallery=nope", good, 404, "no gallery 'nope' is served; served: shop"),
        (url + "search?rerank=magic", good, 400, "rerank='magic' is not a reranker served here; known: gv"),
        (url + "search?k=0", good, 400, "k=0 is out of range [1, 1000]"),
        (url + "search?k=ten", good, 400, "k='ten' is not an integer"),
    ]
    for target, data, status, reason in cases:
        got_status, body = post(target, data)
        assert (got_status, reason in body.get("error", "")) == (status, True), (target, body)
        assert "\n" not in body["error"]
    status, body = get(url + "images/shop/123456789")
    assert status == 404 and b"has no image 123456789" in body
    assert post(url + "search?k=1", good)[0] == 200                        # the replicas survived all of it


def test_an_ingest_during_requests_switches_versions_without_a_failed_request(service):
    """Requests stream while 6 images are ingested: every answer is 200 from one version, the new version is
    served without a restart, and the new images appear only in its answers."""
    from rrt_dist.jobs import ingest as ingest_job

    uris, tmp = service["uris"], service["tmp"]
    (tmp / "more.csv").write_text("uri\n" + "\n".join(uris[10:16]) + "\n")
    query = image_bytes(uris[12])                                          # finds itself once it is ingested
    answers, stop = [], threading.Event()

    def stream():
        while not stop.is_set():
            answers.append(post(service["url"] + "search?k=16", query))

    client = threading.Thread(target=stream)
    client.start()
    try:
        ingest_job.run(service["config"]([f"gallery.manifest={tmp / 'more.csv'}"], tmp / "ingest-2"))
        deadline = time.time() + 60
        while time.time() < deadline and not any(a[1].get("index_version") == 2 for a in answers):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        client.join()
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [body["index_version"] for _, body in answers]
    assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
    for _, body in answers:
        paths = {r["path"] for r in body["results"]}
        assert len(body["results"]) == (10 if body["index_version"] == 1 else 16)
        assert (uris[12] in paths) == (body["index_version"] == 2)


def test_the_search_page_in_a_real_browser(service, browser, tmp_path):
    """Headless Chromium (Debian's, with its driver): the page lists the gallery, takes an uploaded query, shows
    the query's own image first after GV reranking and the global ranking below it, opens a result on click, and
    logs no JavaScript error. The screenshot is kept in the test's folder (the path is printed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = browser
    query = service["uris"][2]
    driver.get(service["url"])
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: any(o.get_attribute("value") == "shop"
                             for o in d.find_elements(By.CSS_SELECTOR, "#gallery option")))
    Select(driver.find_element(By.ID, "rerank")).select_by_value("gv")
    upload = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false", upload)      # the drop zone hides the plain input
    upload.send_keys(query)
    wait.until(ready.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#after figure")) == 10
               and "Index version" in d.find_element(By.ID, "status").text)
    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#after figcaption")]
    assert captions[0].startswith("#1 ") and captions[0].endswith(query), captions[:2]
    assert "gv" in captions[0] and driver.find_element(By.ID, "after-title").text == "Reranked by gv"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#before figure")) == 10
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#after img')].every(i => i.complete && i.naturalWidth > 0)"))
    shot = tmp_path / "search-page.png"
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    driver.find_element(By.CSS_SELECTOR, "#after img").click()
    assert driver.find_element(By.ID, "viewer").is_displayed()
    assert console_errors(driver) == []
    if "batch_page" in service:                  # the batch search job's static page of the same results
        driver.get(Path(service["batch_page"]).as_uri())
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#after-0 figure")) == 5)
        first = driver.find_element(By.CSS_SELECTOR, "#after-0 figcaption").text
        assert first.startswith("#1 · gv ") and first.endswith(service["uris"][2]), first
        assert len(driver.find_elements(By.CSS_SELECTOR, "#before-1 figure")) == 5
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#after-0 img')].every(i => i.complete && i.naturalWidth > 0)"))
        driver.save_screenshot(str(tmp_path / "results-page.png"))
        print(f"screenshot: {tmp_path / 'results-page.png'}")
        assert console_errors(driver) == []


def test_the_token_is_required_when_set(service):
    from rrt_dist.pipelines.serve import check_port_free, service_token, start_service
    from rrt_dist.schema import ConfigError

    cfg = service["config"](service["serving"], service["tmp"] / "serve-token")
    start_service(cfg, token="s3cret")                                    # redeployed in place, with a token
    url, good = service["url"], image_bytes(service["uris"][0])
    assert post(url + "search?k=1", good)[0] == 401
    assert post(url + "search?k=1", good, {"Authorization": "Bearer wrong"})[0] == 401
    assert get(url + "galleries")[0] == 401 and get(url + "images/shop/1")[0] == 401
    assert post(url + "search?k=1", good, {"Authorization": "Bearer s3cret"})[0] == 200
    assert get(url + "healthz")[0] == 200                                  # probes need no token
    exposed = service["config"]([*service["serving"], "serve.host=0.0.0.0", "serve.token_env=RRT_TEST_NO_TOKEN"],
                                service["tmp"] / "exposed")
    with pytest.raises(Exception, match="serve.host=0.0.0.0 is reachable from other machines"):
        service_token(exposed)
    port = int(url.rsplit(":", 1)[1].strip("/"))                         # Serve's proxy listens there
    with pytest.raises(ConfigError, match=f"serve.port={port} on serve.host=127.0.0.1 cannot be used"):
        check_port_free("127.0.0.1", port)


def test_the_application_builder_for_serve_run_and_rayservice(service):
    """What `serve run rrt_dist.pipelines.serve:app_builder overrides=...` and the RayService call."""
    from ray.serve import Application

    from rrt_dist.pipelines.serve import app_builder, serve_config
    from rrt_dist.schema import ConfigError, DatasetLayoutError

    gallery = f"gallery.root={service['tmp'] / 'g'}"
    assert isinstance(app_builder({"overrides": " ".join([gallery, "gallery.name=shop", *LITE])}), Application)
    written = serve_config(service["config"](service["serving"], service["tmp"] / "c"),
                           [gallery, "gallery.name=shop", *LITE])
    (app,) = written["applications"]
    assert isinstance(app_builder(app["args"]), Application) and app["import_path"].endswith(":app_builder")
    with pytest.raises(ConfigError, match="gallery.nam"):
        app_builder({"overrides": [gallery, "gallery.nam=shop"]})
    with pytest.raises(DatasetLayoutError, match="no gallery 'nope'"):
        app_builder({"overrides": [gallery, "gallery.name=nope", *LITE]})
