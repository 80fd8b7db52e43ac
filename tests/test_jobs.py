"""Jobs end to end: embedded Ray through the console script, and a real cluster via job submission."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def stop_processes_of(temp_dir: Path) -> None:
    """SIGKILL every process whose command line names ``temp_dir`` (that cluster's GCS, raylets, agents, workers)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop a `ray start --head --block` started in its own process group, and every process of its temp dir (this
    cluster only: `ray stop` would stop every Ray on the machine), then remove the temp dir. Killed, not terminated:
    a graceful stop waits about 30 s for a shutdown that a finished test does not need."""
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    stop_processes_of(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The README's main command is the demo experiment (RRT trained first); here with the small preset's data
# and a 2-epoch training run so that it takes a minute.
SMALL_TRAINED = ["reranker=trained", "train.epochs=2", "train.top_locals=16", "train.min_positives=2",
                 "train.batch_size=4", "train.val_depth=10"]


def test_main_command_on_small_preset(small_preset, tmp_path):
    """`rrt-dist evaluate` (the README's main command) on the small preset, embedded Ray, shipped weights:
    trains RRT on the training split with 2 Ray Train workers, then reports every row of the paper's tables.
    The one test of the command line itself (and of a run that starts its own Ray); the others run jobs in
    process."""
    out = tmp_path / "out"
    common = [*small_preset, *SMALL_TRAINED, f"train.storage_path={tmp_path / 'runs'}"]
    proc = subprocess.run([str(BIN / "rrt-dist"), "evaluate", *common, f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a non-interactive run's log: one progress bar per stage, no Ray Data tables, no fork warnings
    assert "Running Dataset" not in proc.stderr and "fork-safe" not in proc.stderr
    assert "Failed to query Ray Train Controller" not in proc.stderr     # the training run has its dashboard
    assert "| Global only |" in proc.stdout and "| GV (top-100) |" in proc.stdout and "| αQE |" in proc.stdout
    assert "| RRT (top-100) |" in proc.stdout and "| αQE + RRT (top-100) |" in proc.stdout
    assert "## RRT training" in (out / "report.md").read_text() and (out / "training_curve.png").exists()
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    medium = results["Global only"]["synthetic"]["medium"]["mAP"]
    hard = results["Global only"]["synthetic"]["hard"]["mAP"]
    with_d = results["Global only"]["synthetic+100"]["medium"]["mAP"]
    # the benchmark leaves room for reranking, distractors make it harder, and local features help
    assert hard < medium < 0.8 and 0.0 < medium and with_d <= medium
    assert results["GV (top-100)"]["synthetic"]["medium"]["mAP"] > medium
    assert (out / "qualitative.png").stat().st_size > 10_000                 # before/after figure
    assert report["config"]["dataset"]["n_landmarks"] == 12 and report["config"]["backbone"]["name"] == "multiscale-cnn"
    tables = report["feature_tables"]
    assert tables["query"]["rows"] == 12 and tables["gallery"]["rows"] == 72 and tables["distractor"]["rows"] == 100
    training = report["training"]
    assert [h["epoch"] for h in training["history"]] == [1, 2] and Path(training["checkpoint"]).exists()
    # A rerun finds this run's tables and training run by names computed from the config alone (content digests,
    # the same in every process): computed here, in another process, they are the ones the command used. (That
    # a rerun then extracts nothing and starts no trainer: test_reliability's rerun summary, test_train's rerun.)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rrt_dist.config import CONFIG_DIR
    from rrt_dist.features import config_fingerprint
    from rrt_dist.pipelines.train import run_name

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=common)
    assert Path(training["run"]).name == run_name(cfg)
    assert report["run"]["backbone"]["fingerprint"] == config_fingerprint(
        cfg.backbone.name, **OmegaConf.to_container(cfg.backbone.options, resolve=True))


@pytest.mark.ray
def test_job_submission_to_local_head(small_dataset, tmp_path):
    """The cluster path: `ray start --head` on loopback, submit jobs/evaluate.py with a working_dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    gcs_port, dash_port = free_port(), free_port()
    # Every service port explicit: the session's embedded Ray already holds Ray's default ports.
    agent_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "runtime-env-agent-port", "metrics-export-port",
                                                          "ray-client-server-port")]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = loopback
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"ray-test-{secrets.token_hex(4)}"  # short path: unix socket names are limited
    start = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", *agent_ports]
    # --block in its own process group: stopping it stops this head only (`ray stop` would stop every
    # Ray on the machine, the test session's embedded one included).
    head_log = tmp_path / "ray-head.log"
    head = subprocess.Popen(start, env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        storage = tmp_path / "storage"
        # ray=cluster asks for a GPU per extraction actor; this head has none and no autoscaler to add one.
        # Outputs: nothing but the storage root says where (the job runs in Ray's temporary copy of REPO).
        entrypoint = (f"{sys.executable} jobs/evaluate.py {' '.join(small_dataset)} ray=cluster backbone=tiny_image "
                      f"reranker=none ray.extract.num_gpus=0 ray.extract.num_cpus=1 storage_root={storage}")
        runtime_env = {"working_dir": str(REPO), "excludes": [".venv/", ".git/", "data/", "outputs/", "tests/fixtures/"]}
        # The head and its job agent take seconds to come up, minutes on a fresh venv (first imports compile
        # every module) of a loaded 2-core machine; a head that died says why.
        deadline = time.time() + 300
        while True:
            assert head.poll() is None, f"ray start --head exited: {head_log.read_text()[-3000:]}"
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash_port}",
                                             headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
                job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
                break
            except (RuntimeError, ConnectionError) as err:
                if time.time() > deadline:
                    raise AssertionError(f"no job server after 300 s: {head_log.read_text()[-3000:]}") from err
                time.sleep(2)
        deadline = time.time() + 480
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, "job did not finish in time"
            time.sleep(1)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "joining Ray cluster" in logs and "| Global only |" in logs
        [report_path] = (storage / "outputs" / "evaluate").glob("*/report.json")
        assert f"outputs copied to {report_path.parent}" in logs
        report = json.loads(report_path.read_text())
        assert report["config"]["ray"]["address"] == "auto" and report["config"]["features_dir"] == f"{storage}/features"
        assert list((storage / "features").glob("synthetic/*/*/gallery.lance"))
    finally:
        stop_head(head, temp_dir)


def test_index_and_search_jobs(run_job, small_dataset, tmp_path, capsys):
    """`rrt-dist index` then `rrt-dist search` (2 shards): the neighbours table equals exact search."""
    import numpy as np
    import pyarrow.parquet as pq

    from rrt_dist.index.core import read_manifest, search_numpy_exact
    from rrt_dist.store import FeatureStore

    common = [*small_dataset, "backbone=tiny_image", f"features_dir={tmp_path / 'features'}",
              f"index.dir={tmp_path / 'indexes'}", "index.n_shards=2"]
    built = run_job("index", common, tmp_path / "o1")
    assert built["ntotal"] == 172 and "172 vectors" in capsys.readouterr().out      # 72 gallery + 100 distractors
    out = tmp_path / "o2"
    searched = run_job("search", [*common, "index.neighbours=20"], out)
    assert searched["queries"] == 12 and searched["neighbours"] == str(out / "neighbours.parquet")
    table = pq.read_table(out / "neighbours.parquet")
    assert table.num_rows == 12
    tables = [p for p in (tmp_path / "features").rglob("*.lance") if (p / "_versions").is_dir()]
    stores = {p.stem: FeatureStore(p) for p in tables if not p.stem.endswith("errors")}
    q_ids, q = stores["query"].globals()
    g_ids, g = map(np.concatenate, zip(stores["gallery"].globals(), stores["distractor"].globals()))
    exact_scores, exact_ids = search_numpy_exact(g, g_ids, q, 20)
    rows = {r["query_id"]: r for r in table.to_pylist()}
    for qid, e_ids, e_scores in zip(q_ids, exact_ids, exact_scores):
        np.testing.assert_allclose(rows[qid]["scores"], e_scores, atol=1e-5)
        assert np.mean(np.asarray(rows[qid]["neighbour_ids"]) == e_ids) > 0.9   # equal up to exact ties
    index_dir = next((tmp_path / "indexes").rglob("manifest.json")).parent
    assert len(read_manifest(str(index_dir)).shards) == 2
    # the evaluation through the sharded indexes (one per setting) in index.mode=sharded
    run_job("evaluate", [*common, "index.mode=sharded", "index.neighbours=20", "reranker=none"], tmp_path / "o3")
    manifests = sorted(p.parent.name for p in (tmp_path / "indexes").rglob("manifest.json"))
    assert manifests == ["Flat-2s", "Flat-2s-d"]
    report = json.loads((tmp_path / "o3" / "report.json").read_text())
    assert set(report["results"]["Global only"]) == {"synthetic", "synthetic+100"}
