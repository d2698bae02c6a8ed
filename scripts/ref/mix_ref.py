"""llama.cpp's per-tensor quantization mixes on synthetic models, recorded as
test fixtures for engine::convert::plan_types (crates/engine/tests/mix_vs_llama.rs).

Developer tool (llama.cpp is not available in CI): run with the venv that
scripts/setup-llama-cpp.sh makes, after building the binary,

    cargo build --release -p worker-orcd
    ~/.cache/worker-orcd/llama-venv/bin/python scripts/ref/mix_ref.py \
        --worker target/release/worker-orcd \
        --tokenizer-from ~/.cache/worker-orcd/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        qwen2.5-0.5b qwen2.5-1.5b gemma3-270m smollm2-135m tiny-llama tiny-qwen2 tiny-phi3

For each preset it writes an all-F32 model with `worker-orcd synth --quant
F32` (`tiny-phi3`, a fused-QKV model synth has no preset for, with gguf-py)
into a temporary folder ($TMPDIR; the Qwen2.5-0.5B one is 2 GB),
quantizes it with llama.cpp's `llama_model_quantize` (the mixes, not
`pure`) to every file type below, reads back the type llama.cpp gave each
tensor, deletes the files, and writes
crates/engine/tests/fixtures/llama_mix_PRESET.json:

    {"preset": ..., "llama_cpp_python_version": ...,
     "mixes": ["Q4_K_M", "Q4_K_S", ...],
     "tensors": [[name, [dims in ggml order], [its ggml type under each mix]], ...]}

with the tensors in the source file's order.
"""

import argparse
import ctypes
import json
import os
import subprocess
import tempfile

import gguf
import llama_cpp
import numpy as np

FILE_TYPES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q5_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
}


# Not a synth preset: a fused-QKV model (`attn_qkv`, as phi3 has), written
# here with gguf-py; 8 layers so that the every-third-layer rules show.
TINY_PHI3 = "tiny-phi3"


def write_tiny_phi3(path: str) -> None:
    n_embd, n_ff, n_layer, n_vocab = 256, 512, 8, 256
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_rope_dimension_count(64)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)
    rng = np.random.default_rng(0)

    def weight(rows, cols):
        return rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)

    norm = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        writer.add_tensor(f"blk.{i}.attn_qkv.weight", weight(3 * n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(2 * n_ff, n_embd))  # gate and up, fused
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", norm)
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: str, dst: str, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src}, ftype {ftype}) failed: {rc}")


def tensor_types(path: str) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def write_fixture(path, preset, version, tensors, mixes) -> None:
    """One line per tensor: [name, dims, [its type under each of "mixes"]]."""
    mix_names = list(mixes)
    lines = [
        "{",
        f' "preset": {json.dumps(preset)},',
        ' "generator": "scripts/ref/mix_ref.py",',
        f' "llama_cpp_python_version": {json.dumps(version)},',
        f' "mixes": {json.dumps(mix_names)},',
        ' "tensors": [',
        ",\n".join(
            f"  {json.dumps([name, dims, [mixes[m][name] for m in mix_names]])}" for name, dims in tensors
        ),
        " ]",
        "}",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    json.load(open(path))  # well-formed


def record(preset: str, worker: str, tokenizer_from: str, out_dir: str, tmp: str) -> None:
    src = os.path.join(tmp, f"{preset}-F32.gguf")
    if preset == TINY_PHI3:
        write_tiny_phi3(src)
    else:
        subprocess.run(
            [worker, "synth", "--preset", preset, "--quant", "F32", "--tokenizer-from", tokenizer_from, "-o", src],
            check=True,
        )
    try:
        reader = gguf.GGUFReader(src)
        # GGUFReader gives dims in ggml order (row length first), as the gguf crate does
        tensors = [[t.name, [int(d) for d in t.shape]] for t in reader.tensors]
        if any(t.tensor_type.name != "F32" for t in reader.tensors):
            raise SystemExit(f"{src}: expected an all-F32 file")
        del reader
        mixes = {}
        for name, ftype in FILE_TYPES.items():
            dst = os.path.join(tmp, f"{preset}-{name}.gguf")
            quantize(src, dst, ftype)
            try:
                types = tensor_types(dst)
            finally:
                os.remove(dst)
            if set(types) != {t[0] for t in tensors}:
                raise SystemExit(f"{preset} {name}: llama.cpp's output has other tensors than its input")
            mixes[name] = {t[0]: types[t[0]] for t in tensors}
    finally:
        os.remove(src)

    path = os.path.join(out_dir, f"llama_mix_{preset}.json")
    write_fixture(path, preset, llama_cpp.__version__, tensors, mixes)
    print(f"wrote {path}: {len(tensors)} tensors x {len(mixes)} mixes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", required=True, help="the worker-orcd binary")
    parser.add_argument("--tokenizer-from", required=True, help="GGUF file to copy the tokenizer from")
    parser.add_argument("--out-dir", default="crates/engine/tests/fixtures")
    parser.add_argument("presets", nargs="+")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            record(preset, args.worker, args.tokenizer_from, args.out_dir, tmp)


if __name__ == "__main__":
    main()
