"""A gallery as one object: record, feature table, image catalog, index, ingest lock, and the snapshot a reader
pins (see :mod:`rrt_dist.gallery.core`)."""
from .catalog import CatalogVersion, ImageCatalog
from .core import CATALOG, RECORD, Gallery, Snapshot, gallery_dir

__all__ = ["CATALOG", "RECORD", "CatalogVersion", "Gallery", "ImageCatalog", "Snapshot", "gallery_dir"]
