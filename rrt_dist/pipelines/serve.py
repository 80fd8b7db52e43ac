"""The search service: ingested galleries searched over HTTP with Ray Serve (``rrt-dist serve``).

Four deployments, each with its own resources and autoscaling (``serve.<part>``): the query extractor (the
galleries' own extractor, ``@serve.batch``: uploads of concurrent requests go through the model together), the
gallery searcher (one :class:`~rrt_dist.index.sharded.ShardedIndex` per gallery, refreshed every
``serve.refresh_s``: an ingest's new index version is served without a restart, every response names the version
that answered, and an old version's shard actors stop once no search uses them), the reranker (registry
rerankers over the gallery's feature table, ``@serve.batch``) and the HTTP gateway (FastAPI):

- ``POST /search?gallery=G&k=K&rerank=R``: the image as the body or as the ``image`` field of a multipart form;
  JSON with the ranked ids, paths and scores (global, and reranked when asked), the index version and the time
  each stage took;
- ``GET /galleries``, ``GET /healthz``, ``GET /images/{gallery}/{id}`` (an ingested image by id: never a path
  from the request), ``GET /`` (the search page).

Bad input is a 4xx with a one-line reason, never a 500: not an image or truncated (400), more pixels than
``backbone.max_image_pixels`` or more bytes than ``serve.max_bytes`` (413), an unknown gallery or image (404),
an unknown reranker (400, naming the known ones), ``k`` out of range (400). With a token (``serve.token_env``)
every route but ``/healthz`` needs ``Authorization: Bearer <token>``.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations (``request: Request``) at runtime,
# and Serve's class-based ingress hides the module they would be resolved in.
import hmac
import io
import logging
import mimetypes
import threading
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from rrt_dist.schema import NO_ID, ConfigError

from .pages import page_text

log = logging.getLogger(__name__)

app = FastAPI(title="rrt-dist search", docs_url=None, redoc_url=None)


class Refused(Exception):
    """A request the service cannot answer, with its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)                # both in args: it crosses processes (pickled) whole
        self.status, self.reason = status, reason


@app.exception_handler(Refused)
async def refused(request: Request, err: Refused) -> JSONResponse:
    return JSONResponse({"error": err.reason}, status_code=err.status)


@serve.deployment
class QueryExtractor:
    """The galleries' extractor on uploaded images, a batch of concurrent requests at a time."""

    def __init__(self, backbone: str, options: dict, max_pixels: int, batch_size: int, batch_wait_s: float):
        from rrt_dist.devices import require_gpu
        from rrt_dist.features import create_extractor, create_preparer

        require_gpu("serve.extractor")
        self.extractor = create_extractor(backbone, **options)
        self.preparer = create_preparer(backbone, **options)
        self.max_pixels = max_pixels
        self.extract.set_max_batch_size(batch_size)
        self.extract.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def extract(self, uploads: list[bytes]) -> list:
        """Per upload: its features (``take_locals`` layout, one row) or a :class:`Refused`."""
        from rrt_dist.features.core import extract_batch, locals_layout
        from rrt_dist.features.images import ImageError, ImageTooLarge, decode_image

        results: list = [None] * len(uploads)
        prepared, where = [], []
        for i, data in enumerate(uploads):
            try:
                prepared.append(self.preparer(decode_image(io.BytesIO(data), "the upload", None, self.max_pixels)))
                where.append(i)
            except ImageTooLarge as err:
                results[i] = Refused(413, str(err))
            except ImageError as err:
                results[i] = Refused(400, f"not a readable image ({str(err).removeprefix('the upload: ')})")
        if prepared:
            feats = extract_batch(self.extractor, prepared, [(0.0, 0.0)] * len(prepared))
            layout = locals_layout(feats, self.extractor.max_local, self.extractor.local_dim)
            for row, i in enumerate(where):
                results[i] = {name: values[row:row + 1] for name, values in layout.items()}
        return results


@serve.deployment
class GallerySearcher:
    """Each gallery's sharded index, refreshed in the background; searches report the version that answered."""

    def __init__(self, galleries: dict, search_resources, params: str | None, refresh_s: float):
        from rrt_dist.index.sharded import ShardedIndex

        self.galleries = galleries                              # name -> {"directory", "index", "table"}
        self.indexes = {name: ShardedIndex(g["index"], search_resources, params) for name, g in galleries.items()}
        self.refresh_s = refresh_s
        self.stop = threading.Event()
        threading.Thread(target=self._refresh_loop, daemon=True).start()

    def _refresh_loop(self) -> None:
        while not self.stop.wait(self.refresh_s):
            for name, index in self.indexes.items():
                try:
                    if index.refresh():
                        log.info("gallery %s: serving index version %d", name, index.version)
                except Exception:                    # a half-written version or a lost store: keep serving this one
                    log.exception("gallery %s: refreshing the index failed; still serving version %d", name,
                                  index.version)

    def search(self, gallery: str, vector: np.ndarray, k: int) -> dict:
        from .ingest import image_paths

        index = self.indexes[gallery]
        scores, ids, version = index.search_versioned(vector, k)
        keep = ids[0] != NO_ID
        ids, scores = ids[0][keep], scores[0][keep]
        paths = image_paths(self.galleries[gallery]["directory"], ids)
        return {"ids": ids, "scores": scores, "paths": [paths.get(int(i)) for i in ids], "version": version}

    def describe(self) -> list[dict]:
        return [{"name": name, "index_version": index.version, "images": int(index.manifest.ntotal)}
                for name, index in self.indexes.items()]

    def image_path(self, gallery: str, image_id: int) -> str | None:
        from .ingest import image_paths

        return image_paths(self.galleries[gallery]["directory"], [image_id]).get(image_id)

    def __del__(self):
        self.stop.set()


@serve.deployment
class GalleryReranker:
    """Registry rerankers over the galleries' feature tables, a batch of concurrent requests at a time."""

    def __init__(self, tables: dict, scorers: dict, batch_size: int, batch_wait_s: float):
        from rrt_dist.devices import require_gpu

        require_gpu("serve.reranker")
        self.tables, self.scorers, self.cores = tables, scorers, {}
        self.rerank.set_max_batch_size(batch_size)
        self.rerank.set_batch_wait_timeout_s(batch_wait_s)

    def _core(self, method: str, gallery: str, ids: np.ndarray):
        from rrt_dist.rerank.core import RerankCore
        from rrt_dist.store import FeatureStore

        key = (method, gallery)
        if key not in self.cores:
            self.cores[key] = RerankCore(method, self.scorers[method], None, [(self.tables[gallery], None)])
        core = self.cores[key]
        if not core.galleries[0].contains(ids).all():        # rows an ingest committed since: read the new version
            core.galleries = [FeatureStore(self.tables[gallery])]
        return core

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rerank(self, requests: list[tuple]) -> list[dict]:
        out = []
        for method, gallery, query, ids, scores, depth in requests:
            order, rerank_scores = self._core(method, gallery, ids[:depth]).rerank_query(query, ids, scores, depth)
            out.append({"ids": order, "rerank_scores": rerank_scores})
        return out


async def retried(method, *args, attempts: int = 3):
    """``await method.remote(*args)`` on a deployment handle, again when the replica that took it died (a node
    lost, a replica killed): Serve routes the retry to a live replica. Every call here is idempotent."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    for attempt in range(attempts):
        try:
            return await method.remote(*args)
        except (ActorDiedError, ActorUnavailableError):
            if attempt == attempts - 1:
                raise
            log.warning("a %s replica was lost mid-request; retrying", getattr(method, "deployment_name", "replica"))


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Refused(400, f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise Refused(400, f"{name}={value} is out of range [{low}, {high}]")
    return value


@serve.deployment
@serve.ingress(app)
class SearchGateway:
    """The HTTP API and the page; checks every request before any model sees it."""

    def __init__(self, extractor, searcher, reranker, galleries: list[str], rerankers: list[str], settings: dict,
                 token: str | None):
        self.extractor, self.searcher, self.reranker = extractor, searcher, reranker
        self.galleries, self.rerankers, self.settings, self.token = galleries, rerankers, settings, token

    def _authorise(self, request: Request) -> None:
        if self.token and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {self.token}"):
            raise Refused(401, "a bearer token is required (Authorization: Bearer <serve token>)")

    def _gallery(self, name: str | None) -> str:
        name = name or self.galleries[0]
        if name not in self.galleries:
            raise Refused(404, f"no gallery {name!r} is served; served: {', '.join(self.galleries)}")
        return name

    async def _upload(self, request: Request) -> bytes:
        limit = self.settings["max_bytes"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:     # a form's own bytes allowed
            raise Refused(413, f"the request has {declared} bytes, over the limit of {limit} (serve.max_bytes)")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise Refused(400, "the multipart form has no file field 'image'")
            data = await upload.read()
        else:
            data = await request.body()
        if not data:
            raise Refused(400, "no image: send its bytes as the body or as the form field 'image'")
        if len(data) > limit:
            raise Refused(413, f"the image has {len(data)} bytes, over the limit of {limit} (serve.max_bytes)")
        return data

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/galleries")
    async def list_galleries(self, request: Request) -> dict:
        self._authorise(request)
        return {"galleries": await self.searcher.describe.remote(), "rerankers": self.rerankers,
                "max_k": self.settings["max_k"]}

    @app.get("/images/{gallery}/{image_id}")
    async def image(self, gallery: str, image_id: int, request: Request) -> Response:
        import fsspec

        self._authorise(request)
        gallery = self._gallery(gallery)
        path = await self.searcher.image_path.remote(gallery, image_id)
        if path is None:
            raise Refused(404, f"gallery {gallery!r} has no image {image_id}")
        with fsspec.open(path, "rb") as f:
            data = f.read()
        return Response(data, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return page_text("search_page.html")

    @app.post("/search")
    async def search(self, request: Request) -> dict:
        started = time.perf_counter()
        self._authorise(request)
        gallery = self._gallery(request.query_params.get("gallery"))
        k = _int_param(request, "k", 10, 1, self.settings["max_k"])
        rerank = request.query_params.get("rerank") or None
        if rerank == "none":
            rerank = None
        if rerank is not None and rerank not in self.rerankers:
            raise Refused(400, f"rerank={rerank!r} is not a reranker served here; known: "
                               f"{', '.join(self.rerankers) or 'none'}")
        data = await self._upload(request)
        timings = {"read_ms": (time.perf_counter() - started) * 1e3}
        step = time.perf_counter()
        query = await retried(self.extractor.extract, data)
        if isinstance(query, Refused):
            raise query
        timings["extract_ms"] = (time.perf_counter() - step) * 1e3
        step = time.perf_counter()
        depth = self.settings["depth"] if rerank else 0
        found = await retried(self.searcher.search, gallery, query["global"], max(k, depth))
        timings["search_ms"] = (time.perf_counter() - step) * 1e3
        ids, scores = found["ids"], found["scores"]
        # ids are 64-bit: a browser's JSON numbers keep 53 bits, so each result also names its image's URL
        global_order = [{"rank": r + 1, "id": int(i), "image_url": f"/images/{gallery}/{int(i)}", "path": p,
                         "global_score": float(s)}
                        for r, (i, s, p) in enumerate(zip(ids[:k], scores[:k], found["paths"][:k]))]
        results = global_order
        if rerank:
            step = time.perf_counter()
            reranked = await retried(self.reranker.rerank, (rerank, gallery, query, ids, scores, depth))
            timings["rerank_ms"] = (time.perf_counter() - step) * 1e3
            where = {int(i): r for r, i in enumerate(ids)}
            rerank_score = dict(zip(reranked["ids"][:depth].tolist(), reranked["rerank_scores"].tolist()))
            results = [{"rank": r + 1, "id": int(i), "image_url": f"/images/{gallery}/{int(i)}",
                        "path": found["paths"][where[int(i)]],
                        "global_score": float(scores[where[int(i)]]), "global_rank": where[int(i)] + 1,
                        "rerank_score": rerank_score.get(int(i))} for r, i in enumerate(reranked["ids"][:k])]
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return {"gallery": gallery, "index_version": int(found["version"]), "k": k, "rerank": rerank,
                "results": results, "global": global_order if rerank else None,
                "timings_ms": {name: round(ms, 2) for name, ms in timings.items()}}


def build_app(cfg, token: str | None):
    """The application for ``cfg`` (``serve.run`` it): its deployments bound with the served galleries, after
    checking that each exists and was ingested with this backbone, and each reranker's inputs and weights."""
    from omegaconf import OmegaConf

    from rrt_dist.rerank.methods import list_rerankers

    from .rerank import scorer_options
    from .search import check_reranker, gallery_record

    names = list(cfg.serve.galleries or [cfg.gallery.name])
    galleries = {name: gallery_record(cfg, name) for name in names}
    scorers = {}
    for name in list_rerankers():
        try:
            check_reranker(cfg, name, "rerank")
            scorers[name] = scorer_options(cfg.reranker, name)
        except (ConfigError, ValueError) as err:        # not servable with these tables or weights: not offered
            log.info("reranker %s not served: %s", name, err)
    parts = cfg.serve

    def deployment(cls, part):
        options = OmegaConf.to_container(part, resolve=True)
        return cls.options(ray_actor_options={"num_cpus": options["num_cpus"], "num_gpus": options["num_gpus"]},
                           autoscaling_config={"min_replicas": options["min_replicas"],
                                               "max_replicas": options["max_replicas"],
                                               "target_ongoing_requests": options["target_ongoing_requests"]})

    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    extractor = deployment(QueryExtractor, parts.extractor).bind(cfg.backbone.name, options,
                                                                  cfg.backbone.max_image_pixels, parts.batch_size,
                                                                  parts.batch_wait_s)
    searcher = deployment(GallerySearcher, parts.searcher).bind(
        {n: {k: g[k] for k in ("directory", "index", "table")} for n, g in galleries.items()},
        OmegaConf.to_object(cfg.ray.search), cfg.index.params, parts.refresh_s)
    reranker = deployment(GalleryReranker, parts.reranker).bind({n: g["table"] for n, g in galleries.items()}, scorers,
                                                                parts.batch_size, parts.batch_wait_s)
    settings = {"max_bytes": parts.max_bytes, "max_k": parts.max_k, "depth": cfg.reranker.depth}
    return deployment(SearchGateway, parts.gateway).bind(extractor, searcher, reranker, names, sorted(scorers),
                                                         settings, token)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def service_token(cfg) -> str | None:
    """The bearer token from the environment variable ``serve.token_env``; required to bind beyond loopback."""
    import os

    token = os.environ.get(cfg.serve.token_env) or None
    if token is None and not is_loopback(cfg.serve.host):
        raise ConfigError(f"serve.host={cfg.serve.host} is reachable from other machines: put a bearer token in the "
                          f"environment variable {cfg.serve.token_env} (serve.token_env), e.g. "
                          f"export {cfg.serve.token_env}=$(openssl rand -hex 32)")
    return token


def check_port_free(host: str, port: int) -> None:
    """Refuse, before Ray starts, a ``serve.host``:``serve.port`` another program listens on (Serve's proxy would
    otherwise fail with its actor's traceback)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"serve.port={port} on serve.host={host} cannot be used ({err.strerror}): choose "
                              f"another port") from None


def deploy(cfg, application) -> str:
    """Start Serve on ``serve.host``:``serve.port`` of the Ray the job runs on and deploy ``application``;
    returns its URL. Deploying again replaces the running application in place."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(application, name="rrt-dist", route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{cfg.serve.port}/"


def start_service(cfg, token: str | None) -> str:
    """:func:`build_app` (the galleries checked), then :func:`deploy` it."""
    return deploy(cfg, build_app(cfg, token))


def serve_config(cfg, overrides: list[str]) -> dict:
    """A Serve config file (``serve deploy`` / ``serve run``) for the same application: the builder and these
    overrides, Serve's HTTP options from ``serve.host`` / ``serve.port``. No token: the deploying process reads it
    from ``serve.token_env`` in its own environment."""
    return {"http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
            "applications": [{"name": "rrt-dist", "route_prefix": "/", "import_path": f"{__name__}:app_builder",
                              "args": {"overrides": list(overrides)}}]}


def serve_galleries(cfg, overrides: list[str]) -> None:
    """``rrt-dist serve``: the service until interrupted (Ctrl-C, or the job stopped); writes ``serve_config.yaml``
    (the same application for ``serve deploy``) into the run's output folder."""
    from pathlib import Path

    import yaml

    from rrt_dist.runtime import init_ray

    token = service_token(cfg)
    application = build_app(cfg, token)                # galleries and rerankers checked before Ray starts
    check_port_free(cfg.serve.host, cfg.serve.port)
    config_file = Path(cfg.output_dir) / "serve_config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(serve_config(cfg, overrides), sort_keys=False))
    init_ray(cfg.ray)
    url = deploy(cfg, application)
    print(f"serving {', '.join(cfg.serve.galleries or [cfg.gallery.name])} at {url} (search page at /, API: POST "
          f"/search, GET /galleries; {'bearer token required' if token else 'no token: loopback only'}); the same "
          f"application for `serve deploy`: {config_file}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def app_builder(args: dict):
    """The application for ``serve run`` / ``serve deploy`` / a KubeRay RayService (an application builder):
    ``args["overrides"]`` are the Hydra overrides ``rrt-dist serve`` takes (a list, or one space-separated
    string), e.g. ``serve run rrt_dist.pipelines.serve:app_builder overrides="gallery.name=shop"``. The token comes
    from the environment of the process that builds it (``serve.token_env``), never from the config file; Serve's
    own HTTP options (host, port) are the config file's ``http_options``, not ``serve.host`` / ``serve.port``."""
    from hydra import compose, initialize_config_dir

    from rrt_dist.config import CONFIG_DIR, validate_config
    from rrt_dist.runtime import composition_error

    overrides = args.get("overrides", [])
    overrides = overrides.split() if isinstance(overrides, str) else list(overrides)
    problem = composition_error(overrides)
    if problem:
        raise ConfigError(problem)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate_config(cfg)
    return build_app(cfg, service_token(cfg))
