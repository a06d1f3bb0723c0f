#!/usr/bin/env bash
# Build .gpu-carry/ here: what the device machine lacks, for Python 3.12 (its interpreter),
# under the 64 MiB that one device call may carry. Run once, then bench/gpu/device.sh there.
#   - wheels of raytseg's and TotalSegmentator's pure/binary dependencies that the device
#     image does not ship (its torch, numpy, scipy, pandas, scikit-image... are used as they are);
#   - SimpleITK unpacked and re-compressed with xz: its wheel alone is 53 MB, 29 MB as .tar.xz;
#   - TotalSegmentator's example CT (../shared), from which run.py makes the benchmark CT.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu-carry
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
mkdir -p "$CARRY/wheels"
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
# Versions as in this project's .venv / .venv-ref (nnU-Net 2.8.1, TotalSegmentator 2.18.0).
BINARY=(nibabel==5.4.2 pydicom==3.0.2 dicom2nifti==2.6.2 nnunetv2==2.8.1 batchgeneratorsv2==0.3.6
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  totalsegmentator==2.18.0 xmltodict==1.0.4 blosc2==4.15.0 ndindex==1.10.1 graphviz==0.21
  connected-components-3d==4.1.1)
SDIST_ONLY=(acvl_utils==0.2.6 dynamic_network_architectures==0.4.4 batchgenerators==0.25.5 yacs==0.1.8)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$CARRY/wheels" "${BINARY[@]}"
python3 -m pip wheel -q --no-deps -w "$CARRY/wheels" "${SDIST_ONLY[@]}"  # pure Python
if [[ ! -f $CARRY/simpleitk.tar.xz ]]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$tmp" simpleitk==2.5.7
  mkdir "$tmp/site" && (cd "$tmp/site" && python3 -m zipfile -e "$tmp"/simpleitk-*.whl .)
  tar cJf "$CARRY/simpleitk.tar.xz" -C "$tmp/site" .
  rm -rf "$tmp"
fi
cp ../shared/data/totalseg-reference/example_ct.nii.gz "$CARRY/"
du -sh "$CARRY"
