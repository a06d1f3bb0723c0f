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
# tools: get-modality/get-phase, radiomics (pyradiomics-bhklab: an sdist, so a C compiler
# here), the 3D preview (VTK; it renders without a display through libOSMesa, Debian's libosmesa6)
extras=serve,batch,s3,tools,openvino  # openvino: --backend openvino, the CPU image's faster networks
[[ ${RAYTSEG_TORCH:-cpu} == cuda ]] && constraint=() && extras=serve,batch,s3,tools
python -m pip install --no-cache-dir -q "${constraint[@]}" ".[$extras]" "ray[serve,data]==$RAY_VERSION" \
  highdicom dicomweb-client opencv-python-headless
# DICOM outputs: rt-utils without its opencv-python (which needs libGL; the headless build
# above is the same library), and TotalSegmentator's package for its SNOMED-CT mapping only.
python -m pip install --no-cache-dir -q --no-deps rt-utils TotalSegmentator==2.18.0
python -c "import raytseg.serve.app, raytseg.batch.job, torch, nnunetv2, highdicom, rt_utils.rtstruct, dicomweb_client, xgboost, radiomics, vtkmodules.all"
python -c "from raytseg.pipeline.coding import class_codings; assert class_codings()"
