#!/usr/bin/env bash
# Runs the GPU checks on a machine with an NVIDIA GPU, from executables built
# elsewhere (the cuda crate needs no CUDA at build time). This script builds
# nothing. DIR holds:
#
#   tests/          the cuda crate's test executables:
#                     cargo test -p cuda --release --no-run
#                   then copy the executables it names (target/release/deps/<test>-<hash>)
#   worker-orcd     the release binary (cargo build --release -p worker-orcd)
#   tokenizer.gguf  a small GGUF whose tokenizer the synthetic models copy, e.g.
#                     worker-orcd synth --preset tiny-qwen2 --quant Q4_0 \
#                       --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf -o tokenizer.gguf
#   llama.cpp.tar.xz  optional: llama.cpp's source (ggml, src, include, common, app,
#                   tools, vendor, cmake); with it the script builds llama-bench
#                   (CMake, nvcc) and benchmarks it on the same files
#   kernels/        optional: a kernel cache for the GPU's architecture, copied to
#                   ~/.cache/worker-orcd/kernels so that NVRTC need not run here
#                   (cargo test -p cuda --test nvrtc -- --ignored fill_hopper_kernel_cache
#                    with WORKER_ORCD_KERNEL_CACHE_OUT=DIR/kernels)
#
#   scripts/gpu-check.sh DIR
#
# GPU_CHECK_PARTS picks the steps (default: all of tests selftest archs
# archbench sizes generate bench serving).
#
# Steps: every test executable with --include-ignored, one test at a time
# (the GPU tests are #[ignore]d for machines without a GPU); synthetic models
# of real shapes (Qwen2.5-0.5B in F16, Q8_0 and Q4_K_M, stand-ins for
# SmolLM2-135M and Gemma-3-270M, whose real files are too large to carry);
# `worker-orcd selftest` on each in both weight modes (GPU against the CPU
# backend); `worker-orcd generate --device cuda` (greedy text equal to the
# CPU's, and a sampled run); `worker-orcd bench --device cuda` (quant, quant --unfused, f16) on
# Qwen2.5-0.5B Q4_K_M in both modes. Real model files in $WORKER_ORCD_MODELS, if any, are self-tested too.
# "archs": `selftest` in both weight modes on a small synthetic model of
# every architecture (the ones the CPU tests compare with llama.cpp, plus
# Mistral's sliding window) and on the Llama 3.2 1B and Qwen3 0.6B shapes;
# "archbench": `bench` on those two shapes, beside llama-bench when its
# source came.
# "sizes": decode, prefill and 64 streams on the Qwen2.5 shapes of
# $GPU_CHECK_SIZES (default 0.5b 1.5b 7b; 32b exists too) in llama.cpp's
# Q4_K_M mix, beside llama-bench when its source came, with the fraction of
# the card's memory bandwidth a decode token uses (weight bytes read a token
# x tokens a second / peak).
# "serving": `bench --serving` on Qwen2.5-0.5B Q4_K_M (the scheduler: time
# to first token with a 2,000-token prefix cached against cold, streams'
# inter-token p99 while a 4,000-token prompt is read, a cancelled long
# prompt, a 10-turn chat, 64 streams with the prefix cache on and off).
# Logs go to $GPU_CHECK_LOGS (default: a new temporary folder), models to
# $GPU_CHECK_MODELS (default: a new temporary folder; existing files are
# reused). The last lines are a short table.
set -uo pipefail

dir="${1:?usage: scripts/gpu-check.sh DIR (see the header)}"
dir="$(cd "$dir" && pwd)"
logs="${GPU_CHECK_LOGS:-$(mktemp -d)}"
models="${GPU_CHECK_MODELS:-$(mktemp -d)}"
mkdir -p "$logs" "$models/unit" "$models/more"
bin="$dir/worker-orcd"
failed=0
parts=" ${GPU_CHECK_PARTS:-tests selftest archs archbench sizes generate bench serving} "
part() { [[ "$parts" == *" $1 "* ]]; }

gpu=""
if command -v nvidia-smi >/dev/null; then
    gpu="$(nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv,noheader | head -1)"
    echo "$gpu"
fi

# cuBLAS is looked for in the toolkit's usual places; failing those, on the loader's path.
if ! ls /usr/local/cuda/lib64/libcublas.so.13 >/dev/null 2>&1; then
    found="$(find / -name 'libcublas.so.13' -not -path '/proc/*' 2>/dev/null | head -1)"
    [[ -n "$found" ]] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

if [[ -d "$dir/kernels" ]]; then
    mkdir -p "$HOME/.cache/worker-orcd/kernels"
    cp -n "$dir"/kernels/*.cubin "$HOME/.cache/worker-orcd/kernels/" 2>/dev/null
fi

# Synthetic models, made here with the carried binary.
synth() { # preset quant file
    [[ -f "$3" ]] && return 0
    "$bin" synth --preset "$1" --quant "$2" --tokenizer-from "$dir/tokenizer.gguf" -o "$3" \
        >>"$logs/synth.log" 2>&1 || { echo "== synth $1 $2 failed"; tail -5 "$logs/synth.log"; failed=1; }
}
selftest_models=()
if [[ -x "$bin" ]]; then
    start="$EPOCHREALTIME"
    synth qwen2.5-0.5b Q4_K_M "$models/unit/qwen2.5-0.5b-q4_k_m.gguf"
    synth smollm2-135m Q4_1 "$models/unit/smollm2-135m-q4_1.gguf"
    synth gemma3-270m Q4_K_M "$models/unit/gemma3-270m-q4_k_m.gguf"
    synth qwen2.5-0.5b Q8_0 "$models/more/qwen2.5-0.5b-q8_0.gguf"
    synth qwen2.5-0.5b F16 "$models/more/qwen2.5-0.5b-f16.gguf"
    echo "synthetic models in $models ($(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s)"
    if part selftest; then
        selftest_models=("$models/more/qwen2.5-0.5b-f16.gguf" "$models/more/qwen2.5-0.5b-q8_0.gguf"
            "$models/unit/qwen2.5-0.5b-q4_k_m.gguf" "$models/unit/smollm2-135m-q4_1.gguf"
            "$models/unit/gemma3-270m-q4_k_m.gguf")
        for real in "${WORKER_ORCD_MODELS:-/nonexistent}"/*.gguf; do
            [[ -f "$real" ]] && selftest_models+=("$real")
        done
    fi
    for preset in tiny-llama3 tiny-qwen3 tiny-phi3 tiny-gemma2 tiny-mistral tiny-smollm3 llama3.2-1b qwen3-0.6b; do
        if part archs || { part archbench && [[ $preset == *-*b ]]; }; then
            synth "$preset" Q4_K_M "$models/more/$preset-q4_k_m.gguf"
        fi
        part archs && selftest_models+=("$models/more/$preset-q4_k_m.gguf")
    done
fi

rows=()
for exe in "$dir"/tests/*; do
    part tests || break
    [[ -f "$exe" && -x "$exe" ]] || continue
    name="$(basename "$exe")"
    start="$EPOCHREALTIME"
    WORKER_ORCD_MODELS="$models/unit" "$exe" --include-ignored --test-threads=1 --nocapture >"$logs/$name.log" 2>&1
    status=$?
    seconds="$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')"
    result="$(grep -E '^test result:' "$logs/$name.log" | tail -1)"
    passed="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$result")"
    failures="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$result")"
    if [[ $status -ne 0 ]]; then
        failed=1
        echo "== $name failed (exit $status); end of its log:"
        grep -vE '^\s+[0-9]+: |^\s+at ' "$logs/$name.log" | tail -40
    fi
    rows+=("$(printf '%-22s %-6s %6s passed %6s failed %8.1f s' "$name" \
        "$([[ $status -eq 0 ]] && echo ok || echo FAILED)" "${passed:-?}" "${failures:-?}" "$seconds")")
done

selftests=()
for model in "${selftest_models[@]}"; do
    for weights in quant f16; do
        log="$logs/selftest-$(basename "$model" .gguf)-$weights.log"
        timeout 300 "$bin" selftest -m "$model" --weights "$weights" >"$log" 2>&1
        status=$?
        cat "$log"
        line="$(grep -h '^selftest: ' "$log" | tail -1)"
        if [[ $status -ne 0 ]]; then
            failed=1
            [[ -n "$line" ]] || line="selftest: ERROR $(basename "$model") $weights: $(tail -1 "$log")"
        fi
        selftests+=("${line#selftest: }")
    done
done

# generate through the scheduler: greedy text must match the CPU backend's;
# a sampled run must simply work.
generates=()
gen_model="$models/unit/qwen2.5-0.5b-q4_k_m.gguf"
part generate || gen_model=/nonexistent
if [[ -x "$bin" && -f "$gen_model" ]]; then
    gen() { # name, then generate's arguments
        local name="$1"
        shift
        timeout 120 "$bin" generate -m "$gen_model" -p "Once upon a time" -n 32 --seed 7 "$@" \
            >"$logs/generate-$name.out" 2>"$logs/generate-$name.err"
    }
    gen cpu-greedy --device cpu --temperature 0
    for weights in quant f16; do
        if gen "cuda-$weights-greedy" --device cuda --weights "$weights" --temperature 0; then
            same="$(cmp -s "$logs/generate-cpu-greedy.out" "$logs/generate-cuda-$weights-greedy.out" && echo "same text as --device cpu" || echo "TEXT DIFFERS from --device cpu")"
            [[ "$same" == same* ]] || failed=1
        else
            same="FAILED: $(tail -1 "$logs/generate-cuda-$weights-greedy.err")"
            failed=1
        fi
        speed="$(grep -o 'generated: [0-9]* tokens, [0-9.]* tok/s' "$logs/generate-cuda-$weights-greedy.err" | tail -1)"
        generates+=("$weights greedy: $same ($speed)")
        if gen "cuda-$weights-sampled" --device cuda --weights "$weights" --temperature 0.8; then
            speed="$(grep -o 'generated: [0-9]* tokens, [0-9.]* tok/s' "$logs/generate-cuda-$weights-sampled.err" | tail -1)"
            generates+=("$weights sampled (temperature 0.8, top-k 40): ok ($speed)")
        else
            generates+=("$weights sampled: FAILED: $(tail -1 "$logs/generate-cuda-$weights-sampled.err")")
            failed=1
        fi
    done
fi

benches=()
bench_model="$models/unit/qwen2.5-0.5b-q4_k_m.gguf"
part bench || bench_model=/nonexistent
if [[ -x "$bin" && -f "$bench_model" ]]; then
    # quant (as served), quant with the decode kernels unfused (what fusing
    # gains), f16 (the seed's mode).
    for mode in quant unfused f16; do
        log="$logs/bench-$mode.log"
        case "$mode" in
            unfused) flags=(--weights quant --unfused) ;;
            *) flags=(--weights "$mode") ;;
        esac
        timeout 300 "$bin" bench --device cuda "${flags[@]}" -m "$bench_model" --json >"$log" 2>"$log.err"
        status=$?
        if [[ $status -ne 0 ]]; then
            failed=1
            benches+=("$mode: FAILED $(tail -1 "$log.err")")
            continue
        fi
        benches+=("$(python3 - "$log" "$mode" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
l = b["load"]
print(f"{sys.argv[2]:<8} load {l['load_seconds']:.3f} s (upload {l['upload_gigabytes_per_second']:.1f} GB/s)  "
      f"pp{b['prompt_tokens']} {b['prefill_tokens_per_second']:.0f} tok/s  tg{b['gen_tokens']} {b['decode_tokens_per_second']:.1f} tok/s  "
      f"{b['streams']} streams {b['streams_generated_tokens_per_second']:.0f} tok/s "
      f"({b['streams_decode_tokens_per_second']:.0f} while decoding)  "
      f"GPU memory: weights {l['weights_bytes']/2**20:.1f} MiB (file {l['file_tensor_bytes']/2**20:.1f}) + KV {l['kv_bytes']/2**20:.1f} + "
      f"workspace {l['workspace_bytes']/2**20:.1f} MiB, measured {l['gpu_used_bytes']/2**20:.1f} MiB")
EOF
)")
    done
    # worker-orcd beside llama.cpp (0c1e570, sm_90, flash attention on, the
    # same model shape and quant mix, measured on these cards) and the targets.
    if [[ -s "$logs/bench-quant.log" ]]; then
        comparison="$(python3 - "$logs/bench-quant.log" "$gpu" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
h200 = "H200" in sys.argv[2]
llama = {"tg": 900 if h200 else 880, "pp": 50000, "streams": 10260 if h200 else 9930,
         "load": 0.316 if h200 else 0.537}
rows = [
    ("decode, batch 1 (tg128), tok/s", b["decode_tokens_per_second"], llama["tg"], ">= 1800", b["decode_tokens_per_second"] >= 1800),
    ("prefill (pp512), tok/s", b["prefill_tokens_per_second"], llama["pp"], ">= 60000", b["prefill_tokens_per_second"] >= 60000),
    (f"{b['streams']} streams, 128+128, generated tok/s", b["streams_generated_tokens_per_second"], llama["streams"], ">= 20000", b["streams_generated_tokens_per_second"] >= 20000),
    ("load to GPU (page cache), s, repeat", b["load_seconds"], llama["load"], "<= 0.150", b["load_seconds"] <= 0.150),
    ("  the same, first in a new process, s", b["load"]["load_seconds_all"][0], llama["load"], "<= 0.150", b["load"]["load_seconds_all"][0] <= 0.150),
]
print(f"  {'measure':<40} {'worker-orcd':>12} {'llama.cpp':>10} {'target':>9}  met")
for name, ours, ref, target, met in rows:
    fmt = (lambda v: f"{v:.3f}") if "load" in name or "first" in name else (lambda v: f"{v:.0f}")
    print(f"  {name:<40} {fmt(ours):>12} {fmt(ref):>10} {target:>9}  {'yes' if met else 'no'}")
EOF
)"
    fi
fi

# The scheduler under traffic (prefix cache, prompt chunks).
serving=()
serving_model="$models/unit/qwen2.5-0.5b-q4_k_m.gguf"
if part serving && [[ -x "$bin" && -f "$serving_model" ]]; then
    log="$logs/bench-serving.log"
    if timeout 400 "$bin" bench --serving --device cuda -m "$serving_model" >"$log" 2>"$log.err"; then
        mapfile -t serving < <(grep -E '^(ttft|pacing|cancel|chat|throughput|grammar) ' "$log")
    else
        failed=1
        serving=("FAILED: $(tail -1 "$log.err")")
    fi
fi

# The new architectures' real shapes: worker-orcd's bench and, when the
# source came, llama-bench (tg128, pp512) and llama-batched-bench (64
# sequences of 128+128) on the same file, flash attention on, every layer
# on the GPU.
# llama-bench and llama-batched-bench, built once from the carried source.
llama_bench=""
llama_built=0
build_llama() {
    ((llama_built)) && return 0
    llama_built=1
    [[ -f "$dir/llama.cpp.tar.xz" ]] || return 0
    local build="$logs/llama.cpp"
    mkdir -p "$build" && tar -xJf "$dir/llama.cpp.tar.xz" -C "$build"
    if (cd "$build/llama.cpp" && cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
            -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release \
            && cmake --build build -j "$(nproc)" --target llama-bench llama-batched-bench) \
            >"$logs/llama-build.log" 2>&1; then
        llama_bench="$build/llama.cpp/build/bin/llama-bench"
    else
        echo "== llama.cpp did not build; end of its log:"
        tail -20 "$logs/llama-build.log"
    fi
}

# llama-bench (tg128, pp512) and llama-batched-bench (64 x 128+128) on one
# file: writes $logs/llama-bench-NAME.json and $logs/llama-batched-NAME.log.
llama_measure() { # name model
    "$llama_bench" -m "$2" -ngl 99 -fa 1 -p 512 -n 128 -o json \
        >"$logs/llama-bench-$1.json" 2>"$logs/llama-bench-$1.err"
    "${llama_bench%/*}/llama-batched-bench" -m "$2" -ngl 99 -fa on -c 20480 \
        -npp 128 -ntg 128 -npl 64 >"$logs/llama-batched-$1.log" 2>&1
}

arch_benches=()
if part archbench && [[ -x "$bin" ]]; then
    build_llama
    for preset in llama3.2-1b qwen3-0.6b; do
        model="$models/more/$preset-q4_k_m.gguf"
        [[ -f "$model" ]] || continue
        log="$logs/bench-$preset.log"
        if timeout 300 "$bin" bench --device cuda -m "$model" --json >"$log" 2>"$log.err"; then
            ours="$(python3 - "$log" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
print(f"tg128 {b['decode_tokens_per_second']:.0f}  pp512 {b['prefill_tokens_per_second']:.0f}  "
      f"{b['streams']} streams {b['streams_generated_tokens_per_second']:.0f} tok/s")
EOF
)"
        else
            ours="FAILED: $(tail -1 "$log.err")"
            failed=1
        fi
        theirs="not built"
        if [[ -n "$llama_bench" ]]; then
            llama_measure "$preset" "$model"
            theirs="$(python3 - "$logs/llama-bench-$preset.json" "$logs/llama-batched-$preset.log" <<'EOF'
import json, re, sys
try:
    runs = json.load(open(sys.argv[1]))
    tg = next(r["avg_ts"] for r in runs if r["n_gen"] > 0)
    pp = next(r["avg_ts"] for r in runs if r["n_prompt"] > 0)
    out = f"tg128 {tg:.0f}  pp512 {pp:.0f}"
except Exception as e:
    out = f"llama-bench failed ({e})"
rows = [l for l in open(sys.argv[2]) if re.match(r"^\|\s+128 \|", l)]
if rows:
    cells = [c.strip() for c in rows[-1].strip().strip("|").split("|")]
    out += f"  64 streams: S_TG {float(cells[-3]):.0f}, S {float(cells[-1]):.0f} tok/s (batched-bench)"
print(out)
EOF
)"
        fi
        arch_benches+=("$preset Q4_K_M: worker-orcd $ours | llama.cpp $theirs")
    done
fi

# Model sizes: the bandwidth fraction of decode, beside llama.cpp.
size_rows=()
if part sizes && [[ -x "$bin" ]]; then
    build_llama
    for size in ${GPU_CHECK_SIZES:-0.5b 1.5b 7b}; do
        preset="qwen2.5-$size"
        model="$models/more/$preset-q4_k_m.gguf"
        [[ $size == 0.5b ]] && model="$models/unit/$preset-q4_k_m.gguf"
        synth "$preset" Q4_K_M "$model"
        [[ -f "$model" ]] || continue
        log="$logs/bench-$preset.log"
        if ! timeout 500 "$bin" bench --device cuda -m "$model" --loads 2 --json >"$log" 2>"$log.err"; then
            size_rows+=("$preset: FAILED $(tail -1 "$log.err")")
            failed=1
            continue
        fi
        [[ -n "$llama_bench" ]] && llama_measure "$preset" "$model"
        size_rows+=("$(python3 - "$preset" "$log" "$logs/llama-bench-$preset.json" "$logs/llama-batched-$preset.log" <<'EOF'
import json, re, sys
name, ours, bench, batched = sys.argv[1:]
b = json.load(open(ours))
tg, pp, st = b["decode_tokens_per_second"], b["prefill_tokens_per_second"], b["streams_generated_tokens_per_second"]
size = b["decode_weight_bytes"]
peak = b["load"].get("peak_bandwidth_bytes_per_second") or float("nan")
ref = {}
try:
    runs = json.load(open(bench))
    ref["tg"] = next(r["avg_ts"] for r in runs if r["n_gen"] > 0)
    ref["pp"] = next(r["avg_ts"] for r in runs if r["n_prompt"] > 0)
except Exception:
    pass
try:
    rows = [l for l in open(batched) if re.match(r"^\|\s+128 \|", l)]
    ref["st"] = float([c.strip() for c in rows[-1].strip().strip("|").split("|")][-1])
except Exception:
    pass
def cell(v, key):
    r = ref.get(key)
    return f"{v:.0f}" + (f" / {r:.0f} ({v / r:.2f}x)" if r else " / -")
print(f"{name:<13} {size / 1e6:6.0f} MB  tg128 {cell(tg, 'tg'):<21} {size * tg / 1e9:5.0f} GB/s {100 * size * tg / peak:5.1f}% of peak  "
      f"pp512 {cell(pp, 'pp'):<24} 64 streams {cell(st, 'st'):<22} first load {b['load']['load_seconds_all'][0]:.3f} s"
      + "".join(f" ({m.group(1)})" for m in [re.search(r"\((device [^)]*)\)", b["load"].get("first_summary", ""))] if m))
EOF
)")
    done
fi

echo
echo "gpu-check on ${gpu:-an unknown GPU} (logs in $logs)"
printf '%s\n' "${rows[@]}"
grep -h '^gpu-check: ' "$logs"/*.log 2>/dev/null | sed 's/^gpu-check: /  /'
if ((${#selftests[@]})); then
    echo "selftest (GPU vs CPU backend):"
    printf '  %s\n' "${selftests[@]}"
fi
if ((${#generates[@]})); then
    echo "generate --device cuda, $(basename "$gen_model"), 32 tokens:"
    printf '  %s\n' "${generates[@]}"
fi
if ((${#benches[@]})); then
    echo "bench --device cuda, $(basename "$bench_model"):"
    printf '  %s\n' "${benches[@]}"
fi
if ((${#arch_benches[@]})); then
    echo "bench --device cuda beside llama.cpp (same card, same file):"
    printf '  %s\n' "${arch_benches[@]}"
fi
if ((${#size_rows[@]})); then
    echo "Qwen2.5 shapes, Q4_K_M: weights read a decode token; worker-orcd / llama.cpp tok/s (ratio); bandwidth of decode:"
    printf '  %s\n' "${size_rows[@]}"
fi
if ((${#serving[@]})); then
    echo "bench --serving --device cuda, $(basename "$serving_model"):"
    printf '  %s\n' "${serving[@]}"
fi
prefix_lines="$(grep -h '^  prefix cache: ' "$logs"/selftest-*.log 2>/dev/null | sort | uniq -c | sed 's/^ */  /')"
if [[ -n "$prefix_lines" ]]; then
    echo "selftest prefix-cache check (count of runs per line):"
    echo "$prefix_lines"
fi
if [[ -n "${comparison:-}" ]]; then
    echo "against llama.cpp on the same card (its figures from the speed issue) and the targets:"
    echo "$comparison"
fi
exit $failed
