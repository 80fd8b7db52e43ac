import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at test time: hub lookups fail fast


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole session (starting Ray costs seconds on 2 cores)."""
    import ray

    from rrt_dist.config import RayConfig
    from rrt_dist.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """A small synthetic benchmark, generated once (in-process) for the session."""
    from rrt_dist.datasets.generate import generate_synthetic
    from rrt_dist.datasets.synthetic import SyntheticSpec

    spec = SyntheticSpec(seed=3, n_landmarks=12, n_val_landmarks=4, n_train_landmarks=6, views_per_landmark=6,
                         train_views_per_landmark=3, n_distractors=40)
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(spec, root)
    return spec, root
