"""The cluster files are valid for what reads them (KubeRay's CRD schemas, rejecting unknown keys; Ray's
cluster-launcher schema), autoscale from zero GPU nodes, fit what ``ray=cluster`` asks for, and launch jobs
that exist with overrides the configs accept."""
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from hydra import compose, initialize_config_dir

import rrt_dist.config  # noqa: F401
from rrt_dist.runtime import SUBMITTED_JOB_ENV, outputs_destination

REPO = Path(__file__).resolve().parent.parent
# The KubeRay CRDs live beside the repository (../shared/kuberay-crds), not in it
CRDS = Path(os.environ.get("RRT_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
MANIFESTS = sorted((REPO / "cluster").glob("kuberay-*.yaml"))
needs_crds = pytest.mark.skipif(not (CRDS / "ray.io_rayclusters.yaml").is_file(),
                                reason=f"KubeRay CRDs not found at {CRDS} (set RRT_KUBERAY_CRDS)")


def closed(schema: dict) -> dict:
    """An OpenAPI v3 schema of a CRD as JSON Schema that refuses keys it does not define (as the API
    server's pruning would drop them silently) and reads Kubernetes' int-or-string."""
    schema = dict(schema)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {k: closed(v) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    return schema


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return closed(version["schema"]["openAPIV3Schema"])


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def test_there_is_a_long_lived_cluster_and_a_job():
    assert {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS} == {"RayCluster", "RayJob"}


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_its_crd(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))
    misspelt = json.loads(json.dumps(manifest))
    cluster_spec(misspelt)["enableInTreeAutoscalling"] = True      # the check really refuses unknown keys
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        jsonschema.validate(misspelt, crd_schema(manifest["kind"]))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_cluster_autoscales_from_zero_gpus_with_auth_and_fits_the_cluster_preset(path):
    spec = cluster_spec(yaml.safe_load(path.read_text()))
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    gpu_group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu_group["minReplicas"] == 0 and gpu_group.get("replicas", 0) == 0 and gpu_group["maxReplicas"] >= 1
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        ray_cfg = compose(config_name="config", overrides=["ray=cluster"]).ray
    for stage in ("extract", "rerank", "train"):                       # each GPU actor fits one GPU pod
        assert ray_cfg[stage].num_gpus <= int(limits["nvidia.com/gpu"])
        assert ray_cfg[stage].num_cpus <= int(limits["cpu"])
    cpu_limits = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                  for g in spec["workerGroupSpecs"]]
    assert ray_cfg.search.num_cpus <= max(cpu_limits)
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    built = re.search(r"docker build -t (\S+)", (REPO / "Dockerfile").read_text()).group(1)
    assert images == {built}                                           # the image the Dockerfile builds


def test_kuberay_rayjob_entrypoint_composes_and_writes_to_the_shared_volume(monkeypatch):
    spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    args = shlex.split(spec["spec"]["entrypoint"])
    assert args[0] == "python" and (REPO / args[1]).is_file()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args[2:], return_hydra_config=True)
    assert cfg.ray.address == "auto" and cfg.dataset.distractors.name == "r1m"
    mounts = {m["mountPath"] for m in spec["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
              ["containers"][0]["volumeMounts"]}
    # what a submitted job's driver sees: its report is copied under the storage root when it ends
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    cfg.output_dir = "/tmp/ray/session_1/runtime_resources/working_dir_files/x/outputs/evaluate/2026-11-24_03-00-00"
    outputs = outputs_destination(cfg, "evaluate")
    assert outputs == f"{cfg.storage_root}/outputs/evaluate/2026-11-24_03-00-00"
    for where in (cfg.features_dir, cfg.index.dir, cfg.train.storage_path, cfg.train.selfsup.root, cfg.gallery.root,
                  outputs):
        assert any(str(where).startswith(m + "/") for m in mounts), where


def test_cluster_launcher_config_validates_against_rays_schema():
    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert any("constraints.txt" in c for c in cfg["setup_commands"])
