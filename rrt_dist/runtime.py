"""The one place that starts or joins Ray.

``ray.address: null`` starts an embedded Ray sized to this machine (unless the process was
launched by ``ray job submit``, which sets ``RAY_ADDRESS``: then it joins that cluster);
``auto`` joins the local cluster; ``ray://host:port`` connects a Ray client.
"""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity / container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_ray(cfg) -> dict:
    """Start or join Ray per ``cfg`` (a RayConfig); returns the cluster's resources."""
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(namespace=cfg.namespace, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
    else:
        num_cpus = cfg.num_cpus or available_cpus()
        log.info("starting embedded Ray with %d CPUs", num_cpus)
        # Loopback only: an embedded Ray serves this process alone.
        ray.init(num_cpus=num_cpus, num_gpus=cfg.num_gpus, object_store_memory=cfg.object_store_memory,
                 include_dashboard=False, _node_ip_address="127.0.0.1", **common)
    resources = ray.cluster_resources()
    log.info("Ray resources: %s", {k: v for k, v in resources.items() if not k.startswith("node:")})
    return resources
