#!/usr/bin/env bash
# Run the main job end to end on the bundled example CT:
#   raytseg segment -i examples/data/example_ct_sm.nii.gz -o example-output --fast --statistics
# Uses the official TotalSegmentator weights when they are installed (TOTALSEG_WEIGHTS_PATH,
# TOTALSEG_HOME_DIR or ~/.totalsegmentator, or RAYTSEG_WEIGHTS). Without them (for example
# on a machine with no internet) it synthesizes random-weight models first: the pipeline
# then runs for real, but the masks are meaningless and raytseg says so.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
RAYTSEG=.venv/bin/raytseg
OUT=${1:-example-output}
# Exit status 1 (and no traceback) when the models of `total --fast` are not installed.
if ! .venv/bin/python - <<'PY'
import sys
from raytseg.config import Settings
from raytseg.errors import RaytsegError
from raytseg.tasks import get_task
from raytseg.weights.store import WeightsStore
try:
    store = WeightsStore(Settings.from_env())
    for spec in get_task("total").modes["fast"].models:
        store.model_folder(spec)
except RaytsegError:
    sys.exit(1)
PY
then
  export RAYTSEG_WEIGHTS=${RAYTSEG_WEIGHTS:-$PWD/.cache/synthetic-weights}
  echo "No official TotalSegmentator weights found: using random-weight models in" \
    "$RAYTSEG_WEIGHTS (the pipeline runs for real, the masks mean nothing)." >&2
  "$RAYTSEG" weights synth -t total --fast -o "$RAYTSEG_WEIGHTS" >/dev/null
fi
"$RAYTSEG" segment -i examples/data/example_ct_sm.nii.gz -o "$OUT" --fast --statistics -d cpu
echo "Masks and statistics.json are in $OUT/" >&2
