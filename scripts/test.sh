#!/usr/bin/env bash
# Set up (if needed) and run the linters and the whole test suite on the CPU. TOKRED_VENV and
# TOKRED_CONSTRAINTS choose the virtualenv and the tested version set, as for scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium for the demo's browser test: Debian's package where apt-get works (as root), else that test skips.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
        echo "warning: could not install chromium; the demo's browser test will be skipped" >&2
fi
. "${TOKRED_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKRED_CACHE="${TOKRED_CACHE:-$PWD/.cache}"
ruff check tokred tests benchmarks
ruff format --check tokred tests benchmarks
python -m pytest -q
