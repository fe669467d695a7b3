#!/usr/bin/env bash
# The GPU check (issue 15): every path only a GPU can show, in at most 8 minutes.
#   bash bench/gpu_check.sh           on a machine with an NVIDIA GPU
#   bash bench/gpu_check.sh --cpu     the CPU rows, as CI runs them
#   bash bench/gpu_check.sh --list    what each row needs, runs and checks
# The logic is bench/gpu_check.py; this only finds the repository and its Python.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
exec "$python" bench/gpu_check.py "$@"
