#!/usr/bin/env bash
# Builds a local Debian bookworm image with python3 + venv, a stand-in for python:3.11-slim-bookworm on
# machines that reach a Debian mirror but no container registry: debootstrap, then `docker import`.
#
#   scripts/make_debian_base.sh [TAG]      (default TAG: phoenix-base:bookworm; root, debootstrap, docker)
#
# The root filesystem tarball is cached in PHOENIX_BASE_CACHE (default /var/tmp/phoenix-base), so only the
# first run pays for debootstrap (~2-4 min); the import alone takes seconds.
set -euo pipefail

tag=${1:-phoenix-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${PHOENIX_BASE_CACHE:-/var/tmp/phoenix-base}
tarball=$cache/bookworm-python3.tar

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists"
    exit 0
fi

if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    # python3-venv brings ensurepip's wheels, which the Dockerfiles' `python3 -m venv` needs; ca-certificates
    # matches python:slim, whose HTTPS clients (the sidecar's Hub uploads) rely on it.
    nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
    tar -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
fi

# An imported image has no config: give it what the official images set, since the Dockerfiles extend PATH.
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    "$tarball" "$tag"
