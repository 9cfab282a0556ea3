#!/usr/bin/env bash
# Install what building and running the Bento container needs without a Docker daemon:
# buildah (build), podman (run, save), runc (crun fails here: "cgroups in hybrid mode not
# supported"), debootstrap (the local base image; there is no registry to pull one from).
# Idempotent: when every tool is present it only prints versions and exits (~0.1 s).
set -euo pipefail

need=()
for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
# fuse-overlayfs/slirp4netns are not needed: storage uses the vfs/overlay driver as root and
# containers run with --network host or none; uidmap gives rootless users subordinate ids.
if ((${#need[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "setup-container-tools: missing ${need[*]}; run this script as root (apt-get)" >&2
        exit 1
    fi
    echo "setup-container-tools: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends buildah podman runc debootstrap \
        uidmap ca-certificates >/dev/null
fi
echo "setup-container-tools: $(buildah --version | head -1); $(podman --version); $(runc --version | head -1)"
