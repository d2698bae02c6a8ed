#!/usr/bin/env bash
# Creates the Python virtual environment that the tests use as their reference
# (the gguf package's quantize/dequantize and GGUF reader and writer), with the
# exact versions in scripts/requirements-test.txt.
#
# Where: target/pyenv in the repository, or $WORKER_ORCD_PYENV. Idempotent: a
# stamp file in the venv holds the hash of the requirements and of the Python
# version; when it matches, the script does nothing, and otherwise it builds the
# venv afresh so that nothing from an older set of requirements stays behind.
set -euo pipefail

#
#   scripts/setup-python.sh                      the tests' reference venv
#   scripts/setup-python.sh REQUIREMENTS VENV    another pinned venv (the fleet test's)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="${1:-$repo/scripts/requirements-test.txt}"
venv="${2:-${WORKER_ORCD_PYENV:-$repo/target/pyenv}}"
stamp="$venv/.requirements.sha256"

want="$( { cat "$requirements"; python3 --version; } | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup-python: $venv up to date"
    exit 0
fi

# --clear empties the folder: make sure it is a venv (or absent) first.
if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "setup-python: $venv exists and is not a Python venv; not touching it" >&2
    exit 1
fi
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
if [[ $# -eq 0 ]]; then
    "$venv/bin/python" -c 'import gguf.quants, numpy'
fi
echo "$want" > "$stamp"
echo "setup-python: $venv ready"
