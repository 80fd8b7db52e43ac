"""The search service over real HTTP, as a user meets it: the README's `rrt-dist serve gallery.name=shop` started as
written (its own embedded Ray on this 2-CPU machine, default resources) against a gallery ingested here from
generated images. It answers as the batch search job does, from one gallery snapshot per answer (also while an
ingest replaces an image), refuses bad input with a 4xx and a reason, serves only ingested images, answers 503 for a
gallery that is not ready while serving the others; and, started the way `serve deploy` / a RayService start it
beyond loopback, it refuses to run without its token and then requires it on every route that reveals data."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
from rrt_dist.datasets.base import stable_id

BIN = Path(sys.executable).parent
HOSTILE = "<!--<script>_q5.jpg"          # a query file name that once emptied the batch job's page
OTHER = "q3 <b onmouseover=x>&amp;\u2028.jpg"


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


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def image_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def gallery(run_job, small_synthetic, tmp_path_factory):
    """Gallery ``shop``: 10 photos copied into a folder and ingested with the default backbone, as the README's
    `rrt-dist ingest gallery.name=shop gallery.images=...` does."""
    tmp = tmp_path_factory.mktemp("serve")
    _, root = small_synthetic
    uris = read_revisitop(root, "synthetic").gallery.column("uri").to_pylist()
    photos = tmp / "photos"
    photos.mkdir()
    for uri in uris[:10]:
        shutil.copy(uri, photos / Path(uri).name)
    (photos / "notes.jpg").write_text("not an image")          # rejected by ingest: never served
    common = [f"gallery.root={tmp / 'g'}", "gallery.name=shop"]
    run_job("ingest", [*common, f"gallery.images={photos}"], tmp / "ingest")
    return {"tmp": tmp, "uris": uris, "photos": photos, "common": common}


@pytest.fixture(scope="module")
def service(gallery):
    """The README's command as written, `rrt-dist serve gallery.name=shop`, plus where this test keeps things (the
    gallery root, a free port, a second gallery `later` never ingested yet) and a 2 s upload timeout; no resource
    override: it sizes itself to this machine. Stopped with Ctrl-C (SIGINT) at the end."""
    tmp, port = gallery["tmp"], free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")         # short: Ray's socket paths live under it
    command = [str(BIN / "rrt-dist"), "serve", "gallery.name=shop", f"gallery.root={tmp / 'g'}",
               "serve.galleries=[shop,later]", f"serve.port={port}", "serve.read_timeout_s=2", "serve.refresh_s=0.5",
               f"hydra.run.dir={tmp / 'serve-run'}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                            start_new_session=True, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    lines: list[str] = []
    deadline = time.time() + 420
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving "):
            break
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
    assert lines and lines[-1].startswith("serving shop, later at"), "".join(lines[-40:])
    yield {**gallery, "url": f"http://127.0.0.1:{port}/", "log": lines, "proc": proc}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    from test_jobs import stop_processes_of

    stop_processes_of(Path(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_served_results_equal_the_batch_search_job(service, run_job):
    """Two queries over HTTP, global and GV-reranked, against `rrt-dist search` on the same images and snapshot;
    the batch job's query files have hostile names (the browser test opens its page)."""
    import pyarrow.parquet as pq

    uris, tmp = service["uris"], service["tmp"]
    queries = tmp / "queries"
    queries.mkdir()
    shutil.copy(uris[2], queries / HOSTILE)
    shutil.copy(uris[3], queries / OTHER)
    batch = run_job("search", [*service["common"], f"search.queries={queries}", "search.rerank=gv"], tmp / "batch")
    rows = pq.read_table(batch["results"]).to_pylist()
    service["batch_page"] = batch["page"]                                  # the browser test opens it
    for name, source in ((HOSTILE, uris[2]), (OTHER, uris[3])):
        want = [r for r in rows if r["query_path"].endswith(name)][:5]
        status, plain = post(service["url"] + "search?k=5", image_bytes(source))
        assert status == 200, plain
        assert plain["index_version"] == batch["index_version"] and plain["gallery"] == "shop"
        assert [r["id"] for r in plain["results"]] == [r["gallery_id"] for r in want]
        assert [r["path"] for r in plain["results"]] == [r["gallery_path"] for r in want]
        # the same image extracted alone (served) or batched with the other query (the job): the convolutions'
        # last bits differ with the batch, and fp16 rounding of the stored vectors carries that to ~1e-5
        np.testing.assert_allclose([r["global_score"] for r in plain["results"]], [r["global_score"] for r in want],
                                   atol=1e-4)
        status, reranked = post(service["url"] + "search?k=5&rerank=gv", image_bytes(source))
        assert status == 200, reranked
        by_place = sorted([r for r in rows if r["query_path"].endswith(name)], key=lambda r: r["reranked_rank"])[:5]
        assert [r["id"] for r in reranked["results"]] == [r["gallery_id"] for r in by_place]
        assert [r["path"] for r in reranked["results"]] == [r["gallery_path"] for r in by_place]
        assert [r["id"] for r in reranked["global"]] == [r["gallery_id"] for r in want]
        np.testing.assert_allclose([r["rerank_score"] for r in reranked["results"]],
                                   [r["rerank_score"] for r in by_place])
        assert set(reranked["timings_ms"]) >= {"extract_ms", "search_ms", "rerank_ms", "total_ms"}
    status, listing, _ = get(service["url"] + "galleries")
    info = json.loads(listing)
    shop, later = info["galleries"]
    assert status == 200 and (shop["name"], shop["ready"], shop["index_version"], shop["images"]) == ("shop", True, 1, 10)
    assert (later["name"], later["ready"]) == ("later", False) and "rrt-dist ingest gallery.name=later" in later["reason"]
    assert "gv" in info["rerankers"] and "rrt" not in info["rerankers"]           # no RRT weights given
    status, body, headers = get(service["url"] + f"images/shop/{plain['results'][0]['id']}")
    assert status == 200 and body == image_bytes(plain["results"][0]["path"])
    assert headers["content-type"] == "image/jpeg" and headers["x-content-type-options"] == "nosniff"
    status, page, _ = get(service["url"])
    assert status == 200 and b"rrt-dist search" in page
    assert get(service["url"] + "healthz")[:2] == (200, b'{"status":"ok"}')


def test_bad_input_gets_a_4xx_with_its_reason(service):
    url = service["url"]
    good = image_bytes(service["uris"][0])
    bomb = io.BytesIO()
    Image.new("1", (11_000, 10_000)).save(bomb, "PNG")                  # 110 M pixels in a few kB
    cases = [
        (url + "search", b"this is not an image", 400, "not a readable image"),
        (url + "search", good[: len(good) // 2], 400, "not a readable image"),
        (url + "search", bomb.getvalue(), 413, "exceed the limit of 100000000"),
        (url + "search", b"", 400, "no image"),
        (url + "search?gallery=nope", good, 404, "no gallery 'nope' is served; served: shop, later"),
        (url + "search?rerank=magic", good, 400, "rerank='magic' is not a reranker served here; known: "),
        (url + "search?k=0", good, 400, "k=0 is out of range [1, 1000]"),
        (url + "search?k=ten", good, 400, "k='ten' is not an integer"),
    ]
    for target, data, status, reason in cases:
        got_status, body = post(target, data)
        assert (got_status, reason in body.get("error", "")) == (status, True), (target, body)
        assert "\n" not in body["error"]
    status, body = post(url + "search", b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nno end",
                        {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and ("multipart form" in body["error"] or "no file field" in body["error"]), body
    port = int(url.rsplit(":", 1)[1].strip("/"))
    # a declared length over the limit is refused before any of the body is read; a chunked upload (no length
    # declared) as soon as it passes the limit, not after it is read whole
    declared = raw_exchange(port, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n", b"")
    assert declared.startswith(b"HTTP/1.1 413") and b"over the limit of 20971520" in declared, declared[:300]
    chunk = b"%x\r\n%s\r\n" % (2**20, b"\xff" * 2**20)
    chunked = raw_exchange(port, b"POST /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                           chunk * 300)
    assert chunked.startswith(b"HTTP/1.1 413") and b"passed 20971520 bytes" in chunked, chunked[:300]
    rejected = str(stable_id(str((service["photos"] / "notes.jpg").resolve())))
    for image in (rejected, "123456789", str(2**63), str(-2**63 - 1), "-1", "abc", "1e3", "9" * 400):
        status, body, _ = get(url + f"images/shop/{image}")
        assert status == 404 and b"has no image" in body, (image, body)
    # a client that declares a body and never sends it is dropped after serve.read_timeout_s (2 s here)
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))) as client:
        client.settimeout(30)
        client.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        start = time.monotonic()
        answer = client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 20, answer[:200]
    assert post(url + "search?k=1", good)[0] == 200                        # the replicas survived all of it


def raw_exchange(port: int, head: bytes, body: bytes) -> bytes:
    """Send ``head`` then ``body`` on a raw connection (from a thread: the server may answer, and close, before the
    body is through) and return the first answer's bytes."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(60)
        client.sendall(head)

        def send_body():
            try:
                client.sendall(body)
            except OSError:                       # answered and closed mid-body: what a refusal looks like
                pass

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < answer_length(answer):
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
        sender.join(60)
        return answer


def answer_length(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:")), 0)


def test_a_gallery_that_is_not_ready_answers_503_and_the_others_serve(service, run_job):
    """`later` was never ingested: 503 naming what to run, /readyz says which are ready, /healthz stays up; once an
    ingest commits its first snapshot it is served, with no restart."""
    url = service["url"]
    good = image_bytes(service["uris"][0])
    status, body = post(url + "search?gallery=later", good)
    assert status == 503 and "gallery 'later' is not ready" in body["error"] and "rrt-dist ingest" in body["error"]
    assert get(url + "images/later/1")[0] == 503
    status, ready, _ = get(url + "readyz")
    assert status == 200 and json.loads(ready)["galleries"]["shop"] == "ready"
    assert "not ready" in json.loads(ready)["galleries"]["later"]
    assert post(url + "search?gallery=shop&k=1", good)[0] == 200 and get(url + "healthz")[0] == 200
    later = service["tmp"] / "later-photos"
    later.mkdir()
    for uri in service["uris"][20:23]:
        shutil.copy(uri, later / Path(uri).name)
    run_job("ingest", [f"gallery.root={service['tmp'] / 'g'}", "gallery.name=later", f"gallery.images={later}"],
            service["tmp"] / "ingest-later")
    deadline = time.time() + 60
    while time.time() < deadline and post(url + "search?gallery=later&k=3", good)[0] != 200:
        time.sleep(0.5)
    status, body = post(url + "search?gallery=later&k=3", good)
    assert status == 200 and len(body["results"]) == 3 and body["versions"]["index"] == 1


def test_an_ingest_that_replaces_an_image_during_requests_keeps_each_answer_whole(service, run_job):
    """Requests stream (GV-reranked) while an ingest adds 6 photos and replaces one photo's file with another
    photo: every answer is 200 and comes from one snapshot (index, table, catalog versions), versions never go
    back, the new photos appear only in the new snapshot's answers, and once served the new snapshot's GV scores
    equal the batch search job's (the replaced image reranked with its new features, not its old ones)."""
    import pyarrow.parquet as pq

    uris, tmp, photos = service["uris"], service["tmp"], service["photos"]
    query_file = uris[12]
    replaced = photos / Path(uris[1]).name
    answers, stop = [], threading.Event()

    def stream():
        while not stop.is_set():
            answers.append(post(service["url"] + "search?k=16&rerank=gv", image_bytes(query_file)))

    client = threading.Thread(target=stream)
    client.start()
    try:
        for uri in uris[10:16]:
            shutil.copy(uri, photos / Path(uri).name)
        shutil.copy(query_file, replaced)                 # same path, same id, another photo
        run_job("ingest", [*service["common"], f"gallery.images={photos}"], tmp / "ingest-2")
        deadline = time.time() + 60
        while time.time() < deadline and not any(a[1].get("index_version") == 2 for a in answers[-3:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        client.join()
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [(body["versions"]["index"], body["versions"]["table"], body["versions"]["catalog"])
                for _, body in answers]
    assert versions == sorted(versions) and versions[0][0] == 1 and versions[-1][0] == 2
    assert len(set(versions)) == 2                                     # two snapshots, never a mix of their parts
    for _, body in answers:
        paths = {r["path"] for r in body["results"]}
        assert len(body["results"]) == (10 if body["index_version"] == 1 else 16)
        assert (str(photos / Path(uris[12]).name) in paths) == (body["index_version"] == 2)
    (tmp / "q.csv").write_text(f"uri\n{query_file}\n")
    batch = run_job("search", [*service["common"], f"search.queries={tmp / 'q.csv'}", "search.rerank=gv"],
                    tmp / "batch-2")
    want = sorted(pq.read_table(batch["results"]).to_pylist(), key=lambda r: r["reranked_rank"])
    served = answers[-1][1]["results"]
    assert [r["id"] for r in served] == [r["gallery_id"] for r in want]
    np.testing.assert_allclose([r["rerank_score"] for r in served], [r["rerank_score"] for r in want])
    replaced_id = next(r["id"] for r in served if r["path"] == str(replaced))
    first = next(body for _, body in answers if body["index_version"] == 1)
    old_score = next((r["rerank_score"] for r in first["results"] if r["id"] == replaced_id), None)
    assert old_score != next(r["rerank_score"] for r in served if r["id"] == replaced_id)


def test_the_search_page_in_a_real_browser(service, browser, tmp_path):
    """Headless Chromium (Debian's, with its driver): the page lists the galleries, takes an uploaded query, shows
    the query's own image first after GV reranking and the global ranking below it, opens a result on click, and
    logs no JavaScript error; the batch job's static page, with query files named to break out of its script,
    shows every query. Screenshots are kept in the test's folder (the paths are printed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = browser
    query = service["uris"][2]
    driver.get(service["url"])
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: any(o.get_attribute("value") == "shop"
                             for o in d.find_elements(By.CSS_SELECTOR, "#gallery option")))
    Select(driver.find_element(By.ID, "gallery")).select_by_value("shop")
    Select(driver.find_element(By.ID, "rerank")).select_by_value("gv")
    upload = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false", upload)      # the drop zone hides the plain input
    upload.send_keys(query)
    wait.until(ready.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#after figure")) >= 10
               and "Index version" in d.find_element(By.ID, "status").text)
    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#after figcaption")]
    assert captions[0].startswith("#1 ") and captions[0].endswith(Path(query).name), captions[:2]
    assert "gv" in captions[0] and driver.find_element(By.ID, "after-title").text == "Reranked by gv"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#before figure")) >= 10
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
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#after-0 figure")) == 10)
        titles = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "section > h2")]
        # (a line separator reads back as a space from the rendered text)
        assert len(titles) == 2 and titles[0].endswith(HOSTILE) and titles[1].endswith(OTHER.replace("\u2028", " "))
        first = driver.find_element(By.CSS_SELECTOR, "#after-0 figcaption").text
        assert first.startswith("#1 · gv ") and first.endswith(Path(service["uris"][2]).name), first
        assert len(driver.find_elements(By.CSS_SELECTOR, "#before-1 figure")) == 10
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#after-0 img')].every(i => i.complete && i.naturalWidth > 0)"))
        sizes = driver.execute_script("return [...document.querySelectorAll('#after-0 img')].map(i => i.naturalWidth)")
        assert max(sizes) <= 160                                           # thumbnails, not the originals
        driver.save_screenshot(str(tmp_path / "results-page.png"))
        print(f"screenshot: {tmp_path / 'results-page.png'}")
        assert console_errors(driver) == []


def network_address() -> str:
    """This machine's address on its network (what another machine would connect to), or loopback if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))          # UDP: picks the outgoing interface, sends nothing
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def test_beyond_loopback_the_token_is_required_however_the_service_is_started(gallery, local_ray, monkeypatch):
    """Serve started on 0.0.0.0 first (as `serve deploy` and a RayService do, from their config's http_options, not
    serve.host): building the application without a token is refused in one line, and so is a gateway replica;
    with the token in the environment every route that reveals data needs it (a header with non-ASCII bytes is a
    401, not a 500), /openapi.json included, while /healthz and /readyz stay open to probes."""
    from ray import serve

    from rrt_dist.pipelines.serve import app_builder, require_token_beyond_loopback, wait_until_running
    from rrt_dist.schema import ConfigError

    port = free_port()
    overrides = {"overrides": [*gallery["common"], "serve.token_env=RRT_TEST_TOKEN"]}
    monkeypatch.delenv("RRT_TEST_TOKEN", raising=False)
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    try:
        with pytest.raises(ConfigError, match="listens on 0.0.0.0, which other machines reach: put a bearer token "
                                              "in the environment variable RRT_TEST_TOKEN"):
            app_builder(overrides)
        with pytest.raises(ConfigError, match="listens on 0.0.0.0"):          # what the gateway's constructor runs
            require_token_beyond_loopback(None, "RRT_TEST_TOKEN")
        monkeypatch.setenv("RRT_TEST_TOKEN", "s3cret")
        serve.run(app_builder(overrides), name="rrt-dist", route_prefix="/", blocking=False)
        wait_until_running(300)
        url = f"http://{network_address()}:{port}/"
        good, token = image_bytes(gallery["uris"][0]), {"Authorization": "Bearer s3cret"}
        assert post(url + "search?k=1", good)[0] == 401
        assert post(url + "search?k=1", good, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(url + "search?k=1", good, {"Authorization": "Bearer s3crét"})[0] == 401
        assert post(url + "search?k=1", good, {"Authorization": "Bearer \xff\xfe"})[0] == 401
        for route in ("galleries", "images/shop/1", "openapi.json"):
            assert get(url + route)[0] == 401, route
        assert get(url + "docs")[0] == 404
        status, answer = post(url + "search?k=3&rerank=gv", good, token)
        assert status == 200 and answer["results"][0]["path"].endswith(Path(gallery["uris"][0]).name)
        status, spec, _ = get(url + "openapi.json", token)
        assert status == 200 and "/search" in json.loads(spec)["paths"]
        assert get(url + "healthz")[0] == 200 and get(url + "readyz")[0] == 200
    finally:
        serve.shutdown()


def test_the_application_builder_for_serve_run_and_rayservice(gallery, local_ray):
    """What `serve run rrt_dist.pipelines.serve:app_builder overrides=...` and the RayService call."""
    from ray.serve import Application

    from rrt_dist.pipelines.serve import app_builder, check_fits, part_resources, serve_config
    from rrt_dist.schema import ConfigError

    root = f"gallery.root={gallery['tmp'] / 'g'}"
    assert isinstance(app_builder({"overrides": " ".join([root, "gallery.name=shop"])}), Application)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[root, "gallery.name=shop"])
    validate_config(cfg)
    written = serve_config(cfg, [root, "gallery.name=shop"])
    (app,) = written["applications"]
    assert written["proxy_location"] == "EveryNode"
    assert isinstance(app_builder(app["args"]), Application) and app["import_path"].endswith(":app_builder")
    with pytest.raises(ConfigError, match="gallery.nam"):
        app_builder({"overrides": [root, "gallery.nam=shop"]})
    # a gallery not ingested yet is served as 503 until it is: the application still builds
    assert isinstance(app_builder({"overrides": [root, "gallery.name=nope"]}), Application)
    # sized to the machine: the defaults (1 + 0.5 + 1 + 0.5 CPUs) scaled into 2 CPUs, explicit values kept
    parts = part_resources(cfg, 2.0)
    assert {n: p["num_cpus"] for n, p in parts.items()} == {"extractor": 0.667, "searcher": 0.333,
                                                              "reranker": 0.667, "gateway": 0.333}
    assert {n: p["max_ongoing_requests"] for n, p in parts.items()} == {"extractor": 16, "searcher": 32,
                                                                         "reranker": 16, "gateway": 256}
    assert part_resources(cfg, None)["extractor"]["num_cpus"] == 1.0       # a cluster: what the config asks
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        greedy = compose("config", overrides=[root, "gallery.name=shop", "serve.extractor.num_cpus=2",
                                              "serve.reranker.num_cpus=1"])
    with pytest.raises(ConfigError, match=r"serve: the deployments ask for 3 CPUs \(extractor 1 x 2, searcher 1 x 0, "
                                          r"reranker 1 x 1, gateway 1 x 0\) and this Ray has 2"):
        check_fits(part_resources(greedy, 2.0), 2.0)


def test_an_image_is_served_with_the_type_its_bytes_say_or_not_at_all(tmp_path):
    """What /images reads (no service needed): formats browsers show keep their bytes and get their own type, any
    other decodable image is re-encoded as PNG, and a file that is not an image (an HTML or SVG page put where an
    ingested image was) is never served, whatever its name says; a missing file or one over the cap is refused."""
    from rrt_dist.pipelines.serve import Refused, image_response, readable_uri

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    rgb.save(tmp_path / "a.png")
    rgb.save(tmp_path / "b.tiff")
    (tmp_path / "page.jpg").write_text("<html><script>alert(1)</script></html>")
    (tmp_path / "drawing.png").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    data, kind = image_response(str(tmp_path / "a.png"), 10**6)
    assert (data, kind) == ((tmp_path / "a.png").read_bytes(), "image/png")
    data, kind = image_response(str(tmp_path / "b.tiff"), 10**6)
    assert kind == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(rgb))
    for name, status in (("page.jpg", 404), ("drawing.png", 404), ("gone.jpg", 404), ("", 404)):
        with pytest.raises(Refused) as refused:
            image_response(str(tmp_path / name), 10**6)
        assert refused.value.status == status, name
    with pytest.raises(Refused) as refused:
        image_response(str(tmp_path / "a.png"), 10)
    assert refused.value.status == 413
    assert readable_uri("/data/a.jpg", False) and readable_uri("s3://bucket/a.jpg", False)
    assert not readable_uri("http://10.0.0.1/secret", False) and readable_uri("https://x/a.jpg", True)


def test_requests_that_queue_while_a_batch_runs_form_the_next_batch():
    """The deployments' batcher: the first request waits ``wait_s`` for company, then every request that arrives
    while a batch runs goes into the next call (up to ``max_size``), where Serve's @serve.batch formed batches of
    one or two; an error reaches that batch's callers only."""
    import asyncio

    from rrt_dist.pipelines.serve import Batcher

    async def scenario():
        calls = []

        async def double(items):
            calls.append(list(items))
            await asyncio.sleep(0.05)                       # the model's time: requests arrive meanwhile
            if "bad" in items:
                raise ValueError("bad batch")
            return [2 * i for i in items]

        batcher = Batcher(double, max_size=4, wait_s=0.01)
        first = asyncio.gather(*(batcher(i) for i in (1, 2)))
        await asyncio.sleep(0.02)                            # the first batch runs; six more arrive
        rest = asyncio.gather(*(batcher(i) for i in range(3, 9)))
        assert await first == [2, 4] and await rest == [6, 8, 10, 12, 14, 16]
        assert calls == [[1, 2], [3, 4, 5, 6], [7, 8]]
        failed = await asyncio.gather(batcher("bad"), return_exceptions=True)
        assert isinstance(failed[0], ValueError) and await batcher(21) == 42 and batcher.task is None

    asyncio.run(scenario())
