#!/usr/bin/env bash
# On the device machine (from the repository root, .gpu-carry carried):
#   bash bench/gpu/device.sh [run.py arguments]
# Installs the carried packages into /tmp/site, then runs the benchmark into $OUT.
set -euo pipefail
SITE=/tmp/site
if [[ ! -f $SITE/.installed ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    .gpu-carry/wheels/*.whl
  tar xJf .gpu-carry/simpleitk.tar.xz -C "$SITE"
  touch "$SITE/.installed"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out/gpu}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
python3 -c "import raytseg.pipeline.run, nnunetv2.inference.predict_from_raw_data, totalsegmentator.nnunet, SimpleITK; print('imports ok')"
python3 bench/gpu/run.py --out "$OUT" --ct-source .gpu-carry/example_ct.nii.gz "$@" 2>&1 | tee "$OUT/log.txt"
