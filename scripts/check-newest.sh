#!/usr/bin/env bash
# Would tokred work on the newest transformers, lmms-eval and gradio? A scratch virtualenv (TOKRED_VENV, default
# .venv-newest) gets the torch pair and tokred, then the newest releases of those three past pyproject's caps;
# the suite runs there and this prints which versions differ from constraints.txt and which tests broke.
# All pass: raise the caps in pyproject.toml and regenerate constraints.txt from this venv (see README).
set -uo pipefail
cd "$(dirname "$0")/.."
venv="${TOKRED_VENV:-.venv-newest}"
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[dev,eval,demo]"
python -m pip install -q --upgrade transformers lmms-eval gradio 2>&1 | grep -v "^WARNING: Location" || true
echo "== versions that differ from constraints.txt (tested -> newest)"
python -m pip freeze 2>/dev/null | grep -v -i -E "tokred|^#|^-e" >"$venv/freeze.txt"
moved=$(join <(grep -v '^#' constraints.txt | sed 's/==/ /' | sort) <(sed 's/==/ /' "$venv/freeze.txt" | sort) |
    awk '$2 != $3 {print "  " $1 ": " $2 " -> " $3}')
echo "${moved:-  none: the newest releases are the tested ones}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKRED_CACHE="${TOKRED_CACHE:-$PWD/.cache}"
echo "== test suite on the newest releases"
python -m pytest -q -p no:cacheprovider -rfE 2>&1 | tee "$venv/pytest.log" | grep -E "^(FAILED|ERROR)|passed|failed" 
status=${PIPESTATUS[0]}
if [ "$status" -eq 0 ] && [ -z "$moved" ]; then
    echo "== all passed; nothing newer than constraints.txt, so the caps stand"
elif [ "$status" -eq 0 ]; then
    echo "== all passed: raise the caps in pyproject.toml and refresh constraints.txt from $venv/freeze.txt"
else
    echo "== broken on the newest releases (full log: $venv/pytest.log)"
fi
exit "$status"
