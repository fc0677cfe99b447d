#!/usr/bin/env bash
# The default test run (fast; slow and integration tests are deselected, see setup.cfg).
#   bash scripts/test.sh                    # default
#   bash scripts/test.sh -m integration     # the checks on the packaged model and data
#   bash scripts/test.sh -m slow            # long checks
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec python -m pytest -q "$@"
