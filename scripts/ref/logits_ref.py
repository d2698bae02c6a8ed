#!/usr/bin/env python3
"""Developer tool, not run in CI: llama.cpp's logits as test fixtures.

Writes crates/engine/tests/fixtures/logits/<config>/{header.json,logits.bin},
which crates/engine/tests/vs_llama_cpp.rs compares the CPU forward pass with.
Needs the llama-cpp-python venv of scripts/setup-llama-cpp.sh
(~/.cache/worker-orcd/llama-venv, or $WORKER_ORCD_LLAMA_VENV; any Python
re-runs the script under it) and a release build of the worker-orcd binary
(for `synth` and `quantize --type F32`).

    cargo build --release -p worker-orcd
    scripts/ref/logits_ref.py [--bin PATH] [--work DIR] [CONFIG ...]

For every config and each of its prompts (tokenized by llama.cpp, with the
model's own add_bos):
1. llama.cpp generates 32 greedy tokens on the model file (the prompt in one
   batch, then one token at a time). The prompt plus the first 31 of them is
   the teacher-forced sequence; the 32 steps are its positions
   prompt_len-1 .. prompt_len+30.
2. The same sequence, fed in the same chunks, runs on the file dequantized
   to F32 (`worker-orcd quantize --type F32`, bit-exact with ggml's own
   dequantization), which takes llama.cpp's 8-bit rounding of activations
   (done for quantized weights only) out of the comparison. llama.cpp also
   generates 32 greedy tokens of its own on the F32 file (header
   `f32_greedy`, with each step's top-1 margin), since on real models the
   two llama.cpp runs part ways within 32 steps.
For each step and each of the two references we keep the argmax and the
top-1 margin over the full vocabulary, and the logits at a subset: the
quantized reference's top 64 of that step plus 448 seeded random ids fixed
per config.

logits.bin, little-endian, per prompt, per step:
    top_ids     u32 × 64    the quantized reference's top 64, best first
    quant_top   f32 × 64    quantized reference at top_ids
    quant_rand  f32 × 448   quantized reference at header.random_ids
    f32_top     f32 × 64    F32 reference at top_ids
    f32_rand    f32 × 448   F32 reference at header.random_ids
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("WORKER_ORCD_MODELS", Path.home() / ".cache/worker-orcd/models"))
FIXTURES = REPO / "crates/engine/tests/fixtures/logits"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_venv  # noqa: E402

llama_venv.enter(__file__)
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

STEPS = 32
N_TOP = 64
N_RANDOM = 448
SUBSET_SEED = 20240611
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m-q4_k_m.gguf"

# A question, code, a list, a story opening, and a non-English request; the
# instruct models get the questions in their chat format.
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GEMMA_CHAT = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


def prompts(chat):
    return [
        chat.format("Why is the sky blue? Answer in two sentences."),
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        "Things to pack for a weekend hiking trip:\n1.",
        "Once upon a time, in a small village at the edge of a dark forest,",
        chat.format("Écris une courte phrase sur la mer, en français."),
    ]


# name -> (source, prompts). A source is a file in MODELS or a synth recipe.
CONFIGS = {
    "smollm2-135m-q4_1": ({"file": SMOLLM2}, prompts(CHATML)),
    "gemma3-270m-q4_k_m": ({"file": GEMMA3}, prompts(GEMMA_CHAT)),
    "tiny-qwen2-f16": (
        {"synth": {"preset": "tiny-qwen2", "quant": "F16", "seed": 42, "tokenizer_from": SMOLLM2}},
        prompts(CHATML),
    ),
    "tiny-qwen2-q4_k_m": (
        {"synth": {"preset": "tiny-qwen2", "quant": "Q4_K_M", "seed": 42, "tokenizer_from": SMOLLM2}},
        prompts(CHATML),
    ),
}
# One synthetic model per architecture the engine added after qwen2, llama
# and gemma3, each in llama.cpp's Q4_K_M mix (and its F32 copy).
for _preset in ("tiny-llama3", "tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-smollm3"):
    CONFIGS[f"{_preset}-q4_k_m"] = (
        {"synth": {"preset": _preset, "quant": "Q4_K_M", "seed": 42, "tokenizer_from": SMOLLM2}},
        prompts(CHATML),
    )

# llama.cpp's context for every run: it decides Phi-3's RoPE factors (long
# once the context passes the original one), so the test loads with it too.
N_CTX = 256


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dumps(value, indent=""):
    """JSON with one line per key and arrays of numbers on one line each."""
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def run(cmd):
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    subprocess.run([str(c) for c in cmd], check=True)


def load(path):
    # type_k/type_v 0: F32 KV cache, so the cache adds no rounding of its own.
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        logits_all=True,
        n_threads=2,
        type_k=0,
        type_v=0,
        flash_attn=False,
        verbose=False,
    )


def step_rows(llm, prompt_len):
    """Logits of the 32 teacher-forced steps, 32 × vocab."""
    return np.array(llm.scores[prompt_len - 1 : prompt_len - 1 + STEPS], dtype=np.float32)


def generate(llm, prompt):
    """llama.cpp's 32 greedy tokens; leaves the scores of prompt + 31 of them."""
    llm.reset()
    llm.eval(prompt)
    greedy = []
    for step in range(STEPS):
        token = int(np.argmax(llm.scores[len(prompt) - 1 + step]))
        greedy.append(token)
        if step + 1 < STEPS:
            llm.eval([token])
    return greedy


def greedy_margins(llm, prompt_len):
    """Top-1 margins of the steps `generate` just took."""
    return argmax_margin(step_rows(llm, prompt_len))[1]


def teacher_force(llm, prompt, greedy):
    """The same sequence in the same chunks as `generate`."""
    llm.reset()
    llm.eval(prompt)
    for token in greedy[: STEPS - 1]:
        llm.eval([token])


def argmax_margin(rows):
    top2 = np.sort(np.partition(rows, -2, axis=1)[:, -2:], axis=1)
    return np.argmax(rows, axis=1), top2[:, 1] - top2[:, 0]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def model_files(name, source, bin_path, work):
    """(quantized file, F32 file, header fields describing the source)."""
    work.mkdir(parents=True, exist_ok=True)
    if "file" in source:
        quant = MODELS / source["file"]
        described = {"file": source["file"]}
    else:
        synth = source["synth"]
        quant = work / f"{name}.gguf"
        run([bin_path, "synth", "--preset", synth["preset"], "--quant", synth["quant"],
             "--tokenizer-from", MODELS / synth["tokenizer_from"], "--seed", synth["seed"], "-o", quant])
        described = {"synth": dict(synth, tokenizer_sha256=sha256(MODELS / synth["tokenizer_from"]))}
    f32 = work / f"{name}.f32.gguf"
    run([bin_path, "quantize", quant, f32, "--type", "F32"])
    return quant, f32, described


def make_fixture(name, bin_path, work):
    source, texts = CONFIGS[name]
    quant_path, f32_path, described = model_files(name, source, bin_path, work)
    quant_llm = load(quant_path)
    vocab = quant_llm.n_vocab()
    add_bos = quant_llm._model.add_bos_token()
    random_ids = np.random.default_rng(SUBSET_SEED).choice(vocab, N_RANDOM, replace=False).astype(np.uint32)

    runs = []
    for text in texts:
        prompt = quant_llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        greedy = generate(quant_llm, prompt)
        runs.append({"text": text, "prompt": prompt, "greedy": greedy, "quant": step_rows(quant_llm, len(prompt))})
    del quant_llm

    f32_llm = load(f32_path)
    for r in runs:
        r["f32_greedy"] = generate(f32_llm, r["prompt"])
        r["f32_greedy_margin"] = greedy_margins(f32_llm, len(r["prompt"]))
        teacher_force(f32_llm, r["prompt"], r["greedy"])
        r["f32"] = step_rows(f32_llm, len(r["prompt"]))
    del f32_llm

    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    header_prompts = []
    with open(out / "logits.bin", "wb") as f:
        for r in runs:
            top_ids = np.argsort(-r["quant"], axis=1, kind="stable")[:, :N_TOP].astype(np.uint32)
            refs = {}
            for ref in ("quant", "f32"):
                argmax, margin = argmax_margin(r[ref])
                refs[ref] = {"argmax": argmax.tolist(), "margin": [round(float(m), 6) for m in margin]}
            for step in range(STEPS):
                f.write(top_ids[step].astype("<u4").tobytes())
                for ref in ("quant", "f32"):
                    row = r[ref][step]
                    f.write(row[top_ids[step]].astype("<f4").tobytes())
                    f.write(row[random_ids].astype("<f4").tobytes())
            # How far llama.cpp's two runs are apart, for scale (full vocabulary).
            quant_vs_f32 = [rel_l2(r["quant"][s], r["f32"][s]) for s in range(STEPS)]
            header_prompts.append({
                "text": r["text"],
                "prompt": r["prompt"],
                "greedy": r["greedy"],
                "quant": refs["quant"],
                "f32": refs["f32"],
                "f32_greedy": r["f32_greedy"],
                "f32_greedy_margin": [round(float(m), 6) for m in r["f32_greedy_margin"]],
                "llama_quant_vs_f32_rel_l2_max": round(max(quant_vs_f32), 6),
            })
            print(f"{name}: {r['text'][:40]!r}: {len(r['prompt'])} prompt tokens, "
                  f"min margin {min(refs['quant']['margin']):.3f}, "
                  f"llama.cpp quant vs F32 rel-L2 max {max(quant_vs_f32):.2e}", file=sys.stderr)

    header = {
        "config": name,
        "generated_by": "scripts/ref/logits_ref.py",
        "llama_cpp_python": llama_cpp.__version__,
        "source": described,
        "model_sha256": sha256(quant_path),
        "f32_sha256": sha256(f32_path),
        "vocab": vocab,
        "add_bos": add_bos,
        "n_ctx": N_CTX,
        "steps": STEPS,
        "n_top": N_TOP,
        "random_ids": random_ids.tolist(),
        "prompts": header_prompts,
    }
    (out / "header.json").write_text(dumps(header) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{name}: wrote {out} ({size / 1024:.0f} KiB)", file=sys.stderr)


def main():
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", type=Path, default=target / "release/worker-orcd", help="worker-orcd binary")
    parser.add_argument("--work", type=Path, default=target / "logits-ref", help="where synthetic and F32 files go")
    parser.add_argument("configs", nargs="*", default=list(CONFIGS), help=f"default: all of {', '.join(CONFIGS)}")
    args = parser.parse_args()
    for name in args.configs:
        if name not in CONFIGS:
            sys.exit(f"unknown config {name}; known: {', '.join(CONFIGS)}")
    for name in args.configs:
        make_fixture(name, args.bin, args.work)


if __name__ == "__main__":
    main()
