"""Descriptor extractors behind one registry, in the style of timm's ``create_model``.

An entry names its options dataclass (``rrt_dist.features.options``) and where its class lives; the class, and
with it torch and the model code, is imported only when an extractor or its preparer is made, so the config
schema and its checks read the registry without them.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from rrt_dist.schema import ConfigError

from .options import (DelgReleaseConfig, DenseGridConfig, MultiscaleConfig, TinyImageConfig, ViTConfig, parse_options,
                      recorded_options)


@dataclass(frozen=True)
class ExtractorEntry:
    name: str
    config_class: type      # the dataclass of its options (backbone.options)
    target: str             # "module:Class" of the extractor, imported on first use
    provides: tuple[str, ...] = ("global",)   # what its tables hold for rerankers: global | locals | positions | patches
    reads: str = "images"   # images | files: descriptor files already computed, read per image instead of extracted

    def load(self) -> type:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, ExtractorEntry] = {}


def register_extractor(name: str, config_class: type, target: str, provides: tuple[str, ...] = ("global",),
                       reads: str = "images") -> None:
    if name in _REGISTRY:
        raise ValueError(f"extractor {name!r} is already registered")
    _REGISTRY[name] = ExtractorEntry(name, config_class, target, provides, reads)


def extractor_reads_files(name: str) -> bool:
    """Whether extractor ``name`` reads descriptor files (a manifest's ``uri`` is the file) instead of images."""
    return _entry(name).reads == "files"


def extractor_provides(name: str) -> tuple[str, ...]:
    """What extractor ``name``'s tables hold for rerankers (``rrt_dist.rerank.methods.Reranker.inputs``)."""
    return _entry(name).provides


def list_extractors() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> ExtractorEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown extractor {name!r}; known: {', '.join(list_extractors())}")
    return _REGISTRY[name]


def create_extractor(name: str, **cfg):
    """Instantiate a registered extractor; unknown names list the known ones."""
    return _entry(name).load()(**cfg)


def extractor_config_class(name: str) -> type:
    """The dataclass of extractor ``name``'s options."""
    return _entry(name).config_class


def check_extractor_options(name: str, options: dict, key: str = "backbone") -> None:
    """Refuse an unknown extractor or option with a ConfigError naming the key (``<key>.name``,
    ``<key>.options.<option>``; no model is loaded)."""
    if name not in _REGISTRY:
        raise ConfigError(f"{key}.name={name!r} is not an extractor; known: {', '.join(list_extractors())}")
    known = [f.name for f in fields(_REGISTRY[name].config_class)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{key}.options.{unknown[0]} is not an option of extractor {name!r}; "
                          f"its options: {', '.join(known)}")
    for option in FILE_OPTIONS:
        value = options.get(option)
        if value and "://" not in str(value) and not Path(value).exists():
            raise ConfigError(f"{key}.options.{option}={value}: no such file")


FILE_OPTIONS = ("checkpoint", "whitening", "local_projection", "global_projection")   # paths an extractor reads


def create_preparer(name: str, **cfg):
    """The CPU-side resize of extractor ``name`` (no model is loaded): ``rgb -> Prepared``."""
    return _entry(name).load().preparer(**cfg)


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, identity: str) -> str:
    """SHA-1 of a local file's bytes (cached per process by path and size / mtime: read once, not per table)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def weights_identity(location: str) -> str:
    """What the weights at ``location`` are, beyond their path: the content of the file, or of every file of a
    model folder (a saved Hugging Face model); for a URI, the store's version of the object (an s3 ETag is a
    content hash). A checkpoint rewritten at the same path, as a rerun of training does, is another extractor:
    its tables are not the old ones. Content, not modification time, so that nodes holding their own copies of
    the same weights agree."""
    from .images import file_identity

    if "://" in location:
        return file_identity(location)
    path = Path(location)
    if path.is_dir():
        return ";".join(f"{p.relative_to(path)}={weights_identity(str(p))}" for p in sorted(path.rglob("*"))
                        if p.is_file())
    identity = file_identity(location)
    return identity if identity == "missing" else _content_digest(str(path.resolve()), identity)


def _digest(name: str, config: dict) -> str:
    weights = {k: weights_identity(str(config[k])) for k in FILE_OPTIONS if config.get(k)}
    payload = json.dumps({"name": name, "config": config, **({"weights": weights} if weights else {})},
                         sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def fingerprint(extractor) -> str:
    """Identifies an extractor and its configuration; an index refuses queries from another one."""
    return _digest(extractor.name, extractor.config)


def config_fingerprint(name: str, **cfg) -> str:
    """The fingerprint ``create_extractor(name, **cfg)`` will have, without loading any model."""
    return _digest(name, recorded_options(parse_options(_entry(name).config_class, **cfg)))


# patches: a fixed grid of cells beside a global descriptor, what the structural reranker transports between
GRID = ("global", "locals", "positions", "patches")
register_extractor("tiny-image", TinyImageConfig, "rrt_dist.features.tiny_image:TinyImageExtractor")
register_extractor("multiscale-cnn", MultiscaleConfig, "rrt_dist.features.multiscale:MultiscaleCNN",
                   ("global", "locals", "positions"))
register_extractor("dense-grid", DenseGridConfig, "rrt_dist.features.grid:DenseGrid", GRID)
register_extractor("vit", ViTConfig, "rrt_dist.features.grid:ViTTokens", GRID)
register_extractor("delg-import", DelgReleaseConfig, "rrt_dist.features.delg:DelgImport", ("global", "locals", "positions"),
                   reads="files")
