#!/usr/bin/env python3
"""Developer benchmark, not run in CI: the CPU backend beside llama.cpp.

Prefill (a PROMPT-token prompt into an empty cache) and decode (GEN greedy
tokens from a one-token prompt), tokens per second, at each thread count, on
the same files, in alternating rounds (llama.cpp, then worker-orcd, ROUNDS
times; the median of each side is reported). llama.cpp is llama-cpp-python
from scripts/setup-llama-cpp.sh (built from source for this CPU, without AMX
where the CPU reports it), driven through its C API (llama_decode and the
logits pointer, no Python work per token beyond the argmax). worker-orcd is
`worker-orcd bench` with the default CPU settings unless --activations says.
Also reported: worker-orcd's peak resident memory (mapped file pages
included) against the file size plus its KV cache plus 300 MB.

    cargo build --release -p worker-orcd
    scripts/cpu-bench.py [--bin PATH] [--threads 1,2] [--rounds 3] [MODEL.gguf ...]

Without models: SmolLM2-135M-Instruct Q4_1 and Gemma-3-270M Q4_K_M from
scripts/fetch-models.sh, and a synthetic Qwen2.5-0.5B in llama.cpp's Q4_K_M
mix (written with `worker-orcd synth`).
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("WORKER_ORCD_MODELS", Path.home() / ".cache/worker-orcd/models"))

sys.path.insert(0, str(Path(__file__).resolve().parent / "ref"))
import llama_venv  # noqa: E402

llama_venv.enter(__file__)
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402


@llama_cpp.llama_log_callback
def QUIET(level, text, user_data):
    pass


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags():
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags)
    return ""


class Llama:
    """One model in llama.cpp, its default context settings (F16 KV cache)."""

    def __init__(self, path, threads, n_ctx):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            sys.exit(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = 512
        cparams.n_ubatch = 512
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens):
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) != 0:
            sys.exit("llama_decode failed")

    def argmax(self):
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def prefill(self, prompt):
        self.clear()
        start = time.perf_counter()
        self.decode(prompt)
        self.argmax()
        return len(prompt) / (time.perf_counter() - start)

    def generate(self, first, n):
        self.clear()
        self.decode([first])
        token = self.argmax()
        start = time.perf_counter()
        for _ in range(n):
            self.decode([token])
            token = self.argmax()
        return n / (time.perf_counter() - start)

    def close(self):
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def llama_round(path, threads, prompt_len, gen):
    llm = Llama(path, threads, prompt_len + gen + 16)
    prompt = [(i * 7919 + 13) % llm.n_vocab for i in range(prompt_len)]
    llm.prefill(prompt[:32])  # warm-up
    pp = statistics.median(llm.prefill(prompt) for _ in range(3))
    llm.generate(prompt[0], 8)  # warm-up
    tg = llm.generate(prompt[0], gen)
    llm.close()
    return pp, tg


def ours_round(binary, path, threads, prompt_len, gen, activations):
    cmd = [str(binary), "bench", "-m", str(path), "-t", str(threads), "--prompt-tokens", str(prompt_len),
           "--gen-tokens", str(gen), "--repeats", "1", "--prefill-repeats", "3", "--json"]
    if activations:
        cmd += ["--cpu-activations", activations]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return (result["prefill_tokens_per_second"], result["decode_tokens_per_second"],
            result.get("peak_rss_bytes"), result["device"])


def kv_bytes(path, positions):
    """Our CPU cache: f32 K and V per layer and position."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key):
        f = reader.fields.get(f"{arch}.{key}")
        return None if f is None else f.parts[-1].tolist()

    layers = int(field("block_count")[0])
    heads = field("attention.head_count")[0]
    kv_heads = (field("attention.head_count_kv") or [heads])[0]
    key_len = (field("attention.key_length") or [field("embedding_length")[0] // heads])[0]
    value_len = (field("attention.value_length") or [key_len])[0]
    return layers * positions * kv_heads * (key_len + value_len) * 4


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--bin", type=Path, default=REPO / "target/release/worker-orcd")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=289)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--activations", choices=["f32", "q8"], help="worker-orcd's --cpu-activations [default: its default]")
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(QUIET, ctypes.c_void_p(0))

    work = Path(tempfile.mkdtemp(prefix="cpu-bench-"))
    models = args.models
    if not models:
        models = [MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf", MODELS / "gemma-3-270m-q4_k_m.gguf"]
        synth = work / "qwen2.5-0.5b-q4_k_m.gguf"
        subprocess.run([str(args.bin), "synth", "--preset", "qwen2.5-0.5b", "--quant", "Q4_K_M",
                        "--tokenizer-from", str(models[0]), "-o", str(synth)], check=True, capture_output=True)
        models.append(synth)

    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores; {cpu_flags()})")
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; prompt {args.prompt} tokens, decode {args.gen} tokens, "
          f"{args.rounds} alternating rounds, medians")
    rows = []
    for path in models:
        for threads in [int(t) for t in args.threads.split(",")]:
            llama_pp, llama_tg, ours_pp, ours_tg, peaks = [], [], [], [], []
            device = ""
            for _ in range(args.rounds):
                pp, tg = llama_round(path, threads, args.prompt, args.gen)
                llama_pp.append(pp)
                llama_tg.append(tg)
                pp, tg, peak, device = ours_round(args.bin, path, threads, args.prompt, args.gen, args.activations)
                ours_pp.append(pp)
                ours_tg.append(tg)
                if peak:
                    peaks.append(peak)
            row = {
                "model": path.name, "threads": threads, "device": device,
                "llama_pp": statistics.median(llama_pp), "llama_tg": statistics.median(llama_tg),
                "ours_pp": statistics.median(ours_pp), "ours_tg": statistics.median(ours_tg),
                "rounds": args.rounds, "peak_bytes": max(peaks) if peaks else None,
                "budget_bytes": path.stat().st_size + kv_bytes(path, args.prompt + args.gen + 1) + 300 * 2**20,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    print()
    print(f"| model | threads | llama.cpp pp / tg tok/s | worker-orcd pp / tg tok/s | ratio pp / tg | peak RSS / file+KV+300MB |")
    print(f"| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f} / {r['budget_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] else "?"
        print(f"| {r['model']} | {r['threads']} | {r['llama_pp']:.1f} / {r['llama_tg']:.1f} | {r['ours_pp']:.1f} / {r['ours_tg']:.1f} | "
              f"{r['ours_pp'] / r['llama_pp']:.2f}× / {r['ours_tg'] / r['llama_tg']:.2f}× | {peak} |")
    modes = sorted({r["device"].split(", ")[-1] for r in rows})
    print(f"worker-orcd: {', '.join(modes)}")


if __name__ == "__main__":
    main()
