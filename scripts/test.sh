#!/usr/bin/env bash
# The whole test suite on a fresh machine: sets up both environments, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
scripts/setup-reference-env.sh
scripts/setup-ci-tools.sh  # helm and prometheus (tests/*/deploy), the image's install step
export RAYTSEG_REQUIRE_DEPLOY_TOOLS=${RAYTSEG_REQUIRE_DEPLOY_TOOLS:-1}
export RAYTSEG_REQUIRE_REFERENCE=${RAYTSEG_REQUIRE_REFERENCE:-1}
.venv/bin/ruff check raytseg tests tools bench
.venv/bin/ruff format --check raytseg tests tools bench
.venv/bin/mypy
# A crash of the test process (a native library) prints its Python stack.
export PYTHONFAULTHANDLER=1
exec .venv/bin/pytest -q --durations=25 "$@"
