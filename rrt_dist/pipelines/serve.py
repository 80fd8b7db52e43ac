"""The search service: ingested galleries searched over HTTP with Ray Serve (``rrt-dist serve``).

Four deployments, each with its own resources, concurrency and autoscaling (``serve.<part>``):

- the query extractor (the galleries' own extractor): a batch of concurrent uploads is decoded in a thread pool and
  extracted in one call (a :class:`Batcher`), off the replica's event loop;
- the gallery searcher: per gallery, the snapshot it answers from (:class:`rrt_dist.gallery.Snapshot`: index,
  feature-table and catalog versions that belong together) and its sharded index, the query vectors of concurrent
  requests searched together; every ``serve.refresh_s`` it moves to the gallery's newest committed snapshot with no
  restart and no failed request; replicas share one set of shard actors;
- the reranker: registry rerankers over the feature table version of the snapshot that answered, a batch of
  requests scored in one call where the scorer allows it (``RerankCore.rerank_queries``);
- the HTTP gateway (FastAPI), which checks every request before any model sees it:

  ``POST /search?gallery=G&k=K&rerank=R`` (the image as the body or as the ``image`` field of a multipart form;
  JSON with the ranked ids, paths and scores, the snapshot's versions and the time each stage took);
  ``GET /galleries``, ``GET /images/{gallery}/{id}`` (an image the gallery's snapshot lists, never a path from the
  request), ``GET /openapi.json``, ``GET /`` (the search page), ``GET /healthz`` (liveness) and ``GET /readyz``
  (which galleries are ready).

One answer, one snapshot: search, rerank and image paths of a request all come from the snapshot its search used.
Bad input is a 4xx with a one-line reason, never a 500; a gallery that is not ready answers 503 naming what to run,
and the others keep serving. Wherever the service listens beyond loopback (the address Serve's proxies bind,
however the application was started), every route that reveals a gallery or the API needs the bearer token.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations (``request: Request``) at runtime,
# and Serve's class-based ingress hides the module they would be resolved in.
import asyncio
import hmac
import io
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from rrt_dist.schema import NO_ID, ConfigError, GalleryNotReady, UnreadableTable, first_line

from .pages import page_text

log = logging.getLogger(__name__)

app = FastAPI(title="rrt-dist search", docs_url=None, redoc_url=None, openapi_url=None)   # /openapi.json: authorised

MAX_INT64 = 2**63 - 1
# Browsers show these as they are; any other decodable image is re-encoded as PNG before it is served.
SERVED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                  "BMP": "image/bmp"}
# Where a gallery's images may be read from: local files and object stores (an http(s) URI is fetched server-side
# only with serve.fetch_http_images=true: it would let the service be used to reach internal addresses).
VERIFY_EVERY = 15          # searcher refreshes between two checks that a served snapshot's table files are all there
STORE_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf", "memory")


class Refused(Exception):
    """A request the service cannot answer, with its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)                # both in args: it crosses processes (pickled) whole
        self.status, self.reason = status, reason


@app.exception_handler(Refused)
async def refused(request: Request, err: Refused) -> JSONResponse:
    return JSONResponse({"error": err.reason}, status_code=err.status)


def not_ready(err: GalleryNotReady) -> Refused:
    return Refused(503, str(err))


class BatchStats:
    """How full a deployment's batches are (``benchmarks/serve.py`` reads them): calls, items, mean batch size."""

    def __init__(self):
        self.calls = self.items = 0

    def add(self, n: int) -> None:
        self.calls, self.items = self.calls + 1, self.items + n

    def read(self) -> dict:
        return {"calls": self.calls, "items": self.items, "mean_batch": self.items / max(1, self.calls)}


class Batcher:
    """Calls an async batch function on the requests that queued while its previous call ran, up to ``max_size``
    a call; an idle function waits ``wait_s`` after the first request for others. (Serve's ``@serve.batch`` forms
    a batch ``batch_wait_timeout_s`` after its first request and queues formed batches behind the running one, so
    under load its batches stay at one or two requests: 1.5 at 8 clients in ``benchmarks/serve.py``.)"""

    def __init__(self, fn, max_size: int, wait_s: float):
        self.fn, self.max_size, self.wait_s = fn, max_size, wait_s
        self.pending: list[tuple] = []
        self.task = None

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if self.task is None:
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            if len(self.pending) < self.max_size:
                await asyncio.sleep(self.wait_s)
            while self.pending:
                batch, self.pending = self.pending[:self.max_size], self.pending[self.max_size:]
                try:
                    results = await self.fn([item for item, _ in batch])
                except Exception as err:  # noqa: BLE001 - the batch's callers get its error, the next batch runs
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.task = None


@serve.deployment
class QueryExtractor:
    """The galleries' extractor on uploaded images, a batch of concurrent requests at a time: uploads decoded in a
    thread pool (PIL releases the GIL), the batch extracted in one call on a thread of its own (the replica's event
    loop keeps taking requests meanwhile)."""

    def __init__(self, backbone: str, options: dict, max_pixels: int, batch_size: int, batch_wait_s: float,
                 threads: int):
        import torch

        from rrt_dist.devices import require_gpu
        from rrt_dist.features import create_extractor, create_preparer

        require_gpu("serve.extractor")
        torch.set_num_threads(threads)
        self.extractor = create_extractor(backbone, **options)
        self.preparer = create_preparer(backbone, **options)
        self.max_pixels = max_pixels
        self.decoders = ThreadPoolExecutor(max(2, threads), thread_name_prefix="decode")
        self.model = ThreadPoolExecutor(1, thread_name_prefix="extract")
        self.stats = BatchStats()
        self.batches = Batcher(self._extract_batch, batch_size, batch_wait_s)

    def _prepare(self, data: bytes):
        """The upload decoded and resized for the extractor, or the :class:`Refused` it gets."""
        from rrt_dist.features.images import ImageError, ImageTooLarge, decode_image

        try:
            return self.preparer(decode_image(io.BytesIO(data), "the upload", None, self.max_pixels))
        except ImageTooLarge as err:
            return Refused(413, str(err))
        except ImageError as err:
            return Refused(400, f"not a readable image ({str(err).removeprefix('the upload: ')})")

    def _extract(self, prepared: list) -> dict:
        from rrt_dist.features.core import extract_batch, locals_layout

        feats = extract_batch(self.extractor, prepared, [(0.0, 0.0)] * len(prepared))
        return locals_layout(feats, self.extractor.max_local, self.extractor.local_dim)

    async def extract(self, upload: bytes):
        """The upload's features (``take_locals`` layout, one row) or a :class:`Refused`."""
        return await self.batches(upload)

    async def _extract_batch(self, uploads: list[bytes]) -> list:
        loop = asyncio.get_running_loop()
        results = list(await asyncio.gather(*(loop.run_in_executor(self.decoders, self._prepare, u) for u in uploads)))
        where = [i for i, r in enumerate(results) if not isinstance(r, Refused)]
        if where:
            self.stats.add(len(where))
            try:
                layout = await loop.run_in_executor(self.model, self._extract, [results[i] for i in where])
            except Exception:       # noqa: BLE001 - one upload the model cannot take must not fail the others
                for i in where:
                    results[i] = await loop.run_in_executor(self.model, self._extract_alone, results[i])
            else:
                for row, i in enumerate(where):
                    results[i] = {name: values[row:row + 1] for name, values in layout.items()}
        return results

    def _extract_alone(self, prepared):
        try:
            return self._extract([prepared])
        except Exception as err:  # noqa: BLE001 - the upload's own failure: a 400 naming it, not a 500
            return Refused(400, f"the image could not be extracted ({type(err).__name__}: {first_line(err)})")

    def batch_stats(self) -> dict:
        return self.stats.read()


class ServedGallery:
    """One gallery as a searcher replica serves it: the snapshot it answers from and the sharded index of that
    snapshot's index directory; the snapshots of recent index versions stay known, so a search that ran on the
    version before a refresh is answered with that version's snapshot."""

    def __init__(self, snapshot, index):
        self.index, self.snapshot = index, snapshot
        self.by_version = {snapshot.index_version: snapshot}
        self.catalogs: dict = {}                         # catalog version -> its reader (the last three)

    def catalog(self, snapshot):
        key = snapshot.catalog_version
        if key not in self.catalogs:
            reader = snapshot.catalog_version_reader()
            self.catalogs = {**dict(list(self.catalogs.items())[-2:]), key: reader}
        return self.catalogs[key]


@serve.deployment
class GallerySearcher:
    """Each served gallery's snapshot and sharded index, moved to the gallery's newest committed snapshot in the
    background; the queries of concurrent requests for one gallery are searched together. A gallery that is not
    ready (never ingested, its index version gone, a damaged table) is answered 503 and checked again at each
    refresh; the others serve all the same."""

    def __init__(self, root: str, names: list[str], search_resources, params: str | None, refresh_s: float,
                 batch_size: int, batch_wait_s: float):
        self.root, self.names, self.resources, self.params = root, names, search_resources, params
        self.served: dict[str, ServedGallery] = {}
        self.problems: dict[str, GalleryNotReady] = {}
        self.lock = threading.Lock()
        self.stats = BatchStats()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="search")
        self.refreshes = 0
        for name in names:
            self._refresh(name)
        self.refresh_s = refresh_s
        self.stop = threading.Event()
        self.batches = Batcher(self._search_batch, batch_size, batch_wait_s)
        threading.Thread(target=self._refresh_loop, daemon=True).start()

    def _refresh(self, name: str) -> None:
        """Serve gallery ``name``'s committed snapshot if it is not the one served (its index moved to the snapshot's
        version: new shard actors load first, then searches switch over); a gallery that cannot be served keeps
        what it served, or is not ready."""
        from rrt_dist.gallery import Gallery
        from rrt_dist.index.sharded import ShardedIndex

        try:
            snapshot = Gallery.open(self.root, name).snapshot()
            served = self.served.get(name)
            if served is not None and served.snapshot == snapshot:
                if self.refreshes % VERIFY_EVERY == 0:
                    self._verify(name, served)
                return
            snapshot.verify()                    # a damaged table is never served
            if served is None or served.snapshot.index != snapshot.index:
                index = ShardedIndex(snapshot.index, self.resources, self.params, version=snapshot.index_version,
                                     shared=True)
                with self.lock:
                    self.served[name] = ServedGallery(snapshot, index)
                if served is not None:
                    served.index.close()
            else:
                served.by_version[snapshot.index_version] = snapshot
                served.index.refresh(snapshot.index_version)
                with self.lock:
                    served.snapshot = snapshot
                    served.by_version = {v: s for v, s in served.by_version.items()
                                         if v >= snapshot.index_version - 2}
            self.problems.pop(name, None)
            log.info("gallery %s: serving %s", name, snapshot.versions)
        except GalleryNotReady as err:
            self.problems[name] = err
        except Exception as err:             # a store error, a damaged table: keep what is served, say why
            if name not in self.served:
                self.problems[name] = GalleryNotReady(name, f"it cannot be read ({first_line(err)})")
            log.exception("gallery %s: moving to its newest snapshot failed; still serving %s", name,
                          self.served[name].snapshot.versions if name in self.served else "nothing")

    def _verify(self, name: str, served: ServedGallery) -> None:
        """Stop serving a gallery whose served snapshot's files went missing (503 naming the damage and the repair)
        until a whole snapshot is committed."""
        from rrt_dist.schema import UnreadableTable

        try:
            served.snapshot.verify()
        except (UnreadableTable, OSError, ValueError) as err:
            with self.lock:
                self.served.pop(name, None)
            self.problems[name] = GalleryNotReady(name, f"its table is damaged ({first_line(err)})")
            log.error("gallery %s: %s; not served until it is repaired", name, err)
            served.index.close()

    def _refresh_loop(self) -> None:
        while not self.stop.wait(self.refresh_s):
            self.refreshes += 1
            for name in self.names:
                self._refresh(name)

    def _served(self, gallery: str) -> ServedGallery:
        served = self.served.get(gallery)
        if served is None:
            raise not_ready(self.problems.get(gallery) or GalleryNotReady(gallery, "it is being opened"))
        return served

    def _search_one_gallery(self, served: ServedGallery, vectors: np.ndarray, n: int):
        start = time.perf_counter()
        scores, ids, version = served.index.search_versioned(vectors, n)
        return scores, ids, served.by_version[version], (time.perf_counter() - start) * 1e3

    async def search(self, request: tuple):
        return await self.batches(request)

    async def _search_batch(self, requests: list[tuple]) -> list:
        """Per request ``(gallery, vector [1, d], n, k)``: the top ``n`` ids and scores of the gallery's snapshot,
        the paths of the first ``k``, and that snapshot; or a :class:`Refused`. The requests of one gallery are
        searched in one call."""
        loop = asyncio.get_running_loop()
        out: list = [None] * len(requests)
        by_gallery: dict[str, list[int]] = {}
        for i, (gallery, *_) in enumerate(requests):
            by_gallery.setdefault(gallery, []).append(i)
        for gallery, members in by_gallery.items():
            try:
                served = self._served(gallery)
            except Refused as err:
                for i in members:
                    out[i] = err
                continue
            n = max(requests[i][2] for i in members)
            vectors = np.concatenate([requests[i][1] for i in members])
            self.stats.add(len(members))
            scores, ids, snapshot, index_ms = await loop.run_in_executor(self.pool, self._search_one_gallery, served,
                                                                         vectors, n)
            rows = []
            for row, i in enumerate(members):
                keep = ids[row][: requests[i][2]] != NO_ID
                rows.append((ids[row][: requests[i][2]][keep], scores[row][: requests[i][2]][keep]))
            shown = np.concatenate([found[: requests[i][3]] for (found, _), i in zip(rows, members)])
            paths = await loop.run_in_executor(self.pool, served.catalog(snapshot).uris, shown)   # one lookup
            for (found, score), i in zip(rows, members):
                out[i] = {"ids": found, "scores": score, "snapshot": snapshot, "index_ms": index_ms,
                          "paths": {int(f): paths[int(f)] for f in found[: requests[i][3]] if int(f) in paths}}
        return out

    def paths(self, gallery: str, snapshot, ids: np.ndarray) -> dict:
        """The paths of ``ids`` in ``snapshot``'s catalog (the one that answered the request)."""
        return self._served(gallery).catalog(snapshot).uris(ids)

    def image_uri(self, gallery: str, image_id: int):
        """Where image ``image_id`` of the gallery's served snapshot is (None: not listed): only images its catalog
        lists (ingested and extracted), never anything else; a :class:`Refused` when the gallery is not ready."""
        try:
            served = self._served(gallery)
        except Refused as err:
            return err
        return served.catalog(served.snapshot).uris([image_id]).get(image_id)

    def describe(self) -> list[dict]:
        """Every served gallery: ready (its snapshot's versions and size) or not (why, and what to run)."""
        out = []
        for name in self.names:
            served = self.served.get(name)
            if served is None:
                out.append({"name": name, "ready": False, "reason": str(self.problems.get(name, "being opened"))})
                continue
            out.append({"name": name, "ready": True, "index_version": served.snapshot.index_version,
                        "versions": served.snapshot.versions, "images": int(served.index.manifest.ntotal)})
        return out

    def batch_stats(self) -> dict:
        return self.stats.read()

    def __del__(self):
        self.stop.set()


@serve.deployment
class GalleryReranker:
    """Registry rerankers over the feature table version of the snapshot that answered each request, a batch of
    concurrent requests at a time: per reranker and table version, one ``rerank_queries`` call (one vectorised
    call where the scorer allows it), on a thread of its own."""

    def __init__(self, scorers: dict, batch_size: int, batch_wait_s: float, threads: int):
        import torch

        from rrt_dist.devices import require_gpu

        require_gpu("serve.reranker")
        torch.set_num_threads(threads)
        self.scorers, self.cores = scorers, {}
        self.model = ThreadPoolExecutor(1, thread_name_prefix="rerank")
        self.stats = BatchStats()
        self.batches = Batcher(self._rerank_batch, batch_size, batch_wait_s)

    def _core(self, method: str, snapshot):
        """The reranker over ``snapshot``'s table version (the last few kept: requests of the previous snapshot may
        still be in flight after a refresh)."""
        from rrt_dist.rerank.core import RerankCore

        key = (method, snapshot.table, snapshot.table_version)
        if key not in self.cores:
            if len(self.cores) >= 4:
                self.cores.pop(next(iter(self.cores)))
            self.cores[key] = RerankCore(method, self.scorers[method], None, [(snapshot.table, snapshot.table_version)])
        return self.cores[key]

    def _rerank_group(self, method: str, snapshot, members: list[tuple]) -> list:
        core = self._core(method, snapshot)
        depth = members[0][5]
        return core.rerank_queries([m[2] for m in members], [m[3][:depth] for m in members],
                                   [m[4][:depth] for m in members], depth)

    async def rerank(self, request: tuple):
        """For ``(method, snapshot, query features, ids, scores, depth)``: the reordered ids (the first ``depth``
        reranked, the rest in their global order) and the reranker's scores in that order."""
        return await self.batches(request)

    async def _rerank_batch(self, requests: list[tuple]) -> list[dict]:
        loop = asyncio.get_running_loop()
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (method, snapshot, *_rest) in enumerate(requests):
            groups.setdefault((method, snapshot, requests[i][5]), []).append(i)
        for (method, snapshot, _), members in groups.items():
            self.stats.add(len(members))
            try:
                ranked = await loop.run_in_executor(self.model, self._rerank_group, method, snapshot,
                                                    [requests[i] for i in members])
            except UnreadableTable as err:       # its files went missing under the served snapshot
                for i in members:
                    out[i] = Refused(503, str(GalleryNotReady(snapshot.gallery, f"its table is damaged ({err})")))
                continue
            for i, (order, rerank_scores) in zip(members, ranked):
                ids = requests[i][3]
                out[i] = {"ids": np.concatenate([order, ids[len(order):]]), "rerank_scores": rerank_scores}
        return out

    def batch_stats(self) -> dict:
        return self.stats.read()


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


def image_id(raw: str) -> int | None:
    """An image id from a URL: a decimal int64 (ids are 64-bit; anything else names no image)."""
    if not raw.lstrip("-").isdigit() or len(raw) > 20:
        return None
    value = int(raw)
    return value if -MAX_INT64 - 1 <= value <= MAX_INT64 and value != NO_ID else None


def readable_uri(uri: str, allow_http: bool) -> bool:
    """Whether the service may read ``uri``: a local path, a ``file://`` URI or an object store's (http(s) only
    when ``serve.fetch_http_images`` allows it)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    return scheme in STORE_SCHEMES or (allow_http and scheme in ("http", "https"))


def image_response(uri: str, max_bytes: int) -> tuple[bytes, str]:
    """The bytes of an image a gallery lists and the content type its decoded bytes say (formats browsers show as
    they are), or the image re-encoded as PNG; :class:`Refused` 404 when it is missing or not an image, 413 when it
    is larger than ``max_bytes``. Runs on a worker thread (file and object-store reads block)."""
    import fsspec
    from PIL import Image

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isdir(path):
            raise Refused(404, "the gallery's image is not a file")
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise Refused(404, "the gallery's image file is gone") from None
    if len(data) > max_bytes:
        raise Refused(413, f"the image is larger than serve.max_image_bytes={max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = SERVED_FORMATS.get(im.format)
            if kind is not None:
                im.verify()
                return data, kind
            im.load()
            out = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(out, "PNG")
            return out.getvalue(), "image/png"
    except Exception:  # noqa: BLE001 - any decoder failure: not an image the service shows
        raise Refused(404, "the gallery's file is not an image any more") from None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_error(host: str, token_env: str) -> str:
    return (f"the service listens on {host}, which other machines reach: put a bearer token in the environment "
            f"variable {token_env} (serve.token_env), e.g. export {token_env}=$(openssl rand -hex 32)")


def service_token(cfg) -> str | None:
    """The bearer token from the environment variable ``serve.token_env``; required to bind beyond loopback."""
    import os

    token = os.environ.get(cfg.serve.token_env) or None
    if token is None and not is_loopback(cfg.serve.host):
        raise ConfigError(f"serve.host={cfg.serve.host}: {token_error(cfg.serve.host, cfg.serve.token_env)}")
    return token


def bound_host() -> str | None:
    """The address Serve's proxies listen on, as the running Serve controller has it (None: Serve not running)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config.host


def require_token_beyond_loopback(token: str | None, token_env: str) -> None:
    """Refuse to serve without a token where Serve listens beyond loopback, however the application was started
    (``rrt-dist serve``, ``serve run``, ``serve deploy``, a RayService): decided from the address Serve binds, not
    from ``serve.host``, which those other ways do not read."""
    host = bound_host()
    if token is None and host is not None and not is_loopback(host):
        raise ConfigError(token_error(host, token_env))


@serve.deployment
@serve.ingress(app)
class SearchGateway:
    """The HTTP API and the page; checks every request before any model sees it."""

    def __init__(self, extractor, searcher, reranker, galleries: list[str], rerankers: list[str], settings: dict,
                 token: str | None):
        require_token_beyond_loopback(token, settings["token_env"])
        self.extractor, self.searcher, self.reranker = extractor, searcher, reranker
        self.galleries, self.rerankers, self.settings = galleries, rerankers, settings
        self.token = None if token is None else f"Bearer {token}".encode()
        self.files = ThreadPoolExecutor(4, thread_name_prefix="images")
        self.page_html = page_text("search_page.html")     # read once: no file read on the event loop

    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        # headers are bytes on the wire (Starlette decodes them as latin-1): compared as bytes, any byte is a 401
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, self.token):
            raise Refused(401, "a bearer token is required (Authorization: Bearer <serve token>)")

    def _gallery(self, name: str | None) -> str:
        name = name or self.galleries[0]
        if name not in self.galleries:
            raise Refused(404, f"no gallery {name!r} is served; served: {', '.join(self.galleries)}")
        return name

    async def _body(self, request: Request, limit: int) -> bytes:
        """The request's body, read as it arrives: refused (413) as soon as it passes ``limit`` bytes, whether it
        declared its length or is chunked, and dropped (408) when the client stops sending for
        ``serve.read_timeout_s``."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the request has {declared} bytes, over the limit of {limit} (serve.max_bytes)")
        from starlette.requests import ClientDisconnect

        chunks, size, stream = [], 0, request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), self.settings["read_timeout_s"])
            except StopAsyncIteration:
                break
            except ClientDisconnect:
                raise Refused(400, "the client went away before sending the whole request") from None
            except asyncio.TimeoutError:
                raise Refused(408, f"the upload stopped arriving for {self.settings['read_timeout_s']} s "
                                   f"(serve.read_timeout_s)") from None
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the request passed {limit} bytes, the limit (serve.max_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _upload(self, request: Request) -> bytes:
        limit = self.settings["max_bytes"]
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        data = await self._body(request, limit + (64 * 1024 if multipart else 0))      # a form's own bytes allowed
        if multipart:
            request._body = data                         # Starlette parses the form from the body read above
            try:
                form = await request.form(max_files=1, max_fields=16)
            except Exception as err:  # noqa: BLE001 - any parser error is the request's: a 400 naming it
                raise Refused(400, f"the multipart form cannot be read ({first_line(err)})") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise Refused(400, "the multipart form has no file field 'image'")
            data = await upload.read()
        if not data:
            raise Refused(400, "no image: send its bytes as the body or as the form field 'image'")
        if len(data) > limit:
            raise Refused(413, f"the image has {len(data)} bytes, over the limit of {limit} (serve.max_bytes)")
        return data

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Which galleries are ready (names only, no contents): 200 when at least one is, 503 when none."""
        described = await retried(self.searcher.describe)
        galleries = {g["name"]: "ready" if g["ready"] else g["reason"] for g in described}
        return JSONResponse({"galleries": galleries},
                            status_code=200 if any(g["ready"] for g in described) else 503)

    @app.get("/openapi.json")
    async def openapi(self, request: Request) -> dict:
        self._authorise(request)
        return app.openapi()

    @app.get("/galleries")
    async def list_galleries(self, request: Request) -> dict:
        self._authorise(request)
        return {"galleries": await retried(self.searcher.describe), "rerankers": self.rerankers,
                "max_k": self.settings["max_k"]}

    @app.get("/images/{gallery}/{raw_id}")
    async def image(self, gallery: str, raw_id: str, request: Request) -> Response:
        self._authorise(request)
        gallery = self._gallery(gallery)
        wanted = image_id(raw_id)
        uri = None if wanted is None else await retried(self.searcher.image_uri, gallery, wanted)
        if isinstance(uri, Refused):
            raise uri
        if uri is None:
            raise Refused(404, f"gallery {gallery!r} has no image {raw_id[:40]}")
        if not readable_uri(uri, self.settings["fetch_http_images"]):
            raise Refused(404, f"gallery {gallery!r} lists image {raw_id} at an address the service does not fetch "
                               f"(serve.fetch_http_images=false)")
        data, kind = await asyncio.get_running_loop().run_in_executor(self.files, image_response, uri,
                                                                      self.settings["max_image_bytes"])
        return Response(data, media_type=kind, headers={"X-Content-Type-Options": "nosniff",
                                                        "Content-Security-Policy": "default-src 'none'",
                                                        "Cache-Control": "private, max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return self.page_html

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
        found = await retried(self.searcher.search, (gallery, query["global"], max(k, depth), k))
        if isinstance(found, Refused):
            raise found
        timings["search_ms"] = (time.perf_counter() - step) * 1e3
        timings["index_ms"] = found["index_ms"]          # the index search alone, within search_ms
        ids, scores, snapshot, paths = found["ids"], found["scores"], found["snapshot"], found["paths"]

        def entry(rank: int, i) -> dict:
            # ids are 64-bit: a browser's JSON numbers keep 53 bits, so each result also names its image's URL
            return {"rank": rank, "id": int(i), "image_url": f"/images/{gallery}/{int(i)}", "path": paths.get(int(i))}

        global_order = [{**entry(r + 1, i), "global_score": float(s)} for r, (i, s) in enumerate(zip(ids[:k], scores[:k]))]
        results = global_order
        if rerank:
            step = time.perf_counter()
            reranked = await retried(self.reranker.rerank, (rerank, snapshot, query, ids, scores, depth))
            if isinstance(reranked, Refused):
                raise reranked
            timings["rerank_ms"] = (time.perf_counter() - step) * 1e3
            top = reranked["ids"][:k]
            missing = [int(i) for i in top if int(i) not in paths]
            if missing:                      # reranked into the top k from below it: same snapshot's catalog
                paths = {**paths, **await retried(self.searcher.paths, gallery, snapshot, np.asarray(missing))}
            where = {int(i): r for r, i in enumerate(ids)}
            rerank_score = dict(zip(reranked["ids"][:len(reranked["rerank_scores"])].tolist(),
                                    reranked["rerank_scores"].tolist()))
            results = [{**entry(r + 1, i), "global_score": float(scores[where[int(i)]]),
                        "global_rank": where[int(i)] + 1, "rerank_score": rerank_score.get(int(i))}
                       for r, i in enumerate(top)]
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return {"gallery": gallery, "index_version": snapshot.index_version, "versions": snapshot.versions, "k": k,
                "rerank": rerank, "results": results, "global": global_order if rerank else None,
                "timings_ms": {name: round(ms, 2) for name, ms in timings.items()}}


PARTS = ("extractor", "searcher", "reranker", "gateway")
# What each part asks for by default (``serve.<part>.num_cpus: null``), and the ongoing requests a replica takes
# (``max_ongoing_requests: null``), in units of serve.batch_size for the batched parts: at least two batches'
# worth, so a batch can fill while the previous one runs.
DEFAULT_CPUS = {"extractor": 1.0, "searcher": 0.5, "reranker": 1.0, "gateway": 0.5}
ONGOING_BATCHES = {"extractor": 2, "searcher": 4, "reranker": 2}
GATEWAY_ONGOING = 256


def embedded_ray(cfg) -> bool:
    """Whether the service starts its own Ray (not ``ray.address``, not a submitted job's cluster)."""
    import os

    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def part_resources(cfg, cpus: float | None) -> dict[str, dict]:
    """Each deployment's replica options. A part's ``num_cpus: null`` is its default (extractor and reranker 1,
    searcher and gateway 0.5), scaled down together so that every part's ``min_replicas`` fit in ``cpus`` (the CPUs
    of the embedded Ray the service starts; None on a cluster, whose autoscaler adds what is asked): on a 2-CPU
    machine 0.67 / 0.33 / 0.67 / 0.33. A part set explicitly keeps its value (and :func:`check_fits` says when it
    cannot be placed)."""
    from omegaconf import OmegaConf

    parts = {name: OmegaConf.to_container(cfg.serve[name], resolve=True) for name in PARTS}
    auto = [n for n in PARTS if parts[n]["num_cpus"] is None]
    fixed = sum(parts[n]["num_cpus"] * parts[n]["min_replicas"] for n in PARTS if n not in auto)
    wanted = sum(DEFAULT_CPUS[n] * parts[n]["min_replicas"] for n in auto)
    scale = 1.0 if cpus is None or wanted == 0 else min(1.0, max(0.0, cpus - fixed) / wanted)
    out = {}
    for name in PARTS:
        part = parts[name]
        num_cpus = part["num_cpus"] if name not in auto else round(DEFAULT_CPUS[name] * scale, 3)
        ongoing = part["max_ongoing_requests"] or (GATEWAY_ONGOING if name == "gateway" else
                                                   ONGOING_BATCHES[name] * cfg.serve.batch_size)
        out[name] = {"num_cpus": num_cpus, "num_gpus": part["num_gpus"], "min_replicas": part["min_replicas"],
                     "max_replicas": part["max_replicas"], "target_ongoing_requests": part["target_ongoing_requests"],
                     "max_ongoing_requests": ongoing, "threads": max(1, round(num_cpus))}
    return out


def check_fits(parts: dict[str, dict], cpus: float) -> None:
    """Refuse, before anything starts, deployments whose replicas cannot all be placed on an embedded Ray of
    ``cpus`` CPUs: one line naming each part's ask (a Serve replica that cannot be placed waits forever)."""
    asked = {n: p["num_cpus"] * p["min_replicas"] for n, p in parts.items()}
    if sum(asked.values()) > cpus + 1e-9:
        detail = ", ".join(f"{n} {p['min_replicas']} x {p['num_cpus']:g}" for n, p in parts.items())
        raise ConfigError(f"serve: the deployments ask for {sum(asked.values()):g} CPUs ({detail}) and this Ray has "
                          f"{cpus:g}: lower serve.<part>.num_cpus or min_replicas, or leave num_cpus unset (null) to "
                          f"fit the machine")


def build_app(cfg, token: str | None, cpus: float | None = None, refuse_unfit: bool = True):
    """The application for ``cfg`` (``serve.run`` it): its deployments bound with the served galleries (each
    checked to exist and hold this backbone's features; one that is not ready yet is served as 503 until it is)
    and every reranker the galleries' tables can feed. ``cpus``: the CPUs of the Ray it will run on (the parts
    with no ``num_cpus`` are sized to fit; ``refuse_unfit``: parts set beyond it are refused now), None on a
    cluster that adds nodes for what is asked."""
    from omegaconf import OmegaConf

    from rrt_dist.rerank.methods import list_rerankers

    from .rerank import scorer_options
    from .search import check_reranker, gallery_snapshot

    names = list(cfg.serve.galleries or [cfg.gallery.name])
    for name in names:
        try:
            gallery_snapshot(cfg, name)
        except (GalleryNotReady, UnreadableTable) as err:    # 503 until an ingest commits a whole snapshot
            log.warning("%s; the other galleries are served, this one once it is ready", err)
    scorers = {}
    for name in list_rerankers():
        try:
            check_reranker(cfg, name, "rerank")
            scorers[name] = scorer_options(cfg.reranker, name)
        except (ConfigError, ValueError) as err:        # not servable with these tables or weights: not offered
            log.info("reranker %s not served: %s", name, err)
    parts = part_resources(cfg, cpus)
    if cpus is not None and refuse_unfit:
        check_fits(parts, cpus)

    def deployment(cls, part):
        options = parts[part]
        return cls.options(ray_actor_options={"num_cpus": options["num_cpus"], "num_gpus": options["num_gpus"]},
                           max_ongoing_requests=options["max_ongoing_requests"],
                           autoscaling_config={"min_replicas": options["min_replicas"],
                                               "max_replicas": options["max_replicas"],
                                               "target_ongoing_requests": options["target_ongoing_requests"]})

    serving = cfg.serve
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    extractor = deployment(QueryExtractor, "extractor").bind(
        cfg.backbone.name, options, cfg.backbone.max_image_pixels, serving.batch_size, serving.batch_wait_s,
        parts["extractor"]["threads"])
    searcher = deployment(GallerySearcher, "searcher").bind(
        cfg.gallery.root, names, OmegaConf.to_object(cfg.ray.search), cfg.index.params, serving.refresh_s,
        serving.batch_size, serving.batch_wait_s)
    reranker = deployment(GalleryReranker, "reranker").bind(scorers, serving.batch_size, serving.batch_wait_s,
                                                            parts["reranker"]["threads"])
    settings = {"max_bytes": serving.max_bytes, "max_k": serving.max_k, "depth": cfg.reranker.depth,
                "read_timeout_s": serving.read_timeout_s, "max_image_bytes": serving.max_image_bytes,
                "fetch_http_images": serving.fetch_http_images, "token_env": serving.token_env}
    return deployment(SearchGateway, "gateway").bind(extractor, searcher, reranker, names, sorted(scorers), settings,
                                                     token)


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


def wait_until_running(timeout_s: float, app_name: str = "rrt-dist") -> None:
    """Return once every deployment of the application runs; otherwise one line naming the deployment that could
    not start (its first line of Serve's message) or could not be placed in ``timeout_s`` (what it asks for)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        failed = [(n, d) for n, d in (status.deployments.items() if status else []) if str(d.status).endswith(
            ("UNHEALTHY", "DEPLOY_FAILED"))]
        if failed or (status is not None and str(status.status).endswith("DEPLOY_FAILED")):
            name, detail = failed[0] if failed else (app_name, status)
            message = [line.strip() for line in (detail.message or str(detail.status)).splitlines() if line.strip()]
            # a replica's constructor error arrives as its traceback: its last "SomeError: what" line says it
            raised = [line for line in message if re.match(r"^[\w.]*(Error|Exception|NotReady)\b.*: \S", line)
                      and not line.startswith("RuntimeError: Traceback")]
            reason = raised[-1] if raised else (message[0] if message else "")
            raise ConfigError(f"serve: deployment {name} could not start: {reason}")
        if time.monotonic() > deadline:
            waiting = {n: d for n, d in (status.deployments.items() if status else []) if not str(d.status).endswith(
                "HEALTHY")}
            said = next((d.message.strip().splitlines()[0] for d in waiting.values() if d.message), "")
            raise ConfigError(f"serve: deployment(s) {', '.join(waiting) or app_name} not running after {timeout_s:g} s "
                              f"(serve.start_timeout_s): their replicas could not be placed (serve.<part>.num_cpus / "
                              f"num_gpus ask for more than the cluster gives){'; Serve: ' + said if said else ''}")
        time.sleep(0.5)


def deploy(cfg, application) -> str:
    """Start Serve on ``serve.host``:``serve.port`` of the Ray the job runs on (a proxy on every node) and deploy
    ``application``; returns its URL once every deployment runs. Deploying again replaces the running application
    in place."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, proxy_location="EveryNode")
    # not serve.run: it waits forever for a replica that cannot be placed, and raises Serve's traceback for one that
    # fails; wait_until_running says either in one line
    serve.run_many([serve.RunTarget(application, name="rrt-dist", route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_until_running(cfg.serve.start_timeout_s)
    return f"http://{cfg.serve.host}:{cfg.serve.port}/"


def start_service(cfg, token: str | None, cpus: float | None = None) -> str:
    """:func:`build_app` (the galleries checked), then :func:`deploy` it."""
    return deploy(cfg, build_app(cfg, token, cpus))


def serve_config(cfg, overrides: list[str]) -> dict:
    """A Serve config file (``serve deploy`` / ``serve run``) for the same application: the builder and these
    overrides, Serve's HTTP options from ``serve.host`` / ``serve.port``, a proxy on every node. No token: the
    deploying process reads it from ``serve.token_env`` in its own environment."""
    return {"proxy_location": "EveryNode", "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
            "applications": [{"name": "rrt-dist", "route_prefix": "/", "import_path": f"{__name__}:app_builder",
                              "args": {"overrides": list(overrides)}}]}


def serve_galleries(cfg, overrides: list[str]) -> None:
    """``rrt-dist serve``: the service until interrupted (Ctrl-C, or the job stopped); writes ``serve_config.yaml``
    (the same application for ``serve deploy``) into the run's output folder."""
    from pathlib import Path

    import yaml

    from rrt_dist.config import available_cpus
    from rrt_dist.runtime import init_ray

    token = service_token(cfg)
    cpus = float(cfg.ray.num_cpus or available_cpus()) if embedded_ray(cfg) else None
    application = build_app(cfg, token, cpus)          # galleries, rerankers and resources checked before Ray starts
    check_port_free(cfg.serve.host, cfg.serve.port)
    config_file = Path(cfg.output_dir) / "serve_config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(serve_config(cfg, overrides), sort_keys=False))
    init_ray(cfg.ray)
    url = deploy(cfg, application)
    print(f"serving {', '.join(cfg.serve.galleries or [cfg.gallery.name])} at {url} (search page at /, API: POST "
          f"/search, GET /galleries, GET /readyz; {'bearer token required' if token else 'no token: loopback only'}); "
          f"the same application for `serve deploy`: {config_file}; Ctrl-C stops", flush=True)
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
    own HTTP options (host, port) are the config file's ``http_options``, and the token rule follows them: where
    Serve already runs beyond loopback, building without a token is refused here, and everywhere the gateway
    refuses to start without one."""
    import os

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
    import ray

    token = os.environ.get(cfg.serve.token_env) or None
    require_token_beyond_loopback(token, cfg.serve.token_env)
    from rrt_dist.config import available_cpus

    # Sized to the Ray it will run on when that has CPUs (one machine, a fixed cluster); a cluster whose CPU nodes
    # start at zero gets what the config asks, which makes its autoscaler add them. `serve run module:app_builder`
    # builds before it connects: then, with no RAY_ADDRESS, the Ray it starts is this machine's.
    if ray.is_initialized():
        cpus = ray.cluster_resources().get("CPU") or None
    else:
        cpus = None if os.environ.get("RAY_ADDRESS") else float(available_cpus())
    return build_app(cfg, token, cpus, refuse_unfit=False)
