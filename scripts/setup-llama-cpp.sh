#!/usr/bin/env bash
# Developer tool, not used by CI: a Python venv with llama-cpp-python built from
# source (so its llama.cpp is compiled for this machine's CPU), plus the pinned
# gguf and numpy of scripts/requirements-test.txt. llama.cpp is the reference
# worker-orcd's output and speed are compared against.
#
# Where: ~/.cache/worker-orcd/llama-venv, or $WORKER_ORCD_LLAMA_VENV; kept out
# of the repository so that `cargo clean` does not throw away a long build.
# Building takes a while on 2 cores (a C++ compiler is needed; pip brings
# cmake); CMAKE_BUILD_PARALLEL_LEVEL defaults to the number of cores. When the
# venv already has the pinned versions, the script does nothing.
set -euo pipefail

llama_cpp_python_version=0.3.36

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$repo/scripts/requirements-test.txt"
venv="${WORKER_ORCD_LLAMA_VENV:-$HOME/.cache/worker-orcd/llama-venv}"

# Succeeds when every pin (llama-cpp-python's and requirements-test.txt's) is
# installed in the venv at exactly its version.
pins_installed() {
    [[ -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" - "$requirements" "llama-cpp-python==$llama_cpp_python_version" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

pins = [line.split("#")[0].strip() for line in open(sys.argv[1])] + sys.argv[2:]
for pin in filter(None, pins):
    name, wanted = pin.split("==")
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}

if pins_installed; then
    echo "setup-llama-cpp: $venv has llama-cpp-python $llama_cpp_python_version"
    exit 0
fi

if ! command -v c++ >/dev/null; then
    echo "setup-llama-cpp: no C++ compiler (c++) found; install one (Debian: apt-get install g++)" >&2
    exit 1
fi
if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "setup-llama-cpp: $venv exists and is not a Python venv; not touching it" >&2
    exit 1
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"

# llama.cpp's native build crashes (SIGSEGV on the first decode) on a CPU that
# reports AMX inside a VM: there, build for AVX-512 with VNNI and without AMX.
if [[ -z "${CMAKE_ARGS:-}" ]] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"
    echo "setup-llama-cpp: the CPU reports AMX; building with $CMAKE_ARGS"
fi

CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
    --no-binary llama-cpp-python "llama-cpp-python==$llama_cpp_python_version" -r "$requirements"

"$venv/bin/python" -c 'import llama_cpp, gguf.quants, numpy'
echo "setup-llama-cpp: $venv ready (llama-cpp-python $llama_cpp_python_version)"
