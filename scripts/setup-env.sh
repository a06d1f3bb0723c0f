#!/usr/bin/env bash
# Create or update .venv with raytseg and its test tools.
# CPU machines get the CPU build of torch (constraints/cpu.txt); set RAYTSEG_TORCH=cuda
# on GPU machines to let pip choose torch freely.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV="$PWD/.venv"
stamp_input=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)-${RAYTSEG_TORCH:-cpu}
if [[ -f $VENV/.raytseg-stamp && $(cat $VENV/.raytseg-stamp) == "$stamp_input" ]]; then
  exit 0
fi
[[ -d $VENV ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
constraint=(-c constraints/cpu.txt)
[[ ${RAYTSEG_TORCH:-cpu} == cuda ]] && constraint=()
"$VENV/bin/python" -m pip install -q "${constraint[@]}" -e ".[dev,serve,batch,dicom,tools,openvino]" 2>&1 | grep -v "is ignored" || true
# The DICOM outputs read TotalSegmentator's SNOMED-CT mapping from its installed package.
"$VENV/bin/python" -m pip install -q --no-deps TotalSegmentator==2.18.0 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import raytseg, torch, nnunetv2" >/dev/null
echo "$stamp_input" > $VENV/.raytseg-stamp
