#!/usr/bin/env bash
# Property-based test of the HTTP API against its own OpenAPI description:
# schemathesis (PyPI, pinned below, in its own venv) generates valid and
# invalid requests for every route from /openapi.json and checks every
# response (no 5xx, documented status codes and content types, bodies and
# SSE events that match their schemas, invalid input refused, valid input
# accepted).
#
# It serves a synthetic tiny-llama model (random weights, SmolLM2's
# tokenizer) so that the thousand generations it asks for take minutes,
# not hours. Developers only; takes about 4 minutes on 2 cores.
#
#   crates/server/scripts/schemathesis.sh [extra st run arguments]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$repo"
venv="${SCHEMATHESIS_VENV:-$repo/target/schemathesis-venv}"
models="${WORKER_ORCD_MODELS:-$HOME/.cache/worker-orcd/models}"
port="${SCHEMATHESIS_PORT:-18099}"

if [[ ! -x "$venv/bin/st" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
scripts/fetch-models.sh
cargo build --release -p worker-orcd
bin="${CARGO_TARGET_DIR:-target}/release/worker-orcd"
tiny="$(mktemp -d)/tiny-llama.gguf"
"$bin" synth --preset tiny-llama --tokenizer-from "$models/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$tiny"

# A context of 1024 keeps the longest generation (no max_tokens) a few seconds.
"$bin" serve --model "$tiny" --port "$port" --ctx-size 1024 --max-concurrent 4 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$tiny"' EXIT
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" --wait-for-schema 60 \
    --checks all --workers 2 --request-timeout 60 "$@"
