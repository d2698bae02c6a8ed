//! `bench`: load time, prompt-processing and decode speed, medians over repeats.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::cpu::{CpuModel, Logits};
use engine::sampler::argmax;
use gguf::GgufFile;
use serde_json::json;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: crate::run::ModelArgs,
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
    let load_start = Instant::now();
    let file =
        Arc::new(GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?);
    let model = CpuModel::load(file)?.with_activations(args.model.activations());
    let load_secs = load_start.elapsed().as_secs_f64();
    let spec = model.spec().clone();
    let context = args.prompt_tokens + args.gen_tokens + 1;
    // Token ids spread over the vocabulary; their values do not change the cost.
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|i| ((i * 7919 + 13) % spec.vocab_size) as u32)
        .collect();

    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    // One warm-up of each, then the measured repeats.
    for round in 0..=args.repeats {
        let mut kv = model.new_cache(context);
        let t = Instant::now();
        model.forward(&mut kv, &prompt, Logits::Last)?;
        let pp = args.prompt_tokens as f64 / t.elapsed().as_secs_f64();

        let mut kv = model.new_cache(context);
        let mut logits = model.forward(&mut kv, &prompt[..1], Logits::Last)?;
        let t = Instant::now();
        for _ in 0..args.gen_tokens {
            let next = argmax(&logits);
            logits = model.forward(&mut kv, &[next], Logits::Last)?;
        }
        let tg = args.gen_tokens as f64 / t.elapsed().as_secs_f64();
        if round > 0 {
            prefill.push(pp);
            decode.push(tg);
        }
    }
    let (pp, tg) = (median(prefill), median(decode));
    let threads = rayon::current_num_threads();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": path.display().to_string(),
                "device": "cpu",
                "activations": args.model.cpu_activations,
                "threads": threads,
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
        println!("device     cpu, {threads} threads, {} activations", args.model.cpu_activations);
        println!("load       {load_secs:.3} s");
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
