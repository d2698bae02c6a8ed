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
    /// Measurements of each kind; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
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
    let context = args.prompt_tokens + args.gen_tokens + 1;
    let load_start = Instant::now();
    let file =
        Arc::new(GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?);
    let (device, load_detail, (pp, tg)) = if args.model.device == "cuda" {
        // Room for the two caches a round holds at most (prefill, then decode).
        let options = args
            .gpu
            .options(2 * context.div_ceil(PAGE_TOKENS), args.prompt_tokens.max(1));
        let model = cuda::CudaModel::load(file, &options)?;
        let load_secs = load_start.elapsed().as_secs_f64();
        let device = format!(
            "cuda, {}, {} weights",
            model.device().name(),
            args.gpu.weights
        );
        let report = model.report();
        let detail = json!({
            "load_seconds": load_secs,
            "upload_gigabytes_per_second": report.upload.gigabytes_per_second(),
            "file_tensor_bytes": report.file_tensor_bytes,
            "weights_bytes": report.weights_bytes,
            "kv_bytes": report.kv_bytes,
            "workspace_bytes": report.workspace_bytes,
            "gpu_used_bytes": report.used_bytes,
            "summary": report.to_string(),
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
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": path.display().to_string(),
                "device": device,
                "load": load_detail,
                "load_seconds": load_secs,
                "prompt_tokens": args.prompt_tokens,
                "prefill_tokens_per_second": pp,
                "gen_tokens": args.gen_tokens,
                "decode_tokens_per_second": tg,
                "repeats": args.repeats,
            }))?
        );
    } else {
        println!("model      {}", path.display());
        println!("device     {device}");
        println!("load       {load_secs:.3} s");
        if let Some(summary) = load_detail["summary"].as_str() {
            println!("           {summary}");
        }
        println!(
            "pp{:<8} {pp:.1} tok/s (median of {})",
            args.prompt_tokens, args.repeats
        );
        println!(
            "tg{:<8} {tg:.1} tok/s (median of {})",
            args.gen_tokens, args.repeats
        );
    }
    Ok(())
}

/// Median prefill and decode speed (tokens per second) of `model`: one
/// warm-up round, then `args.repeats` measured ones. Decode is greedy, the
/// token chosen by the backend.
fn measure<B: Backend>(model: &B, args: &BenchArgs, context: usize) -> Result<(f64, f64)> {
    let vocab = model.spec().vocab_size;
    // Token ids spread over the vocabulary; their values do not change the cost.
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let pool = KvPool::for_positions(2 * context);
    let step = |kv: &mut B::Cache, tokens: &[u32]| -> Result<u32> {
        let mut batch = [Segment {
            kv,
            tokens,
            logits: Logits::Last,
        }];
        let ids = model.forward_greedy(&mut batch)?;
        Ok(ids[0][0])
    };
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for round in 0..=args.repeats {
        let pp = {
            let mut kv = model.new_cache_in(&pool, context);
            let t = Instant::now();
            step(&mut kv, &prompt)?;
            args.prompt_tokens as f64 / t.elapsed().as_secs_f64()
        };
        let tg = {
            let mut kv = model.new_cache_in(&pool, context);
            let mut next = step(&mut kv, &prompt[..1])?;
            let t = Instant::now();
            for _ in 0..args.gen_tokens {
                next = step(&mut kv, &[next])?;
            }
            args.gen_tokens as f64 / t.elapsed().as_secs_f64()
        };
        if round > 0 {
            prefill.push(pp);
            decode.push(tg);
        }
    }
    Ok((median(prefill), median(decode)))
}
