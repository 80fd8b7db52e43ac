"""The cluster files are valid for what reads them (KubeRay's CRD schemas, rejecting unknown keys; Ray's
cluster-launcher schema), autoscale from zero GPU nodes, fit what ``ray=cluster`` asks for, and launch jobs
that exist with overrides the configs accept."""
import functools
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


@functools.lru_cache
def crd_validator(kind: str):
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.validators.validator_for(schema)(schema)


def cluster_spec(manifest: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[manifest["kind"]](manifest["spec"])


def test_there_is_a_long_lived_cluster_a_job_and_a_service():
    assert {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS} == {"RayCluster", "RayJob", "RayService"}


def test_kuberay_rayservice_serves_the_app_the_package_builds():
    """The RayService's Serve config imports the project's application builder, with overrides that compose and
    validate as `rrt-dist serve`'s, asking GPUs for the extractor and reranker, behind a token from a Secret."""
    import importlib

    from rrt_dist.config import validate_config
    from rrt_dist.runtime import composition_error

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay-rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    overrides = app["args"]["overrides"]
    assert composition_error(overrides) is None
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate_config(cfg)
    assert cfg.serve.extractor.num_gpus == 1 and cfg.serve.host == "0.0.0.0" and cfg.storage_root == "/data/rrt-dist"
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    token = next(e for e in head["env"] if e["name"] == cfg.serve.token_env)
    assert "secretKeyRef" in token["valueFrom"] and serve_config["http_options"]["port"] == 8000


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_its_crd(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    crd_validator(manifest["kind"]).validate(manifest)
    misspelt = json.loads(json.dumps(manifest))
    cluster_spec(misspelt)["enableInTreeAutoscalling"] = True      # the check really refuses unknown keys
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        crd_validator(manifest["kind"]).validate(misspelt)


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
    assert images == {built_image()}                                   # the image the Dockerfile builds


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
    assert cfg["docker"]["image"] == built_image()                     # Python 3.11 and the pinned environment
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    assert not any(local in (".", "./") for local in cfg.get("file_mounts", {}).values())   # no checkout, no .venv
    assert any("/data" in c and "mount" in c for c in cfg["initialization_commands"])       # shared storage
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if c.startswith("export") or "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]


# What the pods' machine types give a pod: vCPUs and GiB less what the kubelet, system and daemonsets reserve
# (EKS: ~0.1 vCPU + ~0.3 for daemonsets; memory 255 MiB + 11 MiB per pod + eviction 100 MiB, about 2.5 GiB with
# the CNI and device plugin on an 8-vCPU node: 3 GiB kept, 0.5 vCPU).
MACHINES = {"g5.2xlarge": (8, 32, 1), "g5.4xlarge": (16, 64, 1), "m6i.2xlarge": (8, 32, 0), "m6i.4xlarge": (16, 64, 0)}


def quantity(value, unit: str = "") -> float:
    value = str(value)
    factors = {"m": 1e-3, "Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    for suffix, factor in factors.items():
        if value.endswith(suffix):
            return float(value[:-len(suffix)]) * factor
    return float(value)


def pod_templates(manifest: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(manifest)
    return [("head", spec["headGroupSpec"]["template"])] + [(g["groupName"], g["template"])
                                                             for g in spec["workerGroupSpecs"]]


def every_pod_template(manifest: dict) -> list[tuple[str, dict]]:
    """The Ray pods' templates, and the RayJob's submitter pod KubeRay creates from ``submitterPodTemplate``."""
    submitter = manifest["spec"].get("submitterPodTemplate")
    return pod_templates(manifest) + ([("submitter", submitter)] if submitter else [])


# Volume types the restricted Pod Security Standard allows (kubernetes.io/docs/concepts/security/pod-security-standards)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_passes_the_restricted_pod_security_standard(path):
    """A namespace enforcing `pod-security.kubernetes.io/enforce: restricted` admits each pod, field by field: no
    privilege escalation, every capability dropped, non-root, the runtime's default seccomp profile, no host
    namespaces or host paths; KubeRay's autoscaler container in the head pod as well."""
    manifest = yaml.safe_load(path.read_text())
    templates = every_pod_template(manifest)
    assert manifest["kind"] != "RayJob" or any(group == "submitter" for group, _ in templates)
    for group, template in templates:
        spec = template["spec"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 1000) != 0, group
        assert pod.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), group
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), group
        assert all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in spec.get("volumes", [])), group
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False and not context.get("privileged"), group
            assert "ALL" in context.get("capabilities", {}).get("drop", []), group
            assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, group
            assert context.get("runAsNonRoot") is not False and context.get("runAsUser", 1000) != 0, group
            assert context.get("seccompProfile", {}).get("type") != "Unconfined", group
    autoscaler = cluster_spec(manifest)["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_an_evicted_ray_pod_has_time_to_drain_and_stop_before_its_sigkill(path):
    """Kubernetes evicts with SIGTERM, then SIGKILL after the grace period (30 s unless set): a Ray node drains for
    up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s unless set), then stops its processes and a job its driver
    (one line, exit 143), so every Ray pod's grace period exceeds the drain it runs with."""
    for group, template in pod_templates(yaml.safe_load(path.read_text())):
        spec = template["spec"]
        drains = [float(e["value"]) for c in spec["containers"] for e in c.get("env", [])
                  if e["name"] == "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]
        drain = max(drains, default=30.0)
        assert spec.get("terminationGracePeriodSeconds", 30) >= drain + 10, group


def test_the_service_spreads_uploads_over_every_nodes_proxy():
    manifest = yaml.safe_load((REPO / "cluster" / "kuberay-rayservice.yaml").read_text())
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"])["proxy_location"] == "EveryNode"


def built_image() -> str:
    return re.search(r"docker build -t (\S+)", (REPO / "Dockerfile").read_text()).group(1)


def test_core_kubernetes_objects_validate_against_their_schemas():
    """The shared volume claim, and each Ray pod template as a core PodTemplate, against Kubernetes' own schemas
    (kubernetes-validate, strict: unknown keys refused)."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    claim = yaml.safe_load((REPO / "cluster" / "storage.yaml").read_text())
    kubernetes_validate.validate(claim, version, strict=True)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"]
    for path in MANIFESTS:
        for group, template in every_pod_template(yaml.safe_load(path.read_text())):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                                          "template": template}, version, strict=True)
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
              "template": {"spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(broken, version, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_fit_their_machines_share_the_volume_and_can_write_it(path):
    claim = yaml.safe_load((REPO / "cluster" / "storage.yaml").read_text())["metadata"]["name"]
    manifest = yaml.safe_load(path.read_text())
    assert manifest["spec"].get("authOptions", cluster_spec(manifest)["authOptions"])["secretName"]
    for group, template in pod_templates(manifest):
        spec = template["spec"]
        machine = spec["nodeSelector"]["node.kubernetes.io/instance-type"]
        cpus, gib, gpus = MACHINES[machine]
        requests = spec["containers"][0]["resources"]["requests"]
        assert quantity(requests["cpu"]) <= cpus - 0.5 and quantity(requests["memory"]) <= gib - 3, (group, machine)
        assert int(requests.get("nvidia.com/gpu", 0)) <= gpus
        if gpus:
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), group
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == claim
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) <= quantity(requests["memory"]) / 2
        assert spec["securityContext"]["fsGroup"] and spec["securityContext"]["runAsUser"] == 1000
