#!/usr/bin/env bash
# Build raytseg's image without a registry or a package index in the build: the Dockerfile
# as it is, from a Debian bookworm base made here with debootstrap, pip installing from a
# folder of wheels downloaded (or built) here beforehand.
#
#   scripts/build-image.sh [TAG]                     # default ghcr.io/raytseg/raytseg:<version>-cpu
#   RAYTSEG_TORCH=cuda scripts/build-image.sh [TAG]  # the CUDA variant (<version>-cuda)
#
#   RAYTSEG_RUNTIME_VENV  the lock: a venv made with scripts/install-runtime.sh (the same
#                         RAYTSEG_TORCH); its exact packages are downloaded, so the image holds
#                         the versions tested. Default .cache/runtime-venv for cpu (made by
#                         scripts/setup-ci-tools.sh), .cache/runtime-venv-cuda for cuda
#   RAYTSEG_BASE_IMAGE    the base's tag (default raytseg-base:bookworm); made once, then kept
#   DEBIAN_MIRROR         debootstrap's mirror (default http://deb.debian.org/debian)
#
# Downloads run on this machine (its proxy and certificates apply); the build only reaches
# the wheels, served on 127.0.0.1 (the build shares the host's network: no bridge here), and
# Debian's mirror for the Dockerfile's apt step. Prints `image TAG SIZE_BYTES BUILD_SECONDS`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' raytseg/version.py)
variant=${RAYTSEG_TORCH:-cpu}
tag=${1:-ghcr.io/raytseg/raytseg:$version-$variant}
base=${RAYTSEG_BASE_IMAGE:-raytseg-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
default_lock=.cache/runtime-venv
[[ $variant == cpu ]] || default_lock=.cache/runtime-venv-$variant
lock_venv=${RAYTSEG_RUNTIME_VENV:-$default_lock}
LIST_DISTRIBUTIONS='
import importlib.metadata as m
for d in m.distributions():
    if d.metadata["Name"].lower() != "raytseg":
        print(d.metadata["Name"] + "==" + d.version)
'

# What the Dockerfile needs of its base: Python 3.11 as `python` with venv, apt, and CA
# certificates. minbase: no init system, no docs, no compilers.
build_base() {
  docker image inspect "$base" >/dev/null 2>&1 && return
  local root
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror" >/dev/null
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$root"
}

# Every package of the lock venv but raytseg (built from the context), without resolving
# anything anew. One folder per lock: pip, offered nothing else, resolves to the lock's versions.
download_wheels() {
  [[ -x $lock_venv/bin/pip ]] || {
    echo "No $lock_venv: make it with python3 -m venv $lock_venv && PATH=$lock_venv/bin:\$PATH" \
      "RAYTSEG_TORCH=$variant scripts/install-runtime.sh (scripts/setup-ci-tools.sh makes the cpu one)" >&2
    exit 1
  }
  local lock
  # Every installed distribution (pip freeze hides some, argparse among them).
  lock=$("$lock_venv/bin/python" -c "$LIST_DISTRIBUTIONS" | sort)
  wheels=.cache/wheelhouse/$variant-$(sha256sum <<<"$lock" | cut -c1-16)
  [[ -f $wheels/.complete ]] && return
  rm -rf .cache/wheelhouse/"$variant"-* && mkdir -p "$wheels"
  # pip wheel, not download: a package published only as an sdist (pyradiomics-bhklab, which
  # needs a C compiler) is built here, so the build installs wheels only and needs no compiler
  # (BUILD_PACKAGES=""). This machine is the base's Debian and Python, so its wheels fit.
  python3 -m pip wheel -q --no-deps -w "$wheels" -r <(echo "$lock")
  # raytseg's build backend (pyproject.toml's build-system), for pip's isolated build
  python3 -m pip download -q --no-deps -d "$wheels" "setuptools>=69" wheel
  touch "$wheels/.complete"
}

# pip's --find-links over HTTP needs a directory listing: Python's http.server gives one.
serve_wheels() {
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
  wheel_server=$!
  for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$port/" >/dev/null && break
    sleep 0.1
  done
  wheels_url="http://127.0.0.1:$port/"
}

build_base
download_wheels
wheel_server=
trap '[[ -z $wheel_server ]] || kill "$wheel_server" 2>/dev/null' EXIT
serve_wheels
start=$(date +%s)
# The classic builder: BuildKit would fetch the `# syntax` frontend image from a registry.
DOCKER_BUILDKIT=0 docker build -q --network host --build-arg BASE_IMAGE="$base" \
  --build-arg RAYTSEG_TORCH="$variant" --build-arg BUILD_PACKAGES= \
  --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="$wheels_url" -t "$tag" . >/dev/null
seconds=$(($(date +%s) - start))
echo "image $tag $(docker image inspect --format '{{.Size}}' "$tag") $seconds"
