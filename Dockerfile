# The image the cluster manifests run (cluster/kuberay-*.yaml): CUDA runtime, Python 3.11, the pinned
# environment of constraints.txt with GPU FAISS, rrt-dist installed at /opt/rrt-dist (the jobs' working dir).
#   docker build -t ghcr.io/your-org/rrt-dist:0.1.0 . && docker push ghcr.io/your-org/rrt-dist:0.1.0
# (replace ghcr.io/your-org with your registry, here and in cluster/kuberay-*.yaml)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RAY_DISABLE_USAGE_STATS=1 HF_HUB_OFFLINE=0
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common curl ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/rrt-dist
# Dependencies first (a layer that survives code changes), then the project itself.
COPY constraints.txt pyproject.toml README.md ./
RUN mkdir rrt_dist && touch rrt_dist/__init__.py \
 && pip install -c constraints.txt -e ".[gpu]" \
 && rm -rf rrt_dist
COPY rrt_dist ./rrt_dist
COPY configs ./configs
COPY jobs ./jobs
RUN pip install --no-deps -e . && rrt-dist --help >/dev/null

# KubeRay starts Ray itself (ray start ...); the pod user needs no root.
RUN useradd --create-home --uid 1000 ray && chown -R ray /opt/rrt-dist
USER ray
