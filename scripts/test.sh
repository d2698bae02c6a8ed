#!/usr/bin/env bash
# The project's test command, the same for developers and CI:
#   1. scripts/setup-python.sh  the pinned Python reference (gguf, numpy)
#   2. scripts/fetch-models.sh  the SmolLM2 and Gemma 3 GGUF files
#   3. scripts/setup-nvrtc.sh   NVRTC and the CUDA headers, for the kernel tests
#   4. cargo test --workspace --locked [extra arguments]
#   5. without extra arguments (the whole suite, as CI runs it), also:
#      scripts/validate-deploy.sh (Kubernetes manifests, Dockerfile) and
#      scripts/fleet-test.py (three replicas behind LiteLLM's proxy), both from
#      the pinned venv target/fleetenv (scripts/requirements-fleet.txt).
#      WORKER_ORCD_SKIP_FLEET=1 leaves the fleet test out.
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
# The whole suite: no arguments, or only --no-run (whose set-up is then done).
whole=0
if [[ $# -eq 0 || "$*" == "--no-run" ]]; then
    whole=1
fi
fleetenv="${WORKER_ORCD_FLEETENV:-$repo/target/fleetenv}"
export WORKER_ORCD_FLEETENV="$fleetenv"
if [[ $whole == 1 ]]; then
    phase setup-fleet scripts/setup-python.sh "$repo/scripts/requirements-fleet.txt" "$fleetenv"
fi

phase "cargo test" cargo test --workspace --locked "$@"

if [[ $# -eq 0 ]]; then
    phase validate-deploy scripts/validate-deploy.sh
    if [[ "${WORKER_ORCD_SKIP_FLEET:-0}" != 1 ]]; then
        phase fleet-test "$fleetenv/bin/python" scripts/fleet-test.py \
            --binary "$repo/target/debug/worker-orcd" \
            --model "$WORKER_ORCD_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" \
            --json "$repo/target/fleet-test.json"
    fi
fi
