#!/usr/bin/env bash
# Unpacks NVRTC and the CUDA headers from NVIDIA's PyPI wheels, so that the
# cuda crate's tests can compile every kernel on a machine without a GPU or a
# CUDA toolkit (docs/DESIGN.md, decision 1). The versions match the GPU
# machine's CUDA 13.0.
#
# Where: target/nvrtc in the repository, or $WORKER_ORCD_NVRTC. Afterwards
#   $dir/nvidia/cu13/lib/libnvrtc.so.13   the compiler (found by the tests)
#   $dir/nvidia/cu13/include/cuda_fp16.h  the headers NVRTC needs
# Idempotent: a stamp file holds the pinned versions; when it matches, the
# script does nothing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${WORKER_ORCD_NVRTC:-$repo/target/nvrtc}"
wheels=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96)
stamp="$dir/.wheels"

if [[ -f "$stamp" && "$(cat "$stamp")" == "${wheels[*]}" ]]; then
    echo "setup-nvrtc: $dir up to date"
    exit 0
fi

# The tests' venv (scripts/setup-python.sh) has pip for certain; a bare python3 may not.
python="${WORKER_ORCD_PYTHON:-$repo/target/pyenv/bin/python}"
[[ -x "$python" ]] || python=python3
if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "setup-nvrtc: $python has no pip; run scripts/setup-python.sh first or set WORKER_ORCD_PYTHON" >&2
    exit 1
fi

download="$dir/.download"
rm -rf "$dir"
mkdir -p "$download"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$download" "${wheels[@]}"
for wheel in "$download"/*.whl; do
    "$python" -m zipfile -e "$wheel" "$dir"
done
# Only libnvrtc.so.13, its builtins and the headers are used.
rm -rf "$download" "$dir"/nvidia/cu13/lib/*.a "$dir"/nvidia/cu13/lib/*.alt.*
test -f "$dir/nvidia/cu13/include/cuda_fp16.h"
ls "$dir"/nvidia/cu13/lib/libnvrtc.so.* >/dev/null
echo "${wheels[*]}" > "$stamp"
echo "setup-nvrtc: $dir ready"
