"""The reranker registry: every way the report can rerank a global top-K, in the spirit of timm's
``register_model``. An entry names its scorer, the options schema it takes (``reranker.<name>``), its report
label, the descriptors it reads and how its score combines with the global one.

A report row (``reranker.methods``) is ``global``, ``aqe`` (αQE), a scorer name (``gv``, ``rrt``,
``structural``) or ``aqe+<scorer>`` (the scorer reranks the αQE ranking's top-K). :func:`parse_method`
reads one once, at start-up; an unknown name fails there with the list of known ones. A new reranker is
one file with its scorer plus one :func:`register_reranker` call below.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Reranker:
    name: str
    label: str                        # report row label
    # scorer(**options)(query, candidates) -> scores [K], higher is better; the final order is by score +
    # scorer.global_weight × global cosine (absent or 0: the global score only breaks ties)
    scorer: Callable
    options: type | None = None       # dataclass of its options: the schema of reranker.<name> (None: none)
    inputs: tuple[str, ...] = ("locals",)   # locals | positions | patches | checkpoint

    def create(self, **options):
        return self.scorer(**options)


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
    from rrt_dist.config import ConfigError

    head, _, tail = method.partition("+")
    if method in ("global", "aqe"):
        return Method(method, method == "aqe", None)
    name, expand = (tail, True) if head == "aqe" and tail else (method, False)
    if name not in _REGISTRY:
        raise ConfigError(f"reranker.methods: unknown method {method!r}; known: {', '.join(known_methods())}")
    return Method(method, expand, _REGISTRY[name])


def _register_defaults() -> None:
    from .gv import GVConfig
    from .scorers import GVScorer, RRTOptions, RRTScorer, StructuralScorer
    from .structural import StructuralConfig

    register_reranker(Reranker("gv", "GV", GVScorer, GVConfig, ("locals", "positions")))
    register_reranker(Reranker("rrt", "RRT", RRTScorer, RRTOptions, ("locals", "checkpoint")))
    register_reranker(Reranker("structural", "Structural", StructuralScorer, StructuralConfig, ("patches",)))


_register_defaults()
