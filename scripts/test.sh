#!/usr/bin/env bash
# Set up (if needed) and run the linters and the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKRED_CACHE="${TOKRED_CACHE:-$PWD/.cache}"
ruff check tokred tests benchmarks
ruff format --check tokred tests benchmarks
python -m pytest -q
