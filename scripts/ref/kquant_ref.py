"""llama.cpp's quantizers on known f32 weights, recorded as a test fixture.

Developer tool (llama.cpp is not available in CI): run with the venv that
scripts/setup-llama-cpp.sh makes,

    ~/.cache/worker-orcd/llama-venv/bin/python scripts/ref/kquant_ref.py \
        [crates/quant/tests/fixtures/llama_quant_ref.gguf]

It writes a two-layer F32 `llama` model with gguf-py (llama.cpp's quantizer
reads the architecture's hyperparameters, so the header must be valid),
quantizes it with `llama_model_quantize` and `pure = True` (every weight
matrix gets the file type's one ggml type, no per-tensor mix, no importance
matrix, so llama.cpp runs its `quantize_row_*_ref` functions) once per type,
and keeps only four 256x128 weight matrices, each with its own value
distribution:

    blk.0.attn_k  gaussian, sigma 0.02
    blk.0.attn_v  heavy-tailed: Student-t (3 degrees of freedom) plus rare
                  large outliers of either sign
    blk.1.attn_k  per-row scales spread over four decades, a few outlier
                  columns (the "massive activation" channels of real LLMs)
    blk.1.attn_v  edge cases, one kind per row group: all zeros, constants,
                  one-signed rows, values on a quantization grid (rounding
                  ties), tiny and huge magnitudes, one nonzero per block

The fixture is a GGUF file: `src.NAME` holds the f32 values llama.cpp was
given and `TYPE.NAME` its blocks of that type (dims and type in the index,
so the Rust test reads it with the gguf crate). Deterministic: the same
llama.cpp gives the same bytes.
"""

import ctypes
import os
import sys
import tempfile

import numpy as np
import gguf
import llama_cpp

N_EMBD = 256
N_HEAD = 4
N_KV_HEAD = 2
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 512
N_VOCAB = 256
N_LAYER = 2
KV_DIM = N_KV_HEAD * HEAD_DIM

# llama.cpp file type (pure) -> the one ggml type it gives every weight matrix
FTYPES = {
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q3_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q4_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}

KEPT = ["blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight"]


def gaussian(rng, rows, cols, sigma=0.02):
    return rng.normal(0.0, sigma, (rows, cols))


def heavy_tailed(rng, rows, cols):
    x = rng.standard_t(3, (rows, cols)) * 0.01
    outliers = rng.random((rows, cols)) < 0.002
    x[outliers] = rng.choice([-1.0, 1.0], outliers.sum()) * rng.uniform(0.1, 0.5, outliers.sum())
    return x


def row_and_column_scales(rng, rows, cols):
    row_scale = 10.0 ** rng.uniform(-4.0, 0.0, (rows, 1))
    x = rng.normal(0.0, 1.0, (rows, cols)) * row_scale
    outlier_cols = rng.choice(cols, 4, replace=False)
    x[:, outlier_cols] *= 20.0
    return x


def edge_cases(rng, rows, cols):
    """Row groups of 8 rows (2048 values, 8 super-blocks), one kind each."""
    x = rng.normal(0.0, 0.02, (rows, cols))
    kinds = [
        lambda r: np.zeros((8, cols)),
        lambda r: np.full((8, cols), 0.0123),
        lambda r: np.full((8, cols), -3.5),
        lambda r: rng.uniform(0.0, 1.0, (8, cols)),  # all positive
        lambda r: -rng.uniform(0.0, 1.0, (8, cols)),  # all negative
        lambda r: rng.integers(-8, 8, (8, cols)) * 0.01,  # on a grid: rounding ties
        lambda r: rng.integers(-32, 32, (8, cols)) * 0.125,  # exact binary grid
        lambda r: rng.normal(0.0, 1e-6, (8, cols)),  # tiny: f16 scales go subnormal
        lambda r: rng.normal(0.0, 1e-9, (8, cols)),  # tinier than f16 can scale
        lambda r: rng.normal(0.0, 300.0, (8, cols)),  # large (f16 scale near its range)
        lambda r: one_per_block(rng, cols),
        lambda r: np.where(rng.random((8, cols)) < 0.5, 0.0, rng.normal(0.0, 0.05, (8, cols))),  # sparse
        lambda r: rng.normal(0.5, 0.01, (8, cols)),  # large offset, small spread
        lambda r: np.tile(np.linspace(-1.0, 1.0, 32), (8, cols // 32)),  # ramps per 32
        lambda r: rng.laplace(0.0, 0.02, (8, cols)),
        lambda r: rng.normal(0.0, 0.02, (8, cols)) * (rng.random((8, cols)) < 0.9) + 0.2 * (rng.random((8, cols)) < 0.01),
    ]
    for i, kind in enumerate(kinds):
        x[8 * i : 8 * i + 8] = kind(rng)
    return x


def one_per_block(rng, cols):
    x = np.zeros((8, cols))
    for row in range(8):
        for block in range(cols // 32):
            x[row, block * 32 + rng.integers(32)] = rng.normal(0.0, 0.1)
    return x


def write_source(path, rng):
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("kquant reference")
    writer.add_context_length(512)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV_HEAD)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(N_VOCAB)
    writer.add_file_type(0)

    special = {
        "blk.0.attn_k.weight": gaussian,
        "blk.0.attn_v.weight": heavy_tailed,
        "blk.1.attn_k.weight": row_and_column_scales,
        "blk.1.attn_v.weight": edge_cases,
    }
    values = {}

    def add(name, rows, cols):
        make = special.get(name, gaussian)
        x = np.ascontiguousarray(make(rng, rows, cols), dtype=np.float32)
        values[name] = x
        writer.add_tensor(name, x)

    def add_norm(name):
        writer.add_tensor(name, np.ones(N_EMBD, dtype=np.float32))

    add("token_embd.weight", N_VOCAB, N_EMBD)
    for i in range(N_LAYER):
        add_norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", N_EMBD, N_EMBD)
        add(f"blk.{i}.attn_k.weight", KV_DIM, N_EMBD)
        add(f"blk.{i}.attn_v.weight", KV_DIM, N_EMBD)
        add(f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
        add_norm(f"blk.{i}.ffn_norm.weight")
        add(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        add(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        add(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    add_norm("output_norm.weight")
    add("output.weight", N_VOCAB, N_EMBD)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src}, ftype {ftype}) failed: {rc}")


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "crates/quant/tests/fixtures/llama_quant_ref.gguf"
    rng = np.random.default_rng(20250601)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "f32.gguf")
        values = write_source(src, rng)
        blocks = {}
        for type_name, ftype in FTYPES.items():
            dst = os.path.join(tmp, f"{type_name}.gguf")
            quantize(src, dst, ftype)
            reader = gguf.GGUFReader(dst)
            by_name = {t.name: t for t in reader.tensors}
            for name in KEPT:
                t = by_name[name]
                if t.tensor_type.name != type_name:
                    raise SystemExit(f"{name}: llama.cpp gave {t.tensor_type.name}, expected {type_name}")
                blocks[(type_name, name)] = np.array(t.data, dtype=np.uint8)
            os.remove(dst)

    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    writer = gguf.GGUFWriter(out_path, "none")
    writer.add_string("general.name", "llama.cpp reference quantization")
    writer.add_string("reference.llama_cpp_python_version", llama_cpp.__version__)
    writer.add_string("reference.generator", "scripts/ref/kquant_ref.py")
    for name in KEPT:
        writer.add_tensor(f"src.{name}", values[name])
    for (type_name, name), data in blocks.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(f"{type_name}.{name}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes): {len(KEPT)} tensors x {len(FTYPES)} types")


if __name__ == "__main__":
    main()
