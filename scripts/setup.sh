#!/usr/bin/env bash
# Create a virtualenv holding exactly the tested versions: the torch pair first (from local disk where
# available), then tokred with its extras. TOKRED_VENV (default .venv) says where; TOKRED_CONSTRAINTS
# (default constraints.txt, the newest tested transformers; constraints-lowest.txt, the oldest) says which set.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TOKRED_VENV:-.venv}"
constraints="${TOKRED_CONSTRAINTS:-constraints.txt}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c "$constraints" torch==2.14.1 torchvision==0.29.1
python -m pip install -q -c "$constraints" -e ".[dev,eval,demo]"
python -c "import sys, torch, transformers; print(f\"{sys.prefix}: torch {torch.__version__}, transformers {transformers.__version__}\")"
