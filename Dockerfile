# The image the cluster manifests run (cluster/kuberay-*.yaml): Debian 12's Python 3.11, the pinned environment
# of constraints.txt with GPU FAISS, rrt-dist installed at /opt/rrt-dist (the jobs' working dir).
#
# One CUDA stack: PyPI's torch and faiss-gpu-cuvs wheels carry the CUDA 13 libraries they were built with
# (constraints.txt says which, tests/test_cuda_stack.py checks), so the base is plain Debian, not a CUDA image:
# a CUDA base would add a second stack (and gigabytes) that nothing loads. The node needs only the NVIDIA
# driver, version 580 or newer (CUDA 13), which the NVIDIA container toolkit / device plugin mounts in.
#   docker build -t ghcr.io/your-org/rrt-dist:0.1.0 . && docker push ghcr.io/your-org/rrt-dist:0.1.0
# (replace ghcr.io/your-org with your registry, here and in cluster/kuberay-*.yaml). Without Docker Hub:
# cluster/build-image.sh builds the same image on a Debian root file system made with debootstrap.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_DISABLE_USAGE_STATS=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --upgrade "pip>=24"
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/rrt-dist
# Dependencies first (a layer that survives code changes), then the project itself.
COPY constraints.txt pyproject.toml README.md ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"]))' > /tmp/requirements.txt \
 && pip install --quiet -c constraints.txt -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY rrt_dist ./rrt_dist
COPY configs ./configs
COPY jobs ./jobs
RUN pip install --quiet --no-deps -e . && rrt-dist --help >/dev/null

# KubeRay starts Ray itself (ray start ...); the pod user needs no root. Group 0 owns what the jobs write
# beside the code, so a pod run with another uid (OpenShift) or the fsGroup of the manifests can write.
RUN useradd --create-home --uid 1000 --gid 0 ray && chown -R 1000:0 /opt/rrt-dist && chmod -R g+w /opt/rrt-dist
USER 1000
