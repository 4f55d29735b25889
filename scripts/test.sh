#!/usr/bin/env bash
# The test suite: builds the environment if needed, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest "$@"
