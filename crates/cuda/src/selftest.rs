//! The GPU checked against the CPU backend on the same model and prompts:
//! where a difference starts (every step of layer 0 and every layer's output
//! against a traced CPU pass), the last position's logits of a batch of
//! prompts, 32 teacher-forced decode steps of that batch (the CPU's greedy
//! tokens fed to both), greedy decoding on the GPU (token ids only; each
//! prompt alone, then all four times over in one batch of 12), and for
//! sliding-window models a prompt longer than the window, prefilled in chunks.
//!
//! A check fails when logits differ by more than [`MAX_LOGITS_REL_L2`]
//! (relative L2) or the GPU's top token differs from the CPU's where the
//! CPU's top two logits are at least [`MIN_MARGIN`] apart.

use std::sync::Arc;

use engine::backend::{masked_argmax, Backend, Segment, TokenMask};
use engine::cpu::{self, CpuModel, Logits};
use engine::sampler::argmax;
use gguf::GgufFile;

use crate::device::DeviceOptions;
use crate::error::Result;
use crate::kv::GpuCache;
use crate::model::{CudaModel, CudaOptions, WeightsMode};

pub const MAX_LOGITS_REL_L2: f64 = 1e-2;
pub const MIN_MARGIN: f32 = 0.05;
/// Positions each sequence may use.
const CONTEXT: usize = 1024;

#[derive(Clone, Debug)]
pub struct SelftestOptions {
    pub device: DeviceOptions,
    pub weights: WeightsMode,
    /// Token ids of each prompt (at least one).
    pub prompts: Vec<Vec<u32>>,
    /// Teacher-forced decode steps after each prompt.
    pub steps: usize,
    /// Fused decode kernels (as served) or not.
    pub fuse: bool,
}

/// What the checks found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub comparisons: usize,
    pub max_logits_rel_l2: f64,
    /// Comparisons whose top tokens agree.
    pub argmax_agree: usize,
    /// Disagreements where the CPU's margin was below MIN_MARGIN (allowed).
    pub argmax_close_calls: usize,
    /// Greedy tokens the GPU produced that match the CPU's, of how many.
    pub greedy_match: (usize, usize),
    /// Largest relative error of any layer's output in the trace.
    pub max_layer_rel_l2: f64,
    pub failures: Vec<String>,
}

impl Summary {
    fn compare(&mut self, what: &str, gpu: &[f32], cpu: &[f32]) -> f64 {
        let rel = rel_l2(gpu, cpu);
        self.comparisons += 1;
        if rel.is_nan() || rel > self.max_logits_rel_l2 {
            self.max_logits_rel_l2 = if rel.is_nan() { f64::INFINITY } else { rel };
        }
        if rel.is_nan() || rel > MAX_LOGITS_REL_L2 {
            self.failures.push(format!(
                "{what}: logits rel-L2 {rel:.3e} > {MAX_LOGITS_REL_L2:.0e}"
            ));
        }
        let (g, c) = (argmax(gpu), argmax(cpu));
        let margin = top_margin(cpu);
        if g == c {
            self.argmax_agree += 1;
        } else if margin >= MIN_MARGIN {
            self.failures.push(format!(
                "{what}: GPU top token {g} ≠ CPU {c} with CPU margin {margin:.3}"
            ));
        } else {
            self.argmax_close_calls += 1;
        }
        rel
    }
}

/// ‖a − b‖ / ‖b‖, in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (diff / norm).sqrt()
}

/// Copies of the prompts in the large greedy batch: 3 prompts × 4 = 12
/// sequences, past the mat-vec kernels' 8 rows.
const GREEDY_COPIES: usize = 4;

/// One segment per cache, each with its tokens and the last position's
/// logits wanted.
fn last_logits<'a, T: AsRef<[u32]>>(
    caches: &'a mut [GpuCache],
    tokens: &'a [T],
) -> Vec<Segment<'a, GpuCache>> {
    caches
        .iter_mut()
        .zip(tokens)
        .map(|(kv, t)| Segment {
            kv,
            tokens: t.as_ref(),
            logits: Logits::Last,
        })
        .collect()
}

/// `steps` greedy tokens after each prompt, all decoded in one batch on the
/// GPU (token ids only coming back).
fn greedy_gpu(gpu: &CudaModel, prompts: &[&Vec<u32>], steps: usize) -> Result<Vec<Vec<u32>>> {
    let mut caches: Vec<GpuCache> = prompts.iter().map(|_| gpu.new_cache(CONTEXT)).collect();
    let mut ids = {
        let mut batch = last_logits(&mut caches, prompts);
        gpu.forward_greedy(&mut batch)?
    };
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let next: Vec<[u32; 1]> = ids.iter().map(|i| [i[0]]).collect();
        for (g, t) in generated.iter_mut().zip(&next) {
            g.push(t[0]);
        }
        let mut batch = last_logits(&mut caches, &next);
        ids = gpu.forward_greedy(&mut batch)?;
    }
    Ok(generated)
}

/// `steps` greedy tokens after running `tokens` on top of what `cache` holds.
fn greedy_after(
    gpu: &CudaModel,
    cache: &mut GpuCache,
    tokens: &[u32],
    steps: usize,
) -> Result<Vec<u32>> {
    let mut next = tokens.to_vec();
    let mut generated = Vec::new();
    for _ in 0..steps {
        let mut batch = [Segment {
            kv: &mut *cache,
            tokens: &next,
            logits: Logits::Last,
        }];
        let id = gpu.forward_greedy(&mut batch)?[0][0];
        generated.push(id);
        next = vec![id];
    }
    Ok(generated)
}

/// The largest logit minus the second largest.
pub fn top_margin(logits: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in logits {
        if l > first {
            second = first;
            first = l;
        } else if l > second {
            second = l;
        }
    }
    first - second
}

/// Runs every check; `log` receives a line per finding as it comes.
pub fn selftest(
    file: Arc<GgufFile>,
    options: &SelftestOptions,
    log: &mut dyn FnMut(&str),
) -> Result<Summary> {
    let mut summary = Summary::default();
    // Both backends for sequences of CONTEXT positions (Phi-3 files with a
    // shorter original context take their long RoPE factors).
    let cpu = CpuModel::load_for_context(file.clone(), Some(CONTEXT))?;
    let spec = cpu.spec().clone();
    let gpu = CudaModel::load(
        file.clone(),
        &CudaOptions {
            device: options.device.clone(),
            weights: options.weights,
            kv_pages: 4 * CONTEXT / engine::kv::PAGE_TOKENS,
            max_batch_tokens: 512,
            progress: false,
            fuse: options.fuse,
            context: Some(CONTEXT),
            ..CudaOptions::default()
        },
    )?;
    log(&format!("{}", gpu.report()));
    let prompts = &options.prompts;

    // 1. Where differences start: one prompt, traced on both sides.
    let mut ref_cache = cpu.new_cache(CONTEXT);
    let (ref_logits, ref_trace) = cpu.forward_traced(&mut ref_cache, &prompts[0])?;
    drop(ref_cache);
    let mut cache = gpu.new_cache(CONTEXT);
    let (gpu_logits, gpu_trace) = gpu.forward_traced(&mut cache, &prompts[0])?;
    drop(cache);
    let mut layer0 = Vec::new();
    let mut layers = Vec::new();
    for ((name, want), (gpu_name, got)) in ref_trace.iter().zip(&gpu_trace) {
        let rel = if name == gpu_name {
            rel_l2(got, want)
        } else {
            f64::INFINITY
        };
        if let Some(step) = name.strip_prefix("layer0.").filter(|s| *s != "out") {
            layer0.push(format!("{step} {rel:.1e}"));
        } else {
            layers.push(format!("{rel:.1e}"));
            if rel.is_nan() || rel > summary.max_layer_rel_l2 {
                summary.max_layer_rel_l2 = if rel.is_nan() { f64::INFINITY } else { rel };
            }
        }
    }
    if ref_trace.len() != gpu_trace.len() {
        summary.failures.push(format!(
            "trace: {} GPU entries, {} reference entries",
            gpu_trace.len(),
            ref_trace.len()
        ));
    }
    log(&format!(
        "prompt 0 ({} tokens), layer 0 rel-L2: {}",
        prompts[0].len(),
        layer0.join(", ")
    ));
    log(&format!(
        "hidden state rel-L2 after each layer: {}",
        layers.join(" ")
    ));

    // 2. A batch of prompts, then teacher-forced decode steps.
    let mut cpu_caches: Vec<_> = prompts.iter().map(|_| cpu.new_cache(CONTEXT)).collect();
    let mut gpu_caches: Vec<GpuCache> = prompts.iter().map(|_| gpu.new_cache(CONTEXT)).collect();
    let mut cpu_logits = {
        let mut batch: Vec<cpu::Segment<'_>> = cpu_caches
            .iter_mut()
            .zip(prompts)
            .map(|(kv, p)| cpu::Segment {
                kv,
                tokens: p,
                logits: Logits::Last,
            })
            .collect();
        cpu.forward_batch(&mut batch)?
    };
    let gpu_prefill = {
        let mut batch = last_logits(&mut gpu_caches, prompts);
        gpu.forward_logits(&mut batch)?
    };
    let rel = rel_l2(&gpu_logits, &cpu_logits[0]);
    log(&format!(
        "prompt 0 logits rel-L2: traced GPU pass vs batched CPU pass {rel:.2e}; traced CPU pass vs batched CPU pass {:.2e}",
        rel_l2(&ref_logits, &cpu_logits[0])
    ));
    let mut per_prompt: Vec<(f64, usize, usize)> = vec![(0.0, 0, 0); prompts.len()];
    for (i, (g, c)) in gpu_prefill.iter().zip(&cpu_logits).enumerate() {
        let rel = summary.compare(&format!("prompt {i} prefill"), g, c);
        per_prompt[i].0 = per_prompt[i].0.max(rel);
        per_prompt[i].1 += usize::from(argmax(g) == argmax(c));
        per_prompt[i].2 += 1;
    }
    let mut cpu_tokens: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut cpu_margins: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    for step in 0..options.steps {
        let next: Vec<[u32; 1]> = cpu_logits.iter().map(|l| [argmax(l)]).collect();
        for (i, l) in cpu_logits.iter().enumerate() {
            cpu_tokens[i].push(next[i][0]);
            cpu_margins[i].push(top_margin(l));
        }
        cpu_logits = {
            let mut batch: Vec<cpu::Segment<'_>> = cpu_caches
                .iter_mut()
                .zip(&next)
                .map(|(kv, t)| cpu::Segment {
                    kv,
                    tokens: t,
                    logits: Logits::Last,
                })
                .collect();
            cpu.forward_batch(&mut batch)?
        };
        let gpu_step = {
            let mut batch = last_logits(&mut gpu_caches, &next);
            gpu.forward_logits(&mut batch)?
        };
        for (i, (g, c)) in gpu_step.iter().zip(&cpu_logits).enumerate() {
            let rel = summary.compare(&format!("prompt {i} step {}", step + 1), g, c);
            per_prompt[i].0 = per_prompt[i].0.max(rel);
            per_prompt[i].1 += usize::from(argmax(g) == argmax(c));
            per_prompt[i].2 += 1;
        }
    }
    for (i, (rel, agree, total)) in per_prompt.iter().enumerate() {
        log(&format!(
            "prompt {i} ({} tokens) + {} teacher-forced steps: max logits rel-L2 {rel:.2e}, top token agrees {agree}/{total}",
            prompts[i].len(),
            options.steps
        ));
    }
    drop(gpu_caches);

    // 3. Greedy decoding on the GPU, only ids coming back: each prompt
    // alone (steps of one token, through the mat-vec kernels), then all of
    // them four times over in one batch (steps of 12 tokens, through
    // cuBLAS, replayed as CUDA graphs as a busy server's are).
    for copies in [1, GREEDY_COPIES] {
        let sequences: Vec<&Vec<u32>> = (0..copies).flat_map(|_| prompts.iter()).collect();
        let generated = if copies == 1 {
            sequences
                .iter()
                .map(|p| Ok(greedy_gpu(&gpu, &[*p], options.steps)?.remove(0)))
                .collect::<Result<Vec<_>>>()?
        } else {
            greedy_gpu(&gpu, &sequences, options.steps)?
        };
        let mut matched = (0, 0);
        for (s, gpu_seq) in generated.iter().enumerate() {
            let i = s % prompts.len();
            let cpu_seq = &cpu_tokens[i];
            let same = gpu_seq
                .iter()
                .zip(cpu_seq)
                .take_while(|(a, b)| a == b)
                .count();
            summary.greedy_match.0 += same;
            summary.greedy_match.1 += cpu_seq.len();
            matched.0 += same;
            matched.1 += cpu_seq.len();
            let name = if copies == 1 {
                format!("prompt {i} greedy")
            } else {
                format!("prompt {i} greedy (sequence {s} of {})", sequences.len())
            };
            if same < cpu_seq.len() {
                let margin = cpu_margins[i][same];
                log(&format!(
                    "{name}: GPU matches the CPU's first {same} of {} tokens (then {} vs {}, CPU margin {margin:.3})",
                    cpu_seq.len(),
                    gpu_seq[same],
                    cpu_seq[same]
                ));
                if margin >= MIN_MARGIN {
                    summary.failures.push(format!(
                        "{name}: token {same} differs where the CPU's margin is {margin:.3}"
                    ));
                }
            } else if copies == 1 {
                log(&format!("{name}: GPU matches all {same} CPU tokens"));
            }
        }
        if copies > 1 {
            log(&format!(
                "{} sequences decoded together: {} of {} greedy tokens match the CPU's",
                sequences.len(),
                matched.0,
                matched.1
            ));
        }
    }

    // 4. A prompt longer than the sliding window, prefilled in chunks.
    if let Some(window) = spec.sliding_window {
        let length = (window + 64).min(CONTEXT - 1);
        let tokens: Vec<u32> = (0..length)
            .map(|i| ((i * 7919 + 13) % spec.vocab_size) as u32)
            .collect();
        let mut cpu_cache = cpu.new_cache(CONTEXT);
        let cpu_long = cpu.forward(&mut cpu_cache, &tokens, Logits::Last)?;
        let mut cache = gpu.new_cache(CONTEXT);
        let mut gpu_long = Vec::new();
        for chunk in tokens.chunks(512) {
            let last = engine::backend::Cache::len(&cache) + chunk.len() == length;
            let mut batch = [Segment {
                kv: &mut cache,
                tokens: chunk,
                logits: if last { Logits::Last } else { Logits::None },
            }];
            gpu_long = gpu.forward_logits(&mut batch)?.pop().unwrap_or_default();
        }
        let rel = summary.compare(
            &format!("{length}-token prompt (window {window})"),
            &gpu_long,
            &cpu_long,
        );
        log(&format!(
            "{length}-token prompt past the {window}-token window, prefilled in chunks of 512: logits rel-L2 {rel:.2e}, top token {}",
            if argmax(&gpu_long) == argmax(&cpu_long) { "agrees" } else { "differs" }
        ));
    }

    // 5. The prefix cache: a sequence forked from another's pages decodes
    // what it decodes cold, and neither disturbs the other.
    // 37 positions: two whole pages shared, the third copied.
    let shared: Vec<u32> = prompts.iter().flatten().copied().cycle().take(37).collect();
    let with = |tail: &[u32]| [shared.as_slice(), tail].concat();
    let (a, b) = (with(&prompts[0]), with(&prompts[prompts.len() - 1]));
    let cold_a = greedy_after(&gpu, &mut gpu.new_cache(CONTEXT), &a, options.steps)?;
    let cold_b = greedy_after(&gpu, &mut gpu.new_cache(CONTEXT), &b, options.steps)?;
    let mut cache_a = gpu.new_cache(CONTEXT);
    let head_a = greedy_after(&gpu, &mut cache_a, &a, options.steps / 2)?;
    let free = gpu.kv_pages().1;
    let mut cache_b = gpu.fork(&cache_a, shared.len(), None, CONTEXT)?;
    let reused = engine::backend::Cache::len(&cache_b);
    // one page taken: the copy of the partly used one
    let shares = gpu.kv_pages().1 + 1 == free && reused == shared.len();
    let warm_b = greedy_after(&gpu, &mut cache_b, &b[reused..], options.steps)?;
    // A resumes after B wrote its own pages.
    let last_a = *head_a.last().unwrap_or(&a[a.len() - 1]);
    let tail_a = greedy_after(
        &gpu,
        &mut cache_a,
        &[last_a],
        options.steps - options.steps / 2,
    )?;
    let resumed_a: Vec<u32> = head_a.iter().chain(&tail_a).copied().collect();
    log(&format!(
        "prefix cache: a fork reusing {reused} of {} shared positions (whole pages shared, the last copied: {shares}) decodes {} of {} greedy tokens as cold; its source, resumed after it, {} of {}",
        shared.len(),
        common_prefix(&warm_b, &cold_b),
        cold_b.len(),
        common_prefix(&resumed_a, &cold_a),
        cold_a.len()
    ));
    if warm_b != cold_b || resumed_a != cold_a || !shares {
        summary.failures.push(format!(
            "prefix cache: greedy output with a cache hit differs from the cold run (fork {}/{}, source {}/{}, pages shared: {shares})",
            common_prefix(&warm_b, &cold_b),
            cold_b.len(),
            common_prefix(&resumed_a, &cold_a),
            cold_a.len()
        ));
    }

    // 6. Greedy tokens within a mask (structured output) are picked on the
    // GPU as the host picks them from the same logits: a batch with no
    // mask, a sparse mask and a mask of a few tokens.
    let masked = masked_agreement(&gpu, prompts, options.steps)?;
    log(&format!(
        "masked greedy: {} of {} tokens picked on the GPU equal the host's pick from its logits",
        masked.0, masked.1
    ));
    if masked.0 != masked.1 {
        summary.failures.push(format!(
            "masked greedy: {} of {} GPU picks differ from the host's",
            masked.1 - masked.0,
            masked.1
        ));
    }
    Ok(summary)
}

/// Tokens of `steps` masked greedy steps over the first three prompts where
/// [`Backend::forward_greedy_masked`] agrees with [`masked_argmax`] of
/// [`Backend::forward_logits`] on twin caches, and tokens compared.
fn masked_agreement(gpu: &CudaModel, prompts: &[Vec<u32>], steps: usize) -> Result<(usize, usize)> {
    let prompts: Vec<&Vec<u32>> = prompts.iter().take(3).collect();
    let vocab = gpu.spec().vocab_size;
    let words = vocab.div_ceil(32);
    let mask_of = |segment: usize, step: usize| -> Option<TokenMask> {
        let allowed = |t: usize| match segment {
            0 => true,
            1 => (t * 31 + step).is_multiple_of(5),
            _ => [7, vocab / 3, vocab - 1].contains(&((t + step) % vocab)),
        };
        (segment > 0).then(|| {
            (0..words)
                .map(|w| {
                    (0..32)
                        .filter(|b| w * 32 + b < vocab && allowed(w * 32 + b))
                        .fold(0u32, |m, b| m | 1 << b)
                })
                .collect()
        })
    };
    let mut masked_caches: Vec<GpuCache> = prompts.iter().map(|_| gpu.new_cache(CONTEXT)).collect();
    let mut twin_caches: Vec<GpuCache> = prompts.iter().map(|_| gpu.new_cache(CONTEXT)).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let (mut agree, mut total) = (0, 0);
    for step in 0..steps {
        let masks: Vec<Option<TokenMask>> = (0..prompts.len()).map(|i| mask_of(i, step)).collect();
        let picked = {
            let mut batch = last_logits(&mut masked_caches, &inputs);
            gpu.forward_greedy_masked(&mut batch, &mut || masks.clone())?
        };
        let logits = {
            let mut batch = last_logits(&mut twin_caches, &inputs);
            gpu.forward_logits(&mut batch)?
        };
        for (i, (ids, row)) in picked.iter().zip(&logits).enumerate() {
            let host = masked_argmax(row, masks[i].as_ref());
            total += 1;
            agree += usize::from(ids.first() == Some(&host));
            inputs[i] = vec![host];
        }
    }
    Ok((agree, total))
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
