"""The developer scripts' way into the llama-cpp-python venv of
scripts/setup-llama-cpp.sh (~/.cache/worker-orcd/llama-venv, or
$WORKER_ORCD_LLAMA_VENV): `enter()` returns when `llama_cpp` is importable,
re-runs the calling script under the venv's Python when it is not, and
exits with a clear message when there is no venv."""

import os
import sys
from pathlib import Path

VENV = Path(os.environ.get("WORKER_ORCD_LLAMA_VENV", Path.home() / ".cache/worker-orcd/llama-venv"))


def enter(script):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        venv_python = VENV / "bin/python"
        # Compare prefixes: the venv's python is a symlink to the same binary.
        if venv_python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(venv_python, [str(venv_python), script, *sys.argv[1:]])
        sys.exit(f"llama_cpp is not importable and {venv_python} is missing: run scripts/setup-llama-cpp.sh")
