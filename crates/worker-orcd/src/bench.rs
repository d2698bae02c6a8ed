//! `bench`: load time, prompt-processing and decode speed, medians over repeats.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::backend::{Backend, Segment};
use engine::cpu::{CpuModel, Logits};
use engine::kv::{KvPool, PAGE_TOKENS};
use gguf::GgufFile;
use serde_json::json;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: crate::run::ModelArgs,
    #[command(flatten)]
    pub gpu: crate::run::GpuArgs,
    /// Prompt tokens per prefill measurement (llama-bench's pp).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated per decode measurement (llama-bench's tg).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Tokens already in the cache when prefill and decode are measured
    /// (llama-bench's depth): a prompt after a cached prefix, decode deep
    /// in a context. Filled untimed, in passes of at most `--prompt-tokens`
    /// (at least 512).
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Measurements of each kind; the median is reported (prefill, which
    /// takes milliseconds, is measured at least 30 times).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Prefill measurements [default: the larger of `--repeats` and 30].
    #[arg(long)]
    pub prefill_repeats: Option<usize>,
    /// Concurrent streams for the many-streams measure (0 skips it): each a
    /// `--stream-prompt`-token prompt, then `--gen-tokens` generated, all
    /// streams decoding together in one batch per step [default: 64 on a GPU, 0 on the CPU].
    #[arg(long)]
    pub streams: Option<usize>,
    /// Measure only the many-streams case (for profiling it).
    #[arg(long)]
    pub streams_only: bool,
    /// Prompt tokens of each stream.
    #[arg(long, default_value_t = 128)]
    pub stream_prompt: usize,
    /// Loads of the model measured (the first is a warm-up); the median is
    /// reported.
    #[arg(long, default_value_t = 5)]
    pub loads: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub serving: crate::bench_serving::ServingArgs,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run_bench(args: &BenchArgs) -> Result<()> {
    let path = crate::run::resolve_model(&args.model.model)?;
    crate::run::set_threads(args.model.threads)?;
    if args.serving.serving {
        return run_serving(args, &path);
    }
    let context = args.depth + args.prompt_tokens + args.gen_tokens + 1;
    let load_start = Instant::now();
    let file =
        Arc::new(GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?);
    let weight_bytes = decode_weight_bytes(&file);
    let (device, load_detail, measured) = if args.model.device == "cuda" {
        // Room for the caches a round holds at most: two, or every stream's.
        let stream_context = args.stream_prompt + args.gen_tokens + 1;
        let pages = (2 * context.div_ceil(PAGE_TOKENS))
            .max(streams(args) * stream_context.div_ceil(PAGE_TOKENS));
        let mut options = args
            .gpu
            .options(pages, depth_pass(args).max(streams(args)).max(1), None);
        let mut model = cuda::CudaModel::load(file.clone(), &options)?;
        let mut loads = vec![load_start.elapsed().as_secs_f64()];
        let first_summary = model.report().to_string();
        options.progress = false;
        for _ in 1..args.loads.max(1) {
            drop(model);
            let start = Instant::now();
            model = cuda::CudaModel::load(file.clone(), &options)?;
            loads.push(start.elapsed().as_secs_f64());
        }
        // The first load compiles or reads the kernels and faults the file in.
        let load_secs = if loads.len() > 1 {
            median(loads[1..].to_vec())
        } else {
            loads[0]
        };
        let device = format!(
            "cuda, {}, {} weights",
            model.device().name(),
            args.gpu.weights
        );
        let report = model.report();
        let detail = json!({
            "load_seconds": load_secs,
            "load_seconds_all": loads,
            "upload_gigabytes_per_second": report.upload.gigabytes_per_second(),
            "file_tensor_bytes": report.file_tensor_bytes,
            "weights_bytes": report.weights_bytes,
            "kv_bytes": report.kv_bytes,
            "workspace_bytes": report.workspace_bytes,
            "gpu_used_bytes": report.used_bytes,
            "summary": report.to_string(),
            "first_summary": first_summary,
            "peak_bandwidth_bytes_per_second": model.device().peak_bandwidth().ok(),
        });
        (device, detail, measure(&model, args, context)?)
    } else {
        let model = CpuModel::load(file)?.with_activations(args.model.activations());
        let load_secs = load_start.elapsed().as_secs_f64();
        let device = format!(
            "cpu, {} threads, {} activations",
            rayon::current_num_threads(),
            args.model.cpu_activations
        );
        (
            device,
            json!({ "load_seconds": load_secs }),
            measure(&model, args, context)?,
        )
    };
    let load_secs = load_detail["load_seconds"].as_f64().unwrap_or_default();
    let Measured {
        pp,
        tg,
        streams_decode,
        streams_total,
    } = measured;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": path.display().to_string(),
                "device": device,
                "load": load_detail,
                "load_seconds": load_secs,
                "depth": args.depth,
                "prompt_tokens": args.prompt_tokens,
                "prefill_tokens_per_second": pp,
                "gen_tokens": args.gen_tokens,
                "decode_tokens_per_second": tg,
                "decode_weight_bytes": weight_bytes,
                "repeats": args.repeats,
                "prefill_repeats": prefill_repeats(args),
                "streams": streams(args),
                "stream_prompt_tokens": args.stream_prompt,
                "streams_decode_tokens_per_second": streams_decode,
                "streams_generated_tokens_per_second": streams_total,
                "peak_rss_bytes": peak_rss_bytes(),
            }))?
        );
    } else {
        println!("model      {}", path.display());
        println!("device     {device}");
        println!("load       {load_secs:.3} s");
        if let Some(summary) = load_detail["first_summary"].as_str() {
            println!("           first: {summary}");
        }
        if let Some(summary) = load_detail["summary"].as_str() {
            println!("           {summary}");
        }
        let at_depth = if args.depth > 0 {
            format!(" after {} cached tokens", args.depth)
        } else {
            String::new()
        };
        println!(
            "pp{:<8} {pp:.1} tok/s{at_depth} (median of {}; {:.2} ms a pass)",
            args.prompt_tokens,
            prefill_repeats(args),
            1e3 * args.prompt_tokens as f64 / pp
        );
        println!(
            "tg{:<8} {tg:.1} tok/s{at_depth} (median of {})",
            args.gen_tokens, args.repeats
        );
        let bytes = weight_bytes as f64;
        let peak = load_detail["peak_bandwidth_bytes_per_second"].as_f64();
        println!(
            "           {:.1} MB of weights read a token: {:.0} GB/s{}",
            bytes / 1e6,
            bytes * tg / 1e9,
            peak.map(|p| format!(
                ", {:.1}% of the card's {:.2} TB/s",
                100.0 * bytes * tg / p,
                p / 1e12
            ))
            .unwrap_or_default()
        );
        if streams(args) > 0 {
            println!(
                "streams    {} × (pp{} + tg{}): {streams_total:.1} generated tok/s end to end, \
                 {streams_decode:.1} tok/s while decoding (median of {})",
                streams(args),
                args.stream_prompt,
                args.gen_tokens,
                args.repeats
            );
        }
    }
    Ok(())
}

/// Bytes of weights one decode token reads: every tensor of the file but
/// the token embeddings (one row of them), which the LM head reads whole
/// when the output matrix is tied to them.
fn decode_weight_bytes(file: &GgufFile) -> u64 {
    let tied = file.tensor("output.weight").is_none();
    file.tensors()
        .iter()
        .filter(|t| tied || t.name != "token_embd.weight")
        .map(|t| t.n_bytes)
        .sum()
}

/// The process's peak resident memory (Linux's VmHWM: mapped file pages
/// included), if the platform says.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `bench --serving`: the model behind the scheduler, on either backend.
fn run_serving(args: &BenchArgs, path: &std::path::Path) -> Result<()> {
    use crate::bench_serving::{context, kv_pages, Serving};
    let file =
        Arc::new(GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?);
    let tokenizer = Arc::new(tokenizer::Tokenizer::from_gguf(file.metadata())?);
    let template = tokenizer::ChatTemplate::load(file.metadata(), None).ok();
    let context = context(&args.serving);
    let gpu = args.model.device == "cuda";
    println!("model      {}", path.display());
    fn run<B: engine::backend::Backend>(
        model: B,
        tokenizer: Arc<tokenizer::Tokenizer>,
        template: Option<tokenizer::ChatTemplate>,
        args: &BenchArgs,
    ) -> Result<serde_json::Value> {
        Serving {
            model: Arc::new(model),
            tokenizer,
            template,
            gpu: args.model.device == "cuda",
            step_tokens: args.model.step_tokens,
        }
        .run(&args.serving, args.repeats)
    }
    let figures = if gpu {
        let options = args.gpu.options(
            kv_pages(&args.serving, true),
            args.model.step_tokens,
            Some(context),
        );
        let model = cuda::CudaModel::load(file, &options)?;
        println!(
            "device     cuda, {}, {} weights",
            model.device().name(),
            args.gpu.weights
        );
        run(model, tokenizer, template, args)?
    } else {
        let model = CpuModel::load_for_context(file, Some(context))?
            .with_activations(args.model.activations());
        println!(
            "device     cpu, {} threads, {} activations",
            rayon::current_num_threads(),
            args.model.cpu_activations
        );
        run(model, tokenizer, template, args)?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    }
    Ok(())
}

/// The many-streams measure's stream count (0: skipped): 64 on a GPU and
/// none on the CPU unless `--streams` says.
fn streams(args: &BenchArgs) -> usize {
    args.streams
        .unwrap_or(if args.model.device == "cuda" { 64 } else { 0 })
}

/// Tokens a pass fills the cache with up to `--depth`.
fn depth_pass(args: &BenchArgs) -> usize {
    args.prompt_tokens.max(512)
}

/// Prefill takes milliseconds: at least 30 measurements of it.
fn prefill_repeats(args: &BenchArgs) -> usize {
    args.prefill_repeats.unwrap_or(args.repeats.max(30))
}

/// What [`measure`] found, tokens per second, medians.
struct Measured {
    pp: f64,
    tg: f64,
    /// Generated tokens of all streams over the decode steps' time.
    streams_decode: f64,
    /// Generated tokens of all streams over the whole run, prompts included.
    streams_total: f64,
}

/// Median prefill and decode speed (tokens per second) of `model`: one
/// warm-up round, then measured ones. Decode is greedy, the token chosen by
/// the backend. Each forward pass returns only when its work is done, so
/// host clocks time the device's work.
fn measure<B: Backend>(model: &B, args: &BenchArgs, context: usize) -> Result<Measured> {
    let vocab = model.spec().vocab_size;
    // Token ids spread over the vocabulary; their values do not change the cost.
    let token = |i: usize| ((i * 7919 + 13) % vocab) as u32;
    let prompt: Vec<u32> = (0..args.prompt_tokens).map(token).collect();
    let stream_context = args.stream_prompt + args.gen_tokens + 1;
    let pool = KvPool::for_positions(
        (2 * context).max(streams(args) * stream_context.next_multiple_of(PAGE_TOKENS)),
    );
    let step = |kv: &mut B::Cache, tokens: &[u32]| -> Result<u32> {
        let mut batch = [Segment {
            kv,
            tokens,
            logits: Logits::Last,
        }];
        let ids = model.forward_greedy(&mut batch)?;
        Ok(ids[0][0])
    };
    // The cache at `--depth`, filled untimed.
    let deep_cache = || -> Result<B::Cache> {
        let mut kv = model.new_cache_in(&pool, context);
        let filler: Vec<u32> = (0..args.depth).map(|i| token(i + 1_000_000)).collect();
        for chunk in filler.chunks(depth_pass(args)) {
            let mut batch = [Segment {
                kv: &mut kv,
                tokens: chunk,
                logits: Logits::None,
            }];
            model.forward_greedy(&mut batch)?;
        }
        Ok(kv)
    };
    let mut prefill = Vec::new();
    let single = !args.streams_only;
    for round in (0..=prefill_repeats(args)).filter(|_| single) {
        let mut kv = deep_cache()?;
        let t = Instant::now();
        step(&mut kv, &prompt)?;
        if round > 0 {
            prefill.push(args.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let mut decode = Vec::new();
    let mut streams_decode = Vec::new();
    let mut streams_total = Vec::new();
    for round in 0..=args.repeats {
        if single {
            let tg = {
                let mut kv = deep_cache()?;
                let mut next = step(&mut kv, &prompt[..1])?;
                let t = Instant::now();
                for _ in 0..args.gen_tokens {
                    next = step(&mut kv, &[next])?;
                }
                args.gen_tokens as f64 / t.elapsed().as_secs_f64()
            };
            if round > 0 {
                decode.push(tg);
            }
        }
        if streams(args) > 0 {
            let (during_decode, total) = many_streams(model, args, &pool, stream_context, &token)?;
            if round > 0 {
                streams_decode.push(during_decode);
                streams_total.push(total);
            }
        }
    }
    let median_or_zero = |v: Vec<f64>| if v.is_empty() { 0.0 } else { median(v) };
    Ok(Measured {
        pp: median_or_zero(prefill),
        tg: median_or_zero(decode),
        streams_decode: median_or_zero(streams_decode),
        streams_total: median_or_zero(streams_total),
    })
}

/// `streams(args)` sequences at once: their prompts prefilled together (in
/// passes of at most `args.prompt_tokens` tokens), then `args.gen_tokens`
/// steps that decode every stream in one batch. Returns generated tokens per
/// second over the decode steps and over the whole run.
fn many_streams<B: Backend>(
    model: &B,
    args: &BenchArgs,
    pool: &KvPool,
    context: usize,
    token: &dyn Fn(usize) -> u32,
) -> Result<(f64, f64)> {
    let n = streams(args);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|s| {
            (0..args.stream_prompt)
                .map(|i| token(s * 1000 + i))
                .collect()
        })
        .collect();
    let mut caches: Vec<B::Cache> = (0..n).map(|_| model.new_cache_in(pool, context)).collect();
    let mut next = vec![0u32; n];
    let start = Instant::now();
    // Prefill: whole prompts, as many per pass as fit.
    let per_pass = (args.prompt_tokens / args.stream_prompt.max(1)).max(1);
    let mut first = 0;
    while first < n {
        let last = (first + per_pass).min(n);
        let mut batch: Vec<Segment<'_, B::Cache>> = caches[first..last]
            .iter_mut()
            .zip(&prompts[first..last])
            .map(|(kv, p)| Segment {
                kv,
                tokens: p,
                logits: Logits::Last,
            })
            .collect();
        let ids = model.forward_greedy(&mut batch)?;
        for (i, id) in ids.iter().enumerate() {
            next[first + i] = id[0];
        }
        first = last;
    }
    let decode_start = Instant::now();
    for _ in 0..args.gen_tokens {
        let fed = next.clone();
        let mut batch: Vec<Segment<'_, B::Cache>> = caches
            .iter_mut()
            .zip(&fed)
            .map(|(kv, t)| Segment {
                kv,
                tokens: std::slice::from_ref(t),
                logits: Logits::Last,
            })
            .collect();
        let ids = model.forward_greedy(&mut batch)?;
        for (i, id) in ids.iter().enumerate() {
            next[i] = id[0];
        }
    }
    let generated = (n * args.gen_tokens) as f64;
    Ok((
        generated / decode_start.elapsed().as_secs_f64(),
        generated / start.elapsed().as_secs_f64(),
    ))
}
