//! `selftest`: the GPU backend against the CPU backend on one model
//! (`cuda::selftest`), printed as it goes; exits non-zero on a failed check.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use cuda::selftest::{selftest, SelftestOptions};
use gguf::GgufFile;
use tokenizer::Tokenizer;

/// The prompts every run compares on.
const PROMPTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog. Then it",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
];

#[derive(Args, Clone, Debug)]
pub struct SelftestArgs {
    /// GGUF model file [default: SmolLM2-135M-Instruct from the model cache].
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub gpu: crate::run::GpuArgs,
    /// Teacher-forced decode steps after each prompt.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Worker threads for the CPU side [default: all cores].
    #[arg(short, long)]
    pub threads: Option<usize>,
}

pub fn run_selftest(args: &SelftestArgs) -> Result<()> {
    crate::run::set_threads(args.threads)?;
    let path = crate::run::resolve_model(&args.model)?;
    let file =
        Arc::new(GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?);
    let tokenizer = Tokenizer::from_gguf(file.metadata()).context("loading the tokenizer")?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true, false))
        .collect();
    let options = SelftestOptions {
        device: args.gpu.options(0, 0, None).device,
        weights: args.gpu.options(0, 0, None).weights,
        prompts,
        steps: args.steps,
        fuse: !args.gpu.unfused,
    };
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    println!("selftest {name}, {} weights", args.gpu.weights);
    let summary = selftest(file, &options, &mut |line| println!("  {line}"))?;
    let verdict = if summary.failures.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    for failure in &summary.failures {
        println!("  failed: {failure}");
    }
    println!(
        "selftest: {verdict} {name} {}: logits rel-L2 max {:.2e}, top token {}/{} (+{} within margin), greedy {}/{}, hidden state rel-L2 max {:.2e}",
        args.gpu.weights,
        summary.max_logits_rel_l2,
        summary.argmax_agree,
        summary.comparisons,
        summary.argmax_close_calls,
        summary.greedy_match.0,
        summary.greedy_match.1,
        summary.max_layer_rel_l2,
    );
    if !summary.failures.is_empty() {
        bail!("{} check(s) failed", summary.failures.len());
    }
    Ok(())
}
