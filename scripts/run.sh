#!/usr/bin/env bash
# Set up (if needed) and run the main job offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKRED_CACHE="${TOKRED_CACHE:-$PWD/.cache}"
tokred eval "$@"
