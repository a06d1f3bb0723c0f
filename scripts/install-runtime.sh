#!/usr/bin/env bash
# Install raytseg to run it, without test tools, into the Python first on PATH (an active
# venv): the container image's install step, also run by CI (scripts/setup-ci-tools.sh).
#
#   scripts/install-runtime.sh                      # CPU build of torch (constraints/cpu.txt)
#   RAYTSEG_TORCH=cuda scripts/install-runtime.sh   # GPU: pip picks a CUDA build of torch
#
# Ray is pinned: every node of a cluster must run the same Ray, and the Helm chart's
# rayVersion (helm/raytseg/values.yaml) names this version (a test keeps them equal).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_VERSION=2.60.0
constraint=(-c constraints/cpu.txt)
[[ ${RAYTSEG_TORCH:-cpu} == cuda ]] && constraint=()
python -m pip install --no-cache-dir -q "${constraint[@]}" ".[serve,batch,s3]" "ray[serve,data]==$RAY_VERSION"
python -c "import raytseg.serve.app, raytseg.batch.job, torch, nnunetv2"
