#!/usr/bin/env bash
# Create .venv with the pinned torch pair (installed from local disk where available) and tokred.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[dev,eval,demo]"
