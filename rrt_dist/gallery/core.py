"""A gallery: a named, growing collection of images, one object owning everything under ``<root>/<name>/``::

    gallery.json                           the record: name, extractor, ingest history, the committed snapshot
    images.lance                           the image catalog: one row per ingested id (rrt_dist.gallery.catalog)
    features/<fingerprint>/gallery.lance   the feature table (+ gallery-errors.lance, the unreadable images)
    index/<fingerprint>/<factory>-<n>s/    the versioned sharded index (rrt_dist.index)
    ingest.lock                            one ingest at a time

An ingest commits in this order: feature rows with their catalog rows (each extraction commit), the index
version built from the table, then the record's ``snapshot`` (one rename): the index version, the table version
it indexes and the catalog version that lists it. That last rename is the commit point. A reader pins the
snapshot (:meth:`Gallery.snapshot`) and answers search, rerank and image paths from it, so an answer never mixes
an index of one ingest with the features or paths of another, and an ingest that dies before its commit point
changes nothing any reader sees. Nothing outside this package reads ``gallery.json`` or ``images.lance``.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import fsspec

from rrt_dist.schema import DatasetLayoutError, GalleryNotReady
from rrt_dist.store import FeatureStore
from rrt_dist.store.locks import writer_lock

from .catalog import CatalogVersion, ImageCatalog

RECORD = "gallery.json"
CATALOG = "images.lance"


def gallery_dir(root: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise DatasetLayoutError(name, "is not a gallery name (letters, digits, '_', '.', '-')", "gallery.name")
    return f"{root.rstrip('/')}/{name}"


@dataclass(frozen=True)
class Snapshot:
    """Versions of one gallery that belong together: an index version, the feature-table version it indexes and
    the catalog version committed with it. Small and picklable (it crosses to every deployment that answers a
    request); each reader opens what it reads from it."""
    gallery: str
    fingerprint: str
    index: str                   # the index directory
    index_version: int
    table: str                   # the feature table (Lance URI)
    table_version: int
    catalog: str                 # the image catalog (Lance URI)
    catalog_version: int

    @property
    def versions(self) -> dict:
        """What a response names: the three versions answering it."""
        return {"index": self.index_version, "table": self.table_version, "catalog": self.catalog_version}

    def features(self) -> FeatureStore:
        return FeatureStore(self.table, self.table_version)

    def verify(self) -> None:
        """Raise :class:`rrt_dist.schema.DamagedTable` when a data file of the snapshot's table version is missing or
        short (names and sizes against its manifest: no file is read), and the catalog's error when its version
        cannot be opened."""
        import lance

        from rrt_dist.store import check_whole

        check_whole(self.table, lance.dataset(self.table, version=self.table_version))
        lance.dataset(self.catalog, version=self.catalog_version)

    def catalog_version_reader(self) -> CatalogVersion:
        return CatalogVersion(self.catalog, self.catalog_version)


PINS = ("gallery-snapshot", "gallery-previous-snapshot")


def pin(uri: str, version: int) -> None:
    """Tag ``version`` of table ``uri`` as the snapshot's and move the previous snapshot's tag to what it held: a
    tagged version is never cleaned (``rrt_dist.store.cleanup``), so readers pinned to either keep reading it."""
    import lance

    tags = lance.dataset(uri).tags
    held = {name: info["version"] for name, info in tags.list().items()}
    if held.get(PINS[0]) == version:
        return
    for name, target in ((PINS[1], held.get(PINS[0])), (PINS[0], version)):
        if target is None:
            continue
        (tags.update if name in held else tags.create)(name, target)


class Gallery:
    """Gallery ``name`` under ``root``: its record, feature table, image catalog, index and ingest lock.

    ``Gallery.open(root, name)`` reads the record (a gallery never ingested has none); :meth:`snapshot` is what a
    reader pins; :meth:`commit` (under :meth:`lock`) moves readers to a new snapshot."""

    def __init__(self, root: str, name: str, record: dict | None):
        self.root, self.name = root, name
        self.directory = gallery_dir(root, name)
        self.record = record
        self.catalog = ImageCatalog(f"{self.directory}/{CATALOG}")

    @classmethod
    def open(cls, root: str, name: str) -> "Gallery":
        directory = gallery_dir(root, name)
        fs, path = fsspec.core.url_to_fs(directory)
        record = None
        if fs.exists(f"{path}/{RECORD}"):
            with fs.open(f"{path}/{RECORD}", "r") as f:
                record = json.loads(f.read())
        return cls(root, name, record)

    @classmethod
    def names(cls, root: str) -> list[str]:
        """The galleries under ``root`` (folders with a record), sorted."""
        fs, path = fsspec.core.url_to_fs(root)
        if not fs.exists(path):
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)
                      if fs.exists(f"{entry.rstrip('/')}/{RECORD}"))

    def lock(self, wait: bool = True):
        """Hold the gallery's ingest lock, so two ingests into one gallery run one after the other (the second then
        skips what the first extracted). ``wait=False`` raises :class:`rrt_dist.store.locks.Busy`."""
        return writer_lock(f"{self.directory}/ingest", f"gallery {self.directory}", wait)

    @property
    def history(self) -> list[dict]:
        return list((self.record or {}).get("history", []))

    @property
    def fingerprint(self) -> str | None:
        return (self.record or {}).get("fingerprint")

    def table_uri(self, fingerprint: str) -> str:
        return f"{self.directory}/features/{fingerprint}/gallery.lance"

    def index_dir(self, fingerprint: str, factory: str, n_shards: int) -> str:
        return f"{self.directory}/index/{fingerprint}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', factory)}-{n_shards}s"

    def snapshot(self) -> Snapshot:
        """The committed snapshot readers answer from; :class:`GalleryNotReady` (naming the gallery and what to run)
        when there is none that can be read: never ingested, a first ingest that did not finish, a record of an
        earlier release, or an index version that is gone."""
        rerun = f"rrt-dist ingest gallery.name={self.name} gallery.root={self.root}"
        if self.record is None:
            raise GalleryNotReady(self.name, f"it has not been ingested: run {rerun} gallery.images=FOLDER")
        snap = self.record.get("snapshot")
        if snap is None:
            why = ("it was ingested by an earlier rrt-dist (no snapshot in its record)" if self.record.get("history")
                   else "its first ingest did not finish")
            raise GalleryNotReady(self.name, f"{why}: rerun {rerun}")
        snapshot = Snapshot(gallery=self.name, fingerprint=self.record["fingerprint"], **snap)
        from rrt_dist.index.core import read_manifest

        try:
            read_manifest(snapshot.index, snapshot.index_version)
        except FileNotFoundError as err:
            raise GalleryNotReady(self.name, f"{err}: rerun {rerun}") from None
        return snapshot

    def commit(self, snapshot: Snapshot, entry: dict | None = None, **record) -> None:
        """Make ``snapshot`` the one readers answer from (one rename), appending ``entry`` to the history and setting
        ``record``'s keys (name, extractor, fingerprint). Its table and catalog versions are tagged first (and the
        previous snapshot's kept tagged for the readers still on it), so cleaning old versions never removes them.
        Call under :meth:`lock`."""
        pin(snapshot.table, snapshot.table_version)
        pin(snapshot.catalog, snapshot.catalog_version)
        fields = {k: v for k, v in asdict(snapshot).items() if k not in ("gallery", "fingerprint")}
        updated = {"name": self.name, **(self.record or {}), **record, "fingerprint": snapshot.fingerprint,
                   "snapshot": fields, "history": self.history + ([entry] if entry else [])}
        self.write_record(updated)

    def write_record(self, record: dict) -> None:
        fs, path = fsspec.core.url_to_fs(self.directory)
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path}/{RECORD}.tmp", "w") as f:
            f.write(json.dumps(record, indent=2))
        fs.mv(f"{path}/{RECORD}.tmp", f"{path}/{RECORD}")
        self.record = record

    def describe(self) -> dict:
        """The listing row of ``rrt-dist galleries`` and the service's readiness: name, state (``ready`` or why
        not), rows, index version and size, extractor fingerprint, ingests. Never raises for one broken gallery."""
        from rrt_dist.index.core import read_manifest
        from rrt_dist.schema import USER_ERRORS

        history = self.history
        row = {"name": self.name, "fingerprint": self.fingerprint or "", "state": "ready", "rows": 0,
               "index_version": None, "index_rows": 0, "ingests": len(history),
               "last_ingest": history[-1]["time"] if history else None}
        try:
            snapshot = self.snapshot()
            manifest = read_manifest(snapshot.index, snapshot.index_version)
            row.update(index_version=manifest.version, index_rows=manifest.ntotal, factory=manifest.factory,
                       shards=len(manifest.shards), rows=len(snapshot.features()))
        except GalleryNotReady as err:
            row["state"] = f"not ready: {err.reason}"
        except (*USER_ERRORS, OSError, ValueError) as err:      # a damaged table or store: named, others listed
            row["state"] = f"damaged: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        return row
