#!/usr/bin/env bash
# The project's test command, the same for developers and CI:
#   1. scripts/setup-python.sh  the pinned Python reference (gguf, numpy)
#   2. scripts/fetch-models.sh  the SmolLM2 and Gemma 3 GGUF files
#   3. scripts/setup-nvrtc.sh   NVRTC and the CUDA headers, for the kernel tests
#   4. cargo test --workspace --locked [extra arguments]
# The set-up steps are quick no-ops once done. The tests find their inputs
# through WORKER_ORCD_PYTHON (the venv's python), WORKER_ORCD_PYENV and
# WORKER_ORCD_MODELS, exported here as absolute paths (defaults: target/pyenv
# and ~/.cache/worker-orcd/models).
#
#   scripts/test.sh                  everything
#   scripts/test.sh -p quant         one crate
#   scripts/test.sh --no-run         build the tests only
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

export WORKER_ORCD_PYENV="${WORKER_ORCD_PYENV:-$repo/target/pyenv}"
export WORKER_ORCD_PYTHON="${WORKER_ORCD_PYTHON:-$WORKER_ORCD_PYENV/bin/python}"
export WORKER_ORCD_MODELS="${WORKER_ORCD_MODELS:-$HOME/.cache/worker-orcd/models}"

# Runs "$@" and says how long it took.
phase() {
    local name="$1" start
    shift
    start="$(date +%s)"
    "$@"
    echo "test.sh: $name took $(($(date +%s) - start)) s"
}

phase setup-python scripts/setup-python.sh
phase fetch-models scripts/fetch-models.sh
phase setup-nvrtc scripts/setup-nvrtc.sh
phase fetch-vocab-tests scripts/fetch-vocab-tests.sh
phase "cargo test" cargo test --workspace --locked "$@"
