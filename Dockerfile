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

# No NVIDIA_VISIBLE_DEVICES here: the device plugin sets it in each pod that asks for a GPU; set in the image, it
# would show every GPU of its node to a pod that asked for none.
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_DISABLE_USAGE_STATS=1 NVIDIA_DRIVER_CAPABILITIES=compute,utility
# wget: KubeRay's probes exec `bash -c "wget ... | grep success"` (the readiness probe of a RayService's worker pods,
# every probe before Ray 2.53): without it a pod never becomes Ready, or is restarted.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --upgrade "pip>=24"
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/rrt-dist
# Dependencies first (a layer that survives code and documentation changes), then the project itself.
COPY constraints.txt pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"]))' > /tmp/requirements.txt \
 && pip install --quiet -c constraints.txt -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY rrt_dist ./rrt_dist
COPY configs ./configs
COPY jobs ./jobs
# Installed as a package (not editable), by root: the runtime user runs it and cannot change it. The checkout
# copy stays for `python jobs/<job>.py` entry points (a RayJob's working_dir), read-only as well.
RUN pip install --quiet --no-deps . && rm -rf build *.egg-info && rrt-dist --help >/dev/null

# KubeRay starts Ray itself (ray start ...); the pod user needs no root (the manifests run it as uid 1000 with
# runAsNonRoot and every capability dropped). Jobs write under the storage root and Ray's temp folder, never here.
RUN useradd --create-home --uid 1000 --gid 0 ray
USER 1000
