"""The benchmarks' metrics at their public path (DESIGN.md: ``rrt_dist.eval.metrics.revisitop`` and the others stay
stable). They are defined in :mod:`rrt_dist.metrics`, a layer below both the benchmark readers and the evaluation,
so that ``datasets`` does not import ``eval``."""
from rrt_dist.metrics import *  # noqa: F401,F403  (the public names: rrt_dist.metrics.__all__)
from rrt_dist.metrics import __all__  # noqa: F401
