#!/usr/bin/env python3
"""Developer check, not run in CI: llama.cpp reads the files our GgufWriter writes.

Needs the llama-cpp-python venv of scripts/setup-llama-cpp.sh
(~/.cache/worker-orcd/llama-venv, or $WORKER_ORCD_LLAMA_VENV); run it with any
Python and it re-runs itself under that venv.

    scripts/ref/check_llama_reads.py [OUT_DIR]

1. `cargo run -p gguf --example llama_check_files -- OUT_DIR` writes the files
   (see that example) and, for three of them, a JSON description of what was
   written.
2. ggml's own GGUF parser (`gguf_init_from_file` in libggml-base, through
   ctypes, loading tensor data into a ggml context) must accept values.gguf
   and aligned.gguf, and what it reads (keys, value types and values, tensor
   names, types, shapes, offsets, data bytes) must equal the description.
   values.gguf holds one tensor of every ggml type we know; since ggml checks
   each tensor offset against the sizes of the tensors before it, accepting
   the file means its type-size table agrees with ours.
3. nested.gguf (an array of arrays) is reported: ggml does not support them.
4. llama.cpp loads tiny-llama.gguf as a model, decodes four tokens and
   returns finite logits.

Exits non-zero when llama.cpp rejects a file or reads something different.
"""

import ctypes
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_venv  # noqa: E402

llama_venv.enter(__file__)
import llama_cpp  # noqa: E402

LIB_DIR = Path(llama_cpp.__file__).parent / "lib"

GGUF_TYPES = ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"]
SCALAR_CTYPES = {
    "u8": ctypes.c_uint8, "i8": ctypes.c_int8, "u16": ctypes.c_uint16, "i16": ctypes.c_int16,
    "u32": ctypes.c_uint32, "i32": ctypes.c_int32, "u64": ctypes.c_uint64, "i64": ctypes.c_int64,
    "f32": ctypes.c_uint32, "f64": ctypes.c_uint64,  # floats are compared as bit patterns
    "bool": ctypes.c_uint8,
}


class GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class GgmlTensorHead(ctypes.Structure):
    """The first fields of struct ggml_tensor (ggml.h), stable across versions."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


def load_ggml():
    ggml = ctypes.CDLL(str(LIB_DIR / "libggml-base.so"))
    sigs = {
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, GgufInitParams]),
        "gguf_free": (None, [ctypes.c_void_p]),
        "gguf_get_version": (ctypes.c_uint32, [ctypes.c_void_p]),
        "gguf_get_alignment": (ctypes.c_size_t, [ctypes.c_void_p]),
        "gguf_get_data_offset": (ctypes.c_size_t, [ctypes.c_void_p]),
        "gguf_get_n_kv": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_key": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_kv_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_n": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
        "gguf_get_val_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_val_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_offset": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_size": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "ggml_get_tensor": (ctypes.POINTER(GgmlTensorHead), [ctypes.c_void_p, ctypes.c_char_p]),
        "ggml_get_data": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
        "ggml_n_dims": (ctypes.c_int, [ctypes.c_void_p]),
        "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ggml_free": (None, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(ggml, name)
        fn.restype, fn.argtypes = restype, argtypes
    return ggml



def string_at(ptr, n):
    return ctypes.string_at(ptr, n) if n else b""


def describe_kv(ggml, ctx, i):
    """The value of key i, in tests/gguf_interop.py's format."""
    vtype = GGUF_TYPES[ggml.gguf_get_kv_type(ctx, i)]

    def scalar(t, raw_ptr, index=0):
        c = SCALAR_CTYPES[t]
        v = ctypes.cast(raw_ptr, ctypes.POINTER(c))[index]
        if t in ("f32", "f64"):
            return {"type": t, "bits": int(v)}
        if t == "bool":
            return {"type": t, "value": bool(v)}
        return {"type": t, "value": int(v)}

    if vtype == "string":
        # gguf_get_val_str returns a C string; an embedded NUL would cut it.
        return {"type": "string", "value": ggml.gguf_get_val_str(ctx, i).decode("utf-8")}
    if vtype == "array":
        elem = GGUF_TYPES[ggml.gguf_get_arr_type(ctx, i)]
        n = ggml.gguf_get_arr_n(ctx, i)
        if elem == "string":
            items = [{"type": "string", "value": ggml.gguf_get_arr_str(ctx, i, j).decode("utf-8")} for j in range(n)]
        else:
            data = ggml.gguf_get_arr_data(ctx, i) if n else None
            items = [scalar(elem, data, j) for j in range(n)]
        return {"type": "array", "elem": elem, "items": items}
    return scalar(vtype, ggml.gguf_get_val_data(ctx, i))


def ggml_read(ggml, path):
    """gguf_init_from_file with the tensor data loaded; None when ggml refuses the file."""
    ggml_ctx = ctypes.c_void_p()
    ctx = ggml.gguf_init_from_file(str(path).encode(), GgufInitParams(False, ctypes.pointer(ggml_ctx)))
    if not ctx:
        return None
    try:
        metadata = []
        for i in range(ggml.gguf_get_n_kv(ctx)):
            metadata.append({"key": ggml.gguf_get_key(ctx, i).decode("utf-8"), "value": describe_kv(ggml, ctx, i)})
        tensors = []
        for i in range(ggml.gguf_get_n_tensors(ctx)):
            name = ggml.gguf_get_tensor_name(ctx, i)
            t = ggml.ggml_get_tensor(ggml_ctx, name)
            n_dims = ggml.ggml_n_dims(t)
            size = ggml.gguf_get_tensor_size(ctx, i)
            assert size == ggml.ggml_nbytes(t)
            tensors.append({
                "name": name.decode("utf-8"),
                "type": ggml.ggml_type_name(ggml.gguf_get_tensor_type(ctx, i)).decode().upper(),
                "type_id": ggml.gguf_get_tensor_type(ctx, i),
                # ggml_n_dims drops trailing 1s, which GGUF keeps: compare the
                # padded shape instead (below).
                "dims": [int(d) for d in t.contents.ne[:max(n_dims, 1)]],
                "ne": [int(d) for d in t.contents.ne],
                "n_bytes": int(size),
                "offset": int(ggml.gguf_get_tensor_offset(ctx, i)),
                "data": string_at(ggml.ggml_get_data(t), size).hex(),
            })
        return {
            "version": ggml.gguf_get_version(ctx),
            "alignment": ggml.gguf_get_alignment(ctx),
            "data_offset": ggml.gguf_get_data_offset(ctx),
            "metadata": metadata,
            "tensors": tensors,
        }
    finally:
        ggml.gguf_free(ctx)
        if ggml_ctx:
            ggml.ggml_free(ggml_ctx)


def compare(name, written, read):
    """Differences between what we wrote and what ggml read, as messages."""
    problems = []
    for field in ("version", "alignment"):
        if written[field] != read[field]:
            problems.append(f"{field}: wrote {written[field]}, ggml read {read[field]}")
    wkeys = [kv["key"] for kv in written["metadata"]]
    rkeys = [kv["key"] for kv in read["metadata"]]
    if wkeys != rkeys:
        problems.append(f"metadata keys differ:\n  wrote {wkeys}\n  read  {rkeys}")
    for w, r in zip(written["metadata"], read["metadata"]):
        if w != r:
            problems.append(f"metadata {w['key']}: wrote {json.dumps(w['value'])[:200]}, read {json.dumps(r['value'])[:200]}")
    if [t["name"] for t in written["tensors"]] != [t["name"] for t in read["tensors"]]:
        problems.append("tensor names differ")
    for w, r in zip(written["tensors"], read["tensors"]):
        padded = w["dims"] + [1] * (4 - len(w["dims"]))
        checks = [("type", w["type"], r["type"]), ("type_id", w["type_id"], r["type_id"]),
                  ("shape", padded, r["ne"]), ("n_bytes", w["n_bytes"], r["n_bytes"])]
        if w["data"] != r["data"]:
            checks.append(("data", "(as written)", "(different bytes)"))
        for what, a, b in checks:
            if a != b:
                problems.append(f"tensor {w['name']} {what}: wrote {a}, ggml read {b}")
    return problems


def check_tiny_llama(path):
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        return ["llama_model_load_from_file failed (see llama.cpp's log above)"]
    problems = []
    try:
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, desc, len(desc))
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        shape = (llama_cpp.llama_model_n_layer(model), llama_cpp.llama_model_n_embd(model), n_vocab)
        print(f"  loaded: {desc.value.decode()}, {llama_cpp.llama_model_n_params(model)} parameters, "
              f"(layers, n_embd, n_vocab) = {shape}")
        if shape != (2, 256, 64):
            problems.append(f"llama.cpp sees (layers, n_embd, n_vocab) = {shape}, expected (2, 256, 64)")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 64, 64, 1, 1
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            return problems + ["llama_init_from_model failed"]
        try:
            tokens = (llama_cpp.llama_token * 4)(1, 7, 42, 63)
            rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 4))
            if rc != 0:
                return problems + [f"llama_decode returned {rc}"]
            logits = llama_cpp.llama_get_logits_ith(ctx, -1)
            values = [logits[i] for i in range(n_vocab)]
            if not all(math.isfinite(v) for v in values):
                problems.append("non-finite logits")
            top = max(range(n_vocab), key=values.__getitem__)
            print(f"  decoded 4 tokens: logits finite, range [{min(values):.4f}, {max(values):.4f}], top token {top}")
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    return problems


@llama_cpp.llama_log_callback
def log_warnings(level, text, _user_data):
    # llama.cpp logs every step of a model load; keep warnings and errors.
    if level >= 3:  # GGML_LOG_LEVEL_WARN
        sys.stderr.write(text.decode("utf-8", "replace"))


def main():
    llama_cpp.llama_log_set(log_warnings, ctypes.c_void_p())
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="llama-reads-"))
    subprocess.run(["cargo", "run", "--quiet", "-p", "gguf", "--example", "llama_check_files", "--", str(out_dir)],
                   cwd=REPO, check=True)
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) reading files written by GgufWriter in {out_dir}")
    ggml = load_ggml()
    failures = 0
    for name in ("values", "aligned"):
        written = json.loads((out_dir / f"{name}.json").read_text())
        read = ggml_read(ggml, out_dir / f"{name}.gguf")
        if read is None:
            print(f"FAIL {name}.gguf: gguf_init_from_file refused it (see ggml's log above)")
            failures += 1
            continue
        problems = compare(name, written, read)
        for p in problems:
            print(f"FAIL {name}.gguf: {p}")
        failures += bool(problems)
        if not problems:
            types = sorted({t["type"] for t in read["tensors"]})
            print(f"ok   {name}.gguf: {len(read['metadata'])} keys and {len(read['tensors'])} tensors read back "
                  f"identically (alignment {read['alignment']}, data at {read['data_offset']}; types {', '.join(types)})")

    read = ggml_read(ggml, out_dir / "nested.gguf")
    if read is None:
        print("note nested.gguf: ggml refuses arrays of arrays (our reader and gguf-py accept them; "
              "llama.cpp never writes them)")
    else:
        print(f"note nested.gguf: ggml accepted it: {json.dumps(read['metadata'])[:300]}")

    print("tiny-llama.gguf:")
    problems = check_tiny_llama(out_dir / "tiny-llama.gguf")
    for p in problems:
        print(f"FAIL tiny-llama.gguf: {p}")
    failures += bool(problems)
    if not problems:
        print("ok   tiny-llama.gguf: llama.cpp loads and runs it")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
