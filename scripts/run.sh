#!/usr/bin/env bash
# The main job: builds the environment if needed, then runs the whole pipeline on the embedded corpus.
# Extra arguments go to `glasslab run` (e.g. --preset smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/glasslab run "$@"
