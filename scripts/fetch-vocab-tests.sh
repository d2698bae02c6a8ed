#!/usr/bin/env bash
# Puts llama.cpp's tokenizer test vectors into a cache folder: the
# models/ggml-vocab-*.gguf vocabularies with their .inp (texts) and .out
# (llama.cpp's token ids) files, which the tokenizer crate's tests compare
# against. They come from the llama-cpp-python source distribution, which
# vendors llama.cpp (no other source of llama.cpp is reachable from the
# machines this project runs on).
#
# The sdist is fetched with `pip download --no-deps --no-binary
# llama-cpp-python` (`--no-binary :all:` would also build pip's build
# dependencies, cmake among them, from source: many minutes), checked against
# its sha256 and read with tarfile: nothing is built or installed, and only
# the ggml-vocab-* members are written. They go to a temporary folder that is
# renamed into place once complete, so the cache never holds half a set. When
# the folder is there the script does nothing and touches no network.
#
# Cache folder: $WORKER_ORCD_VOCAB_TESTS, default ~/.cache/worker-orcd/vocab-tests.
set -euo pipefail

vocab_dir="${WORKER_ORCD_VOCAB_TESTS:-$HOME/.cache/worker-orcd/vocab-tests}"
package=llama-cpp-python==0.3.36
sdist=llama_cpp_python-0.3.36.tar.gz
sdist_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
marker=.complete-llama-cpp-python-0.3.36

if [[ -e "$vocab_dir/$marker" ]]; then
    echo "fetch-vocab-tests: $vocab_dir: llama.cpp vocab tests present"
    exit 0
fi

mkdir -p "$(dirname "$vocab_dir")"
download_dir="$(mktemp -d)"
staging="$(mktemp -d "$(dirname "$vocab_dir")/.vocab-tests.partial.XXXXXX")"
trap 'rm -rf "$download_dir" "$staging"' EXIT

python3 -m pip download --no-deps --no-binary llama-cpp-python --no-cache-dir \
    --disable-pip-version-check --quiet --dest "$download_dir" "$package"

actual="$(sha256sum "$download_dir/$sdist" | cut -d' ' -f1)"
if [[ "$actual" != "$sdist_sha256" ]]; then
    echo "fetch-vocab-tests: $sdist: sha256 mismatch: expected $sdist_sha256, actual $actual" >&2
    exit 1
fi

python3 - "$download_dir/$sdist" "$staging" <<'PY'
import re, sys, tarfile
from pathlib import Path

sdist, staging = sys.argv[1], Path(sys.argv[2])
pattern = re.compile(r"^[^/]+/vendor/llama\.cpp/models/(ggml-vocab-[A-Za-z0-9_.-]+)$")
count = 0
with tarfile.open(sdist, "r:gz") as tar:
    for member in tar:
        m = pattern.match(member.name)
        if not (m and member.isfile()):
            continue
        with tar.extractfile(member) as src, open(staging / m.group(1), "wb") as out:
            out.write(src.read())
        count += 1
if count == 0:
    sys.exit(f"fetch-vocab-tests: {sdist} has no vendor/llama.cpp/models/ggml-vocab-* files")
print(f"fetch-vocab-tests: extracted {count} files")
PY

touch "$staging/$marker"
rm -rf "$vocab_dir"
mv "$staging" "$vocab_dir"
echo "fetch-vocab-tests: wrote $vocab_dir"
