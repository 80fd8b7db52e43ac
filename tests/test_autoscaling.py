"""Autoscaling, tested on Ray's fake multi-node provider: a head with no GPU, a worker type with a logical
GPU from 0 workers. The ingest job (a folder into a new gallery) asks for one GPU per extraction actor
(``ray.extract``), so the autoscaler must add GPU nodes; it finishes with every row in the table and the index,
and the idle nodes are removed afterwards.

Ray's ``AutoscalingCluster`` helper is not used: the Ray 2.60 wheel lacks the ``example.yaml`` it reads,
and its start / shutdown run ``ray stop --force``, which would stop every Ray on the machine (the test
session's embedded one included). This test starts its own head in its own process group, on its own
ports and temp dir, and stops exactly the processes of that temp dir.
"""
import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from test_jobs import BIN, free_port, stop_head

FAKE_GPU_NODE = "ray.worker.gpu"


def autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "rrt-dist-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,                      # idle nodes go after 6 s
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
            FAKE_GPU_NODE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 2**20},
                            "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def nodes(dashboard: str) -> list[dict]:
    """Every node the cluster has had (alive or dead), from its state API over HTTP (no driver is started)."""
    from ray.util.state import list_nodes

    return [{"alive": n.state == "ALIVE", "gpu": n.resources_total.get("GPU", 0)}
            for n in list_nodes(address=dashboard, limit=100, timeout=30, raise_on_missing_output=False)]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_gpu_nodes_are_added_for_the_ingest_job_and_removed_when_idle(small_synthetic, tmp_path):
    gcs_port, dash_port = free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    temp_dir = Path("/tmp") / f"ray-as-{secrets.token_hex(4)}"      # short: unix socket paths are limited
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(address)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_DISABLE_USAGE_STATS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    agent_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "runtime-env-agent-port", "metrics-export-port",
                                                          "ray-client-server-port")]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
         f"--temp-dir={temp_dir}", f"--autoscaling-config={config}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while True:                                                  # the head takes a few seconds
            try:
                assert nodes(dashboard)
                break
            except Exception:                                        # not serving yet
                assert time.time() < deadline, "the fake cluster's head did not come up"
                time.sleep(2)
        assert [n for n in nodes(dashboard) if n["gpu"]] == []      # no GPU node at start
        _, root = small_synthetic
        images = sorted((root / "jpg" / "test").rglob("*.jpg"))
        command = [str(BIN / "rrt-dist"), "ingest", f"gallery.images={root / 'jpg' / 'test'}",
                   f"gallery.root={tmp_path / 'g'}", "gallery.name=autoscaled", "backbone=tiny_image",
                   f"ray.address={address}", "ray.extract.num_cpus=1", "ray.extract.num_gpus=1",
                   "ray.extract.max_actors=2", f"hydra.run.dir={tmp_path / 'out'}"]
        with open(tmp_path / "job.out", "w") as out, open(tmp_path / "job.err", "w") as err:
            running = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, cwd=tmp_path)
            most_gpu_nodes, deadline = 0, time.time() + 420
            while running.poll() is None:          # GPU nodes seen while the job runs (idle ones leave in 6 s)
                assert time.time() < deadline, "the ingest job did not finish"
                most_gpu_nodes = max(most_gpu_nodes, sum(n["alive"] for n in nodes(dashboard) if n["gpu"]))
                time.sleep(1)
        job = subprocess.CompletedProcess(command, running.returncode, (tmp_path / "job.out").read_text(),
                                          (tmp_path / "job.err").read_text())
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        # the job's summary line (Ray may print autoscaler events to the driver's output after it)
        summary = json.loads([line for line in job.stdout.splitlines() if line.startswith('{"gallery"')][-1])
        assert (summary["new"], summary["failed"], summary["rows"]) == (len(images), 0, len(images))
        assert summary["index_version"] == 1 and summary["index_action"] == "build"
        # added because the pool asked for GPUs: seen alive while it ran, or in the autoscaler's events that
        # reach the job's driver
        added = sum(int(n) for n in re.findall(rf"Adding (\d+) node\(s\) of type {re.escape(FAKE_GPU_NODE)}",
                                                 job.stdout + job.stderr))
        assert 1 <= max(most_gpu_nodes, added) and most_gpu_nodes <= 2, (most_gpu_nodes, (job.stdout + job.stderr)[-3000:])
        deadline = time.time() + 180
        while any(n["alive"] for n in nodes(dashboard) if n["gpu"]):
            assert time.time() < deadline, "idle GPU nodes were not removed"
            time.sleep(3)
    finally:
        stop_head(head, temp_dir)            # with the worker nodes the autoscaler started, outside the head's group
