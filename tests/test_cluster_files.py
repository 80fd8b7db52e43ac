"""The cluster manifests parse and launch jobs that exist, with overrides the configs accept."""
import shlex
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

import rrt_dist.config  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def test_kuberay_rayjob_entrypoint_composes():
    spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    args = shlex.split(spec["spec"]["entrypoint"])
    assert args[0] == "python" and (REPO / args[1]).is_file()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args[2:])
    assert cfg.ray.address == "auto" and cfg.dataset.distractors.name == "r1m"


def test_cluster_launcher_config_parses():
    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("constraints.txt" in c for c in cfg["setup_commands"])
