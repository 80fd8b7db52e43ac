import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at test time: hub lookups fail fast
# Ray Train's controller polls its workers every 2 s: a finished or failed epoch waits for the next poll. The
# tests run a dozen short trainings; polling at 0.2 s lets each end when it ends (a missed poll is harmless).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray keeps as many idle worker processes as CPUs and ends the others after 1 s, so nearly every task and actor
# of the next stage starts a fresh Python that imports torch again. The suite runs hundreds of short stages:
# idle workers (their imports done) are kept for the next ones. Measured on the metric-training kill test:
# 73 s -> 55 s.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")


def pytest_collection_modifyitems(items):
    """``ray`` marks every test that runs on the session's Ray (through ``local_ray``, directly or by another
    fixture); tests that start a Ray of their own (a head, a cluster, a job's subprocess) carry the mark themselves."""
    for item in items:
        if "local_ray" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole session (starting Ray costs seconds on 2 cores)."""
    import ray

    from rrt_dist.config import RayConfig
    from rrt_dist.runtime import init_ray

    init_ray(RayConfig(num_cpus=2, dashboard=True))      # the session's Ray also serves the training tests
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """A small synthetic benchmark, generated once (in-process) for the session."""
    from rrt_dist.datasets.generate import generate_synthetic
    from rrt_dist.datasets.options import SyntheticSpec

    spec = SyntheticSpec(seed=3, n_landmarks=12, n_val_landmarks=4, n_train_landmarks=6, views_per_landmark=6,
                         train_views_per_landmark=3, n_distractors=40)
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(spec, root)
    return spec, root


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> list[str]:
    """The small synthetic preset rendered into one folder for the whole test run (by the first test that uses it):
    the overrides that select it."""
    return ["experiment=synthetic_small", f"dataset.root={tmp_path_factory.mktemp('small-preset') / 'syn'}"]


@pytest.fixture(scope="session")
def small_preset(small_dataset, tmp_path_factory) -> list[str]:
    """``small_dataset`` with a one-scale Lite0 pyramid, 16 locals an image and one features folder for the whole
    test run: the first test extracts; table folders are content digests, so the next ones find the tables
    committed (a test that checks extraction itself uses a folder of its own)."""
    return [*small_dataset, "backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]",
            "backbone.options.max_local=16", f"features_dir={tmp_path_factory.mktemp('small-features')}"]


@pytest.fixture(scope="session")
def run_job(local_ray):
    """``run_job(job, overrides, output_dir)``: the job's ``run`` in this process, on the session's Ray, with its
    config composed and validated as ``rrt-dist <job>`` would (tests that are not about the command line)."""
    from importlib import import_module

    from hydra import compose, initialize_config_dir

    from rrt_dist.config import CONFIG_DIR, validate_config

    def run(job: str, overrides: list[str], output_dir):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"output_dir={output_dir}"])
        validate_config(cfg)
        return import_module(f"rrt_dist.jobs.{job}").run(cfg)

    return run


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (Debian's, with its driver) through selenium, logging the page's console; its profile
    goes with the test's folder. Skipped where either is missing (.ci/run installs both)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list:
    """The page's JavaScript errors (and failed loads) logged since the last call."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
