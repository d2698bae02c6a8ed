#!/usr/bin/env bash
# Runs the GPU checks on a machine with an NVIDIA GPU, from test executables
# built elsewhere: the cuda crate needs no CUDA at build time, so build them
# on any machine with
#   cargo test -p cuda --release --no-run
# and copy the executables it names (target/release/deps/<test>-<hash>) to
# one folder on the GPU machine. This script builds nothing.
#
#   scripts/gpu-check.sh DIR
#
# Every executable in DIR runs with --include-ignored (the GPU tests are
# #[ignore]d for machines without a GPU) and one test at a time, so that
# timings don't share the GPU. Logs go to $GPU_CHECK_LOGS (default: a new
# temporary folder). The model tests read $WORKER_ORCD_MODELS (default
# ~/.cache/worker-orcd/models). The last lines are a short table: each
# executable's result, then the tests' own summary lines.
set -uo pipefail

dir="${1:?usage: scripts/gpu-check.sh DIR-WITH-TEST-EXECUTABLES}"
logs="${GPU_CHECK_LOGS:-$(mktemp -d)}"
mkdir -p "$logs"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv,noheader
fi

rows=()
failed=0
for exe in "$dir"/*; do
    [[ -f "$exe" && -x "$exe" ]] || continue
    name="$(basename "$exe")"
    start="$EPOCHREALTIME"
    "$exe" --include-ignored --test-threads=1 --nocapture >"$logs/$name.log" 2>&1
    status=$?
    seconds="$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')"
    result="$(grep -E '^test result:' "$logs/$name.log" | tail -1)"
    passed="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$result")"
    failures="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$result")"
    if [[ $status -ne 0 ]]; then
        failed=1
        echo "== $name failed (exit $status); end of its log:"
        grep -vE '^\s+[0-9]+: |^\s+at ' "$logs/$name.log" | tail -40
    fi
    rows+=("$(printf '%-14s %-6s %6s passed %6s failed %8.1f s' "$name" \
        "$([[ $status -eq 0 ]] && echo ok || echo FAILED)" "${passed:-?}" "${failures:-?}" "$seconds")")
done

echo
echo "gpu-check (logs in $logs)"
printf '%s\n' "${rows[@]}"
grep -h '^gpu-check: ' "$logs"/*.log | sed 's/^gpu-check: /  /'
exit $failed
