"""rrt-dist: Ray-distributed large-scale image retrieval with reranking (see README.md)."""
import logging as _logging
import os as _os
import warnings as _warnings

# FAISS logs its CPU-feature fallbacks (AVX512 -> AVX2 -> generic) at INFO from every process that imports it.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
# Lance warns "No existing dataset ..., it will be created" for every fragment written before a table's first
# commit, which is how the pipelines write: set before any submodule imports lance; errors still show.
_os.environ.setdefault("LANCE_LOG", "error")
# Lance warns "lance is not fork-safe" at every fork of a process that imported it: Ray's workers fork helper
# processes that exec at once and never touch a table, so the warning only buries the logs.
_warnings.filterwarnings("ignore", message="lance is not fork-safe")

# The layers, bottom up: a module imports only from its own layer or below (tests/test_layers.py checks every
# import, deferred ones included, and that the import graph has no cycle). A package's entry covers its modules;
# a module named on its own sits where it is listed. metrics is the protocols' pure definitions (numpy only),
# which the benchmark readers carry with their ground truth (rrt_dist.eval.metrics re-exports it: its public path).
# No two packages import each other, even through modules in different layers (the test checks that too).
LAYERS = (
    ("schema",),                                   # errors, ids, settings dataclasses
    ("store", "models", "metrics", "devices"),     # pure cores with no other rrt_dist dependency
    ("features", "index", "datasets", "gallery"),
    ("rerank", "eval"),
    ("train",),
    ("config",),                                   # the Hydra schema, assembled from the registries
    ("runtime",),                                  # starts Ray; the job wrapper
    ("pipelines",),                                # Ray layers composing the stages
    ("jobs", "cli"),                               # entry points
)
