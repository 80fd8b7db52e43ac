"""The reranker registry: every way the report can rerank a global top-K, in the spirit of timm's
``register_model``. An entry names its scorer, the options schema it takes (``reranker.<name>``), its report
label, the descriptors it reads and how its score combines with the global one.

A report row (``reranker.methods``) is ``global``, ``aqe`` (αQE), a scorer name (``gv``, ``rrt``,
``structural``, ``superglobal``) or ``aqe+<scorer>`` (the scorer reranks the αQE ranking's top-K). :func:`parse_method`
reads one once, at start-up; an unknown name fails there with the list of known ones. A new reranker is
one file with its scorer plus one :func:`register_reranker` call below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from rrt_dist.schema import ConfigError

from .options import GVConfig, RRTOptions, StructuralConfig, SuperGlobalOptions


@dataclass(frozen=True)
class Reranker:
    name: str
    label: str                        # report row label
    # "module:Class" of its scorer, imported on first use, created as scorer(**options). A pair scorer is called
    # scorer(query, candidates) -> scores [K] (each pair on its own); a set scorer has score_sets(queries [B, d],
    # candidates [B, K, d], valid [B, K]) -> scores [B, K] (a query's candidates scored together, from globals,
    # NaN past what it reorders). Higher is better; the final order is by score + scorer.global_weight × global
    # cosine (absent or 0: the global score only breaks ties)
    scorer: str
    options: type | None = None       # dataclass of its options: the schema of reranker.<name> (None: none)
    # what it reads beyond the global descriptors: locals | positions | patches (from the extractor's tables) |
    # checkpoint (reranker.checkpoint); () for a reranker of global descriptors only
    inputs: tuple[str, ...] = ("locals",)
    # the option capping how many of the top reranker.depth it reorders (SuperGlobal's M), if any
    depth_option: str | None = None

    def scorer_class(self) -> type:
        module, _, attr = self.scorer.partition(":")
        return getattr(importlib.import_module(module), attr)

    def create(self, **options):
        return self.scorer_class()(**options)

    def reranked_depth(self, depth: int, options) -> int:
        """How many of the top ``depth`` it reorders with ``options`` (its ``reranker.<name>`` config)."""
        return min(depth, int(options[self.depth_option])) if self.depth_option else depth

    @property
    def explains(self) -> bool:
        """Whether its scorer shows why it scored a pair (``explain``: matches, weights) for results browsers."""
        return hasattr(self.scorer_class(), "explain")


@dataclass(frozen=True)
class Method:
    """One report row: optional αQE, then optional reranking by ``reranker``."""
    name: str
    expand: bool
    reranker: Reranker | None

    @property
    def label(self) -> str:
        parts = (["αQE"] if self.expand else []) + ([self.reranker.label] if self.reranker else [])
        return " + ".join(parts) or "Global only"


_REGISTRY: dict[str, Reranker] = {}


def register_reranker(entry: Reranker) -> None:
    if entry.name in _REGISTRY or entry.name in ("global", "aqe"):
        raise ValueError(f"reranker {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def list_rerankers() -> list[str]:
    return sorted(_REGISTRY)


def get_reranker(name: str) -> Reranker:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reranker {name!r}; known: {', '.join(list_rerankers())}")
    return _REGISTRY[name]


def known_methods() -> list[str]:
    return ["global", "aqe", *list_rerankers(), *(f"aqe+{n}" for n in list_rerankers())]


def parse_method(method: str) -> Method:
    """``global`` | ``aqe`` | ``<scorer>`` | ``aqe+<scorer>``; anything else raises ConfigError naming the known ones."""
    head, _, tail = method.partition("+")
    if method in ("global", "aqe"):
        return Method(method, method == "aqe", None)
    name, expand = (tail, True) if head == "aqe" and tail else (method, False)
    if name not in _REGISTRY:
        raise ConfigError(f"reranker.methods: unknown method {method!r}; known: {', '.join(known_methods())}")
    return Method(method, expand, _REGISTRY[name])


def check_methods(methods: list[str], qualitative_row: str | None = None) -> None:
    """Refuse unknown reranker methods (and a figure row that is not a reranked one of them) at start-up, before
    any extraction or training; the names come from the reranker registry (``rrt_dist.rerank.methods``)."""
    if not methods:
        raise ConfigError("reranker.methods is empty: name at least one row (e.g. [global])")
    parsed = [parse_method(m) for m in methods]
    if qualitative_row and qualitative_row not in [m.name for m in parsed if m.reranker]:
        raise ConfigError(f"reranker.qualitative_row={qualitative_row!r} is not a reranked method of reranker.methods "
                          f"{methods}")


def check_inputs(methods: list[str], provided: dict[str, tuple[str, ...]]) -> None:
    """Refuse a reranked row whose reranker reads what its extractor's tables do not hold (structural on an
    extractor with no patch grid, GV on one with no locals) at start-up, not after extraction. ``provided``: what
    the tables each reranker would read hold, by the key that names their extractor (``backbone``, or
    ``reranker.patch_backbone`` for patch readers when it is set)."""
    for method in map(parse_method, methods):
        if method.reranker is None:
            continue
        wanted = [i for i in method.reranker.inputs if i != "checkpoint"]
        key = "reranker.patch_backbone" if "patches" in wanted and "reranker.patch_backbone" in provided else "backbone"
        missing = [i for i in wanted if i not in provided[key]]
        if missing:
            raise ConfigError(f"reranker.methods: {method.name} reads {', '.join(missing)}, which the tables of "
                              f"{key} do not hold (its extractor provides {', '.join(provided[key])})"
                              + ("; use a grid extractor (dense-grid, vit) or set reranker.patch_backbone"
                                 if "patches" in missing else ""))


register_reranker(Reranker("gv", "GV", "rrt_dist.rerank.scorers:GVScorer", GVConfig, ("locals", "positions")))
register_reranker(Reranker("rrt", "RRT", "rrt_dist.rerank.scorers:RRTScorer", RRTOptions, ("locals", "checkpoint")))
register_reranker(Reranker("structural", "Structural", "rrt_dist.rerank.scorers:StructuralScorer", StructuralConfig,
                           ("patches",)))
register_reranker(Reranker("superglobal", "SuperGlobal", "rrt_dist.rerank.superglobal:SuperGlobalScorer",
                           SuperGlobalOptions, (), depth_option="m"))
