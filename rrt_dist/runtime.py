"""The one place that starts or joins Ray, and the wrapper every job's ``main`` runs in.

``ray.address: null`` starts an embedded Ray sized to this machine (unless the process was
launched by ``ray job submit``, which sets ``RAY_ADDRESS``: then it joins that cluster);
``auto`` joins the local cluster; ``ray://host:port`` connects a Ray client.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
import threading
from typing import Optional

from rrt_dist.config import available_cpus, validate_config
from rrt_dist.devices import error_line
from rrt_dist.schema import USER_ERRORS, RayStartError, first_line

log = logging.getLogger(__name__)


def init_ray(cfg) -> dict:
    """Start or join Ray per ``cfg`` (a RayConfig); returns the cluster's resources."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(namespace=cfg.namespace, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
    else:
        num_cpus = cfg.num_cpus or available_cpus()
        # An embedded Ray serves this process alone: node address and dashboard on loopback (Ray 2.60's gRPC
        # servers still listen on every interface, behind its token authentication).
        for attempt in range(1, cfg.start_attempts + 1):
            log.info("starting embedded Ray with %d CPUs%s", num_cpus,
                     f" (attempt {attempt} of {cfg.start_attempts})" if attempt > 1 else "")
            try:
                with own_gcs_port() as gcs_address:
                    # Its processes name their own cluster: Ray's helpers that look a cluster up (Ray Train's
                    # placement-group cleaner) otherwise fail with "multiple active Ray instances" beside another.
                    ray.init(num_cpus=num_cpus, num_gpus=cfg.num_gpus, object_store_memory=cfg.object_store_memory,
                             include_dashboard=bool(cfg.dashboard), dashboard_host="127.0.0.1",
                             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"RAY_ADDRESS": gcs_address}},
                             **common)
                break
            except Exception as err:           # Ray raises plain Exceptions for a node that did not come up
                ray.shutdown()
                if attempt == cfg.start_attempts:
                    reason = first_line(err)
                    raise RayStartError(
                        f"the embedded Ray did not start in {cfg.start_attempts} attempt(s) ({reason}); on a loaded "
                        f"machine retry later, raise ray.start_attempts, set ray.dashboard=false, or start Ray once "
                        f"(`ray start --head`) and pass ray.address=auto") from None
                log.warning("the embedded Ray did not start (%s); retrying", str(err).strip().splitlines()[0:1])
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:       # not while a stop is under way
        handle_sigterm()
    _quiet_ray_data()
    resources = ray.cluster_resources()
    log.info("Ray resources: %s", {k: v for k, v in resources.items() if not k.startswith("node:")})
    return resources


@contextlib.contextmanager
def own_gcs_port():
    """A free loopback port for the GCS of the Ray about to start (Ray reads RAY_GCS_SERVER_PORT at start-up);
    yields its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def _quiet_ray_data() -> None:
    """Each stage shows one progress bar of its own; Ray Data's, in a non-interactive run (a submitted job, CI, a log
    file), is a multi-line table every 10 s per dataset, which buries the results."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)     # "Progress bars disabled" notice


TRAINING_JOBS = ("train_rrt", "train_metric")


def job_trains(job_name: str, cfg) -> bool:
    """Whether a run trains: a training job, or an evaluation whose reranker is trained first."""
    return job_name in TRAINING_JOBS or (job_name == "evaluate" and cfg.reranker.get("checkpoint") == "train")


# Ray's job supervisor sets this in the environment of a driver started by ``ray job submit``, whose working
# directory is Ray's temporary copy of the submitted one (gone with the cluster).
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def outputs_destination(cfg, job_name: str) -> Optional[str]:
    """Where a run's output folder is copied when it ends: ``<outputs_root>/<job>/<run folder>``.
    ``outputs_root: null`` means ``<storage_root>/outputs`` for a submitted job and no copy otherwise."""
    from rrt_dist.features.images import join_location

    root = cfg.get("outputs_root")
    if root is None and SUBMITTED_JOB_ENV in os.environ:
        root = join_location(cfg.storage_root, "outputs")
    if root is None:
        return None
    return join_location(root, job_name, os.path.basename(os.path.normpath(cfg.output_dir)))


def publish_outputs(output_dir: str, destination: str) -> None:
    """Copy (or overwrite) ``output_dir``'s files under ``destination``, a local or shared path or an fsspec URI."""
    import fsspec

    from rrt_dist.features.images import is_uri

    if not is_uri(destination) and os.path.realpath(output_dir) == os.path.realpath(destination):
        return
    fs, path = fsspec.core.url_to_fs(destination)
    fs.makedirs(path, exist_ok=True)
    fs.put(f"{os.path.normpath(output_dir)}/", path, recursive=True)


def run_publishing_outputs(main, cfg, destination: Optional[str]):
    """``main(cfg)``, its output folder then copied to ``destination`` (None: no copy) however it ends. When the
    job failed, a copy that fails too is reported on stderr and the job's own error raised, not the copy's."""
    def copy() -> None:
        publish_outputs(cfg.output_dir, destination)
        print(f"rrt-dist: outputs copied to {destination}", file=sys.stderr)

    try:
        result = main(cfg)
    except BaseException:
        if destination:
            try:
                copy()
            except Exception as err:
                print(f"rrt-dist: outputs not copied to {destination}: {err!r}", file=sys.stderr)
        raise
    if destination:
        copy()
    return result


def _announce_storage(cfg, destination: Optional[str]) -> None:
    from rrt_dist.features.images import is_uri

    root = str(cfg.storage_root)
    shown = root if is_uri(root) else os.path.abspath(root)
    log.info("storage: %s (tables, indexes, galleries, training runs); outputs: %s%s", shown, cfg.output_dir,
             f" -> {destination}" if destination else "")
    if SUBMITTED_JOB_ENV in os.environ and not (is_uri(root) or os.path.isabs(root)):
        log.warning("storage_root=%s is relative to this submitted job's working directory, Ray's temporary copy "
                    "(%s): everything stored there is lost with the cluster; set storage_root to a shared path "
                    "or a URI", root, os.getcwd())


def job(main):
    """Decorator of a job's ``main(cfg)`` (under ``hydra.main``): the config is validated before anything
    starts (no Ray, no data touched), and the job ends as :func:`stopping_in_one_line` says. Once the job has
    started, its output folder is copied where ``outputs_destination`` says, however it ends."""
    @functools.wraps(main)
    def run(cfg):
        from hydra.core.hydra_config import HydraConfig

        with stopping_in_one_line():
            validate_config(cfg)
            name = HydraConfig.get().job.name
            if cfg.ray.dashboard is None:
                cfg.ray.dashboard = job_trains(name, cfg)
            destination = outputs_destination(cfg, name)
            _announce_storage(cfg, destination)
            return run_publishing_outputs(main, cfg, destination)

    return run


@contextlib.contextmanager
def stopping_in_one_line():
    """How a job ends other than by finishing: a known user error in one line on stderr and exit status 2;
    Ctrl-C (SIGINT) or SIGTERM (what Kubernetes sends a pod it evicts, SIGKILL 30 s later) stops it where it is (no
    more work taken, nothing half-done committed: every commit is atomic), says what is kept and that the same
    command resumes, and exits 130 or 143 (128 + the signal)."""
    handle_sigterm()
    try:
        yield
    except USER_ERRORS as err:
        print(f"rrt-dist: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:                # a user error raised in an actor's constructor or a Ray Data worker
        line = error_line(err, USER_ERRORS)
        if line is None:
            raise
        print(f"rrt-dist: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:
        # Ray may catch the Terminated raised in a blocking get and raise a KeyboardInterrupt of its own: the
        # signal that arrived is the one the handler recorded
        number = err.signum if isinstance(err, Terminated) else _received.get("signum", signal.SIGINT)
        print(f"rrt-dist: interrupted ({signal.Signals(number).name}): {KEPT}", file=sys.stderr)
        raise SystemExit(128 + number) from None


KEPT = ("every committed table version, index version and training checkpoint is kept (what was not committed is "
        "cleaned up next time); rerun the same command to resume")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: every stop path is Ctrl-C's."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: dict = {}        # the stopping signal once its handler ran


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # one stop: a second SIGTERM while stopping changes nothing
    _received["signum"] = signum
    raise Terminated(signum)


def handle_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread. Called by :func:`stopping_in_one_line`,
    and by :func:`init_ray` once Ray is up: Ray's driver takes SIGTERM over (its core worker's native failure handler
    prints "*** SIGTERM received" stack dumps and aborts, exit 134; its Python handler exits 1). Ray's handlers of
    crashes (SIGSEGV, SIGABRT, ...) stay."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def entry_point(run):
    """A job module's ``main``: Hydra composes the config from the packaged config groups (``rrt_dist.configs``),
    then :func:`job` validates it and runs ``run(cfg)``. Overrides that do not compose (a misspelt key, an unknown
    preset) end with one line and exit status 2 instead of Hydra's multi-line report. Tests call ``run`` itself
    with a composed config, in process on their own Ray."""
    import hydra

    from rrt_dist.config import CONFIG_DIR

    hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(job(run))

    @functools.wraps(hydra_main)
    def main():
        args = sys.argv[1:]
        if not any(a.startswith("-") for a in args):       # --cfg, --help, --multirun: Hydra's own
            problem = composition_error(args)
            if problem:
                print(f"rrt-dist: error: {problem}", file=sys.stderr)
                raise SystemExit(2)
        hydra_main()

    return main


def composition_error(overrides: list[str]) -> str | None:
    """Why ``overrides`` do not compose into a config, in one line naming the key and the closest valid keys (or
    the preset and the available ones); None when they compose."""
    import difflib
    import re

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rrt_dist.config import CONFIG_DIR

    def composed(selected: list[str]):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=selected, return_hydra_config=True)

    try:
        composed(overrides)
        return None
    except (HydraException, OmegaConfBaseException) as err:
        text = f"{err} {err.__cause__ or ''}"
    preset = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if preset:
        group, name = preset.groups()
        available = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        close = difflib.get_close_matches(name, available, n=3)
        return (f"{group}={name}: no such {group} preset; " + (f"closest: {', '.join(close)}; " if close else "")
                + f"available: {', '.join(available)}")
    key = re.search(r"full_key: ([\w.]+)", text) or re.search(r"Could not override '([\w.]+)'", text)
    if not key:
        return text.strip().splitlines()[0]
    parent, _, leaf = key.group(1).rpartition(".")
    groups = [o for o in overrides if "=" in o and (CONFIG_DIR / o.split("=", 1)[0].lstrip("+~")).is_dir()]
    try:
        base = composed(groups)
        node = OmegaConf.select(base, parent) if parent else base
        schema = OmegaConf.get_type(node)
        gone = {f.name for f in dataclasses.fields(schema) if "renamed" in f.metadata} \
            if dataclasses.is_dataclass(schema) else set()
        known = [str(k) for k in node.keys() if str(k) not in gone and str(k) != "hydra"]
    except (HydraException, OmegaConfBaseException, AttributeError):
        known = []
    if leaf in known:                                 # the key exists: its value is what does not fit
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key.group(1)), "?")
        reason = re.search(r"(Value .*? could not be converted to \w+)", text)
        return f"{key.group(1)}={value}: " + (reason.group(1) if reason else text.strip().splitlines()[0])
    close = difflib.get_close_matches(leaf, known, n=3, cutoff=0.5)
    where = parent or "the config"
    return (f"{key.group(1)}: not an option of {where}"
            + (f"; closest: {', '.join(f'{parent}.{c}' if parent else c for c in close)}" if close else
               f"; its options: {', '.join(known)}" if known else ""))
