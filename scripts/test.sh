#!/usr/bin/env bash
# The whole test suite on a fresh machine: sets up both environments, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
# The reference env and the CI tools (helm, prometheus, the image's install step, ...) do
# not need .venv, so they are set up in the background, all three at once (minutes saved on
# a fresh machine); their logs are printed once they are done.
scripts/setup-reference-env.sh >.cache/setup-reference.log 2>&1 &
reference_pid=$!
scripts/setup-ci-tools.sh >.cache/setup-ci-tools.log 2>&1 &
tools_pid=$!
setup_ok=1
scripts/setup-env.sh || setup_ok=0
lint_ok=1
if [[ $setup_ok == 1 ]]; then
  .venv/bin/ruff check raytseg tests tools bench || lint_ok=0
  .venv/bin/ruff format --check raytseg tests tools bench || lint_ok=0
  .venv/bin/mypy || lint_ok=0
fi
for job in "reference:$reference_pid" "ci-tools:$tools_pid"; do
  if ! wait "${job#*:}"; then
    echo "setup-${job%%:*} failed:" >&2
    setup_ok=0
  fi
  cat ".cache/setup-${job%%:*}.log"
done
[[ $setup_ok == 1 && $lint_ok == 1 ]] || exit 1
export RAYTSEG_REQUIRE_DEPLOY_TOOLS=${RAYTSEG_REQUIRE_DEPLOY_TOOLS:-1}
export RAYTSEG_REQUIRE_REFERENCE=${RAYTSEG_REQUIRE_REFERENCE:-1}
# A crash of the test process (a native library) prints its Python stack.
export PYTHONFAULTHANDLER=1
exec .venv/bin/pytest -q --durations=25 "$@"
