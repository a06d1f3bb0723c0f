# syntax=docker/dockerfile:1
# raytseg's image: the HTTP service (raytseg serve) on its own, or a Ray node of a KubeRay
# RayService/RayJob (KubeRay replaces the command with `ray start`). One Dockerfile, two
# variants, chosen with the README's own switch:
#
#   docker build -t raytseg:0.1.0-cpu .                                   # CPU build of torch
#   docker build --build-arg RAYTSEG_TORCH=cuda -t raytseg:0.1.0-cuda .  # CUDA build of torch
#
# The CUDA variant needs no CUDA base image: PyPI's torch wheels bring the CUDA libraries,
# the node brings the driver. Weights are never part of the image: replicas fetch what they
# serve at start from RAYTSEG_WEIGHTS (s3://..., or a mounted folder).
# Its steps are the README's commands (scripts/install-runtime.sh), which CI runs too;
# tests/unit/deploy/test_dockerfile.py keeps them equal.
#
# Without a registry or an index (CI, air-gapped builds): scripts/build-image.sh makes a Debian
# bookworm base with debootstrap (BASE_IMAGE) and serves pip a folder of wheels.

ARG PYTHON_VERSION=3.11
# Any Debian bookworm with Python 3.11 as `python` and its venv module.
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm
FROM ${BASE_IMAGE}

ARG RAYTSEG_TORCH=cpu
# The CPU variant takes torch from PyTorch's CPU wheel index (PyPI's Linux wheels are CUDA builds).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Builds without an index (scripts/build-image.sh): PIP_NO_INDEX=1 and PIP_FIND_LINKS, the URL
# of a wheel folder. Unset by default: pip reads only what is set.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS

# wget: KubeRay's probes and the health check; bash: KubeRay's container command;
# libosmesa6: VTK's off-screen rendering of the 3D preview (no display in a pod).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget bash ca-certificates libosmesa6 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# The user KubeRay's docs assume (uid 1000, like rayproject/ray's `ray`), group users (100).
RUN useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray

ENV VIRTUAL_ENV=/opt/raytseg/venv \
    PATH=/opt/raytseg/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"

WORKDIR /opt/raytseg/src
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY scripts/install-runtime.sh ./scripts/install-runtime.sh
COPY raytseg ./raytseg
# A C compiler for this step only: pip builds the sdists among the packages (pyradiomics-bhklab,
# for --radiomics) here, and the step removes the compiler again, so the image has none.
# scripts/build-image.sh brings every package as a wheel, built on its machine, and passes
# BUILD_PACKAGES="" (nothing to compile).
ARG BUILD_PACKAGES="gcc libc6-dev python3-dev"
RUN if [ "$RAYTSEG_TORCH" = cpu ]; then export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX"; fi \
    && if [ -n "$BUILD_PACKAGES" ]; then apt-get update && apt-get install -y --no-install-recommends $BUILD_PACKAGES; fi \
    && scripts/install-runtime.sh \
    && if [ -n "$BUILD_PACKAGES" ]; then apt-get purge -y --auto-remove $BUILD_PACKAGES; fi \
    && rm -rf build /var/lib/apt/lists/* /var/cache/apt/*.bin

USER 1000:100
WORKDIR /home/ray
ENV HOME=/home/ray \
    RAYTSEG_CACHE_DIR=/home/ray/.cache/raytseg \
    TOTALSEG_HOME_DIR=/home/ray/.totalsegmentator

# 8000: the HTTP API; 8080: the Ray metrics agent (KubeRay's `metrics` port).
EXPOSE 8000 8080
# For `docker run`; Kubernetes ignores it (KubeRay probes Ray and Serve itself).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD wget -q -T 5 -O /dev/null http://127.0.0.1:8000/healthz || exit 1
CMD ["raytseg", "serve", "--host", "0.0.0.0"]
