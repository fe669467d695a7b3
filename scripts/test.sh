#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Chromium for the browser tests, the Python packages with the CPU torch wheel),
# then runs pytest. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not browser"`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium for the browser tests..."
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -d .venv ] || python3 -m venv .venv
    . .venv/bin/activate
fi
# torch==2.13.0 first in the same resolve keeps pip on the local CPU wheel (no CUDA downloads).
# The gguf extra builds llama-cpp-python from source (about 6 minutes on 2 cores, once).
pip install -q torch==2.13.0 -e ".[dev,gguf,tensorboard]"

export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
exec python -m pytest -q "$@"
