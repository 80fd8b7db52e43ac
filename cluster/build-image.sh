#!/usr/bin/env bash
# Build the cluster image (Dockerfile) where Docker Hub is unreachable but Debian's archive and PyPI are: the
# base is a minimal Debian 12 root file system made with debootstrap and imported as localhost/debian:bookworm-slim
# (the same Debian release as the Dockerfile's default base), then the Dockerfile's steps run on it with podman.
#
#   sudo cluster/build-image.sh [TAG]          (default TAG: localhost/rrt-dist:dev)
#   sudo podman run --rm localhost/rrt-dist:dev rrt-dist --help
#
# Needs root, debootstrap and podman (Debian: apt-get install debootstrap podman). MIRROR overrides the archive;
# RUN steps use chroot isolation (no cgroups needed: crun refuses hybrid cgroup hosts such as some CI VMs).
set -euo pipefail
tag=${1:-localhost/rrt-dist:dev}
mirror=${MIRROR:-http://deb.debian.org/debian}
base=localhost/debian:bookworm-slim
here=$(cd "$(dirname "$0")/.." && pwd)
storage=(${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"})   # e.g. STORAGE_DRIVER=vfs where overlay is missing

if ! podman ${storage[@]+"${storage[@]}"} image exists "$base"; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman ${storage[@]+"${storage[@]}"} import --change 'CMD ["/bin/bash"]' - "$base"
fi
# The host's CA bundle is lent to the RUN steps (not stored in the image): pip then trusts what the host trusts,
# e.g. a proxy's CA in front of PyPI. CA_BUNDLE= (empty) turns it off.
ca=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
mounts=(${ca:+--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro"})
podman ${storage[@]+"${storage[@]}"} build ${mounts[@]+"${mounts[@]}"} --isolation "${ISOLATION:-chroot}" --network host --build-arg BASE="$base" -t "$tag" -f "$here/Dockerfile" "$here"
podman ${storage[@]+"${storage[@]}"} image ls "$tag"
