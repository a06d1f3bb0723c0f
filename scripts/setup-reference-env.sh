#!/usr/bin/env bash
# Create .venv-ref: the TotalSegmentator 2.18 package, the reference implementation the
# parity tests compare raytseg against. It needs torchvision (TotalSegmentator's trainer
# lookup imports timm), which cannot load beside the CPU torch build, so it gets its own
# environment with torch 2.14.1 + torchvision 0.29.1. Nothing here is used by raytseg.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV="$PWD/.venv-ref"
stamp=ts-2.18.0-torch-2.14.1-v4
if [[ -f $VENV/.stamp && $(cat $VENV/.stamp) == "$stamp" ]]; then
  exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "is ignored" || true; }
pip install -q --upgrade pip
pip install -q torch==2.14.1 torchvision==0.29.1
# TotalSegmentator's own requirements minus the 3D-preview stack (fury/vtk/xvfb), which the
# compared code paths never import.
pip install -q --no-deps totalsegmentator==2.18.0 nnunetv2==2.8.1
pip install -q "acvl-utils>=0.2.6,<0.3" "dynamic-network-architectures>=0.4.4,<0.5" \
  "batchgenerators>=0.25.1" batchgeneratorsv2 "timm<1.0.23" numpy scipy scikit-image SimpleITK \
  nibabel pandas blosc2 tqdm threadpoolctl requests dicom2nifti pyarrow xmltodict einops \
  matplotlib seaborn scikit-learn tifffile imagecodecs yacs graphviz \
  highdicom rt_utils \
  xgboost-cpu pyradiomics-bhklab==3.1.4  # -ot dicom_seg / dicom_rtstruct; get_modality/phase; -r
(cd / && "$VENV/bin/python" -c "import totalsegmentator.nnunet, totalsegmentator.python_api")
echo "$stamp" > "$VENV/.stamp"
