"""Resources are configuration: what each stage's actors ask for comes from ``ray.<stage>``, never from a
snapshot of the cluster (an autoscaled cluster that starts with no GPU node must still be asked for GPUs)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import rrt_dist.config  # noqa: F401
from rrt_dist.schema import PoolResources, StageResources

REPO = Path(__file__).resolve().parent.parent


def ray_config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides)).ray


def test_cluster_preset_asks_for_gpus_whatever_the_cluster_has_now(local_ray):
    assert local_ray.cluster_resources().get("GPU", 0) == 0          # this machine: no GPU, like a fresh cluster
    ray = ray_config("ray=cluster")
    extract, rerank, train = (OmegaConf.to_object(ray[s]) for s in ("extract", "rerank", "train"))
    for stage in (extract, rerank, train):
        assert stage.actor_options()["num_gpus"] == 1 and stage.threads == int(stage.num_cpus)
    assert extract.actor_options() == {"num_cpus": 4, "num_gpus": 1.0}
    strategy = extract.strategy()
    assert (strategy.min_size, strategy.max_size) == (1, 8)          # the pool grows as GPU nodes join


def test_local_defaults_ask_for_no_gpu_on_a_machine_without_one(local_ray):
    from rrt_dist.config import available_cpus

    ray = ray_config()
    for stage in ("extract", "rerank", "train"):
        resources = OmegaConf.to_object(ray[stage])
        assert resources.actor_options() == {"num_cpus": 1.0, "num_gpus": 0.0}
        # the embedded extraction actor (decoding fused into it) threads over the machine's CPUs
        assert resources.threads == (available_cpus() if stage == "extract" else 1)
    search = OmegaConf.to_object(ray.search)
    assert search.actor_options(4) == {"num_cpus": 0.0, "num_gpus": 0.0} and search.threads == 1
    assert (OmegaConf.to_object(ray.extract).strategy().min_size, OmegaConf.to_object(ray.extract).strategy().max_size) == (1, 1)


def test_auto_gpus_need_one_per_actor_and_custom_resources_pass_through(local_ray, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    auto = StageResources(num_cpus=2, resources={"large_memory": 1})
    assert auto.actor_options(2) == {"num_cpus": 2, "num_gpus": 1.0, "resources": {"large_memory": 1}}
    assert auto.actor_options(3)["num_gpus"] == 0.0                  # not one GPU for each of 3 actors
    assert StageResources(num_cpus=2, num_gpus=0).actor_options()["num_gpus"] == 0.0
    assert StageResources(num_cpus=3.5, intra_op_threads=6).threads == 6 and StageResources(num_cpus=3.5).threads == 3
    assert PoolResources(min_actors=3, max_actors=2).strategy().max_size == 3


@pytest.mark.parametrize("override, key", [("ray.extract.num_gpus=-1", "ray.extract.num_gpus"),
                                           ("ray.extract.min_actors=0", "ray.extract.min_actors"),
                                           ("ray.rerank.num_cpus=-2", "ray.rerank.num_cpus")])
def test_bad_resources_are_refused_naming_the_key(override, key):
    from rrt_dist.config import validate_config
    from rrt_dist.schema import ConfigError

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_an_embedded_ray_that_does_not_start_is_retried_then_one_line(monkeypatch):
    """On a loaded machine Ray's node can time out during start-up: retried ray.start_attempts times, then a
    RayStartError (one line for the user, exit 2) that says what to try."""
    import ray

    from rrt_dist.config import RayConfig
    from rrt_dist.runtime import init_ray
    from rrt_dist.schema import RayStartError

    attempts = []

    def failing_init(**kwargs):
        attempts.append(kwargs["include_dashboard"])
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RayStartError, match=r"did not start in 2 attempt\(s\) \(The current node timed out during "
                                            r"startup.*ray.dashboard=false"):
        init_ray(RayConfig(num_cpus=1, start_attempts=2, dashboard=False))
    assert attempts == [False, False]


def test_the_dashboard_starts_only_for_runs_that_train():
    """ray.dashboard=null: the dashboard (and the state API Ray Train's cleaner polls) only when the run trains."""
    from hydra import compose, initialize_config_dir

    from rrt_dist.config import CONFIG_DIR
    from rrt_dist.runtime import job_trains

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        plain, demo = compose("config"), compose("config", overrides=["experiment=demo"])
    assert plain.ray.dashboard is None
    assert [job_trains("evaluate", plain), job_trains("evaluate", demo), job_trains("train_rrt", plain),
            job_trains("train_metric", plain), job_trains("ingest", plain), job_trains("import", plain)] == [
        False, True, True, True, False, False]


def test_the_embedded_rays_processes_name_their_own_cluster(local_ray):
    """Ray's helpers inside workers that look the cluster up (Ray Train's placement-group cleaner) find this one,
    not "multiple active Ray instances", when another Ray runs on the machine."""
    import os

    @local_ray.remote(num_cpus=0)
    def cluster_address():
        return os.environ.get("RAY_ADDRESS")

    host, port = local_ray.get(cluster_address.remote()).rsplit(":", 1)
    assert host == "127.0.0.1" and port == local_ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
