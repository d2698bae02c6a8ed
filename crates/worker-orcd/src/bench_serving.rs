//! `bench --serving`: the scheduler under traffic, on either backend.
//!
//! - time to first token of a prompt sharing a long prefix with an earlier
//!   one, against the same prompt cold;
//! - the inter-token p99 of running streams (each a run of 32 + 256-token
//!   jobs, so their cost per step stays level) while a long prompt is read,
//!   against their p99 without it, and how far a cancelled long prompt gets
//!   past its cancel;
//! - prompt tokens run per turn of a multi-turn chat (the model's template);
//! - generated tokens per second of many streams with the prefix cache on
//!   and off, prompts sharing nothing;
//! - decode tokens per second with and without a grammar (a JSON array of
//!   integers), alone and with many streams.
//!
//! Prompts are token ids drawn from a fixed generator, so every run and
//! every backend sees the same ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::backend::Backend;
use engine::generate::GenerateParams;
use engine::sampler::SamplingParams;
use engine::scheduler::{self, Event, Finish, Job, SchedulerConfig, SchedulerHandle};
use serde_json::{json, Value};
use tokenizer::{ChatTemplate, Message, Tokenizer};

#[derive(Args, Clone, Debug)]
pub struct ServingArgs {
    /// Run the serving measures instead of the kernel ones.
    #[arg(long)]
    pub serving: bool,
    /// Tokens two prompts share in the time-to-first-token measure.
    #[arg(long, default_value_t = 2000)]
    pub shared_prefix: usize,
    /// Tokens of the long prompt that arrives while streams decode.
    #[arg(long, default_value_t = 4000)]
    pub long_prompt: usize,
    /// Streams decoding while the long prompt arrives.
    #[arg(long, default_value_t = 8)]
    pub decoding_streams: usize,
    /// Turns of the multi-turn chat.
    #[arg(long, default_value_t = 10)]
    pub turns: usize,
    /// Streams of the throughput measure [default: 64 on a GPU, 8 on the CPU].
    #[arg(long)]
    pub throughput_streams: Option<usize>,
    /// The measures to run.
    #[arg(long, value_delimiter = ',', default_value = "ttft,pacing,chat,throughput,constrained",
          value_parser = ["ttft", "pacing", "chat", "throughput", "constrained"])]
    pub measures: Vec<String>,
}

/// Positions each sequence may use: the long prompt and room to spare.
pub fn context(args: &ServingArgs) -> usize {
    (args.long_prompt.max(args.shared_prefix + 64) + 256).next_multiple_of(engine::kv::PAGE_TOKENS)
}

/// KV pages the measures hold at most at once.
pub fn kv_pages(args: &ServingArgs, gpu: bool) -> usize {
    let per_sequence = context(args) / engine::kv::PAGE_TOKENS;
    let sequences = (args.decoding_streams + 2).max(throughput_streams(args, gpu));
    per_sequence * sequences
}

fn throughput_streams(args: &ServingArgs, gpu: bool) -> usize {
    args.throughput_streams.unwrap_or(if gpu { 64 } else { 8 })
}

/// `n` token ids from stream `seed` of a fixed generator, inside `vocab`
/// and clear of the low ids where special tokens usually sit.
fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let low = 300.min(vocab / 2) as u64;
    let span = (vocab as u64 - low).max(1);
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (low + state % span) as u32
        })
        .collect()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn median(v: Vec<f64>) -> f64 {
    percentile(v, 0.5)
}

/// Submit a job; its events arrive with the time each was sent.
fn submit(
    handle: &SchedulerHandle,
    prompt: Vec<u32>,
    params: GenerateParams,
    cancel: &Arc<AtomicBool>,
) -> Result<Receiver<(Instant, Event)>> {
    let (tx, rx) = mpsc::channel();
    handle
        .submit(Job {
            prompt,
            params,
            cancel: cancel.clone(),
            sink: Box::new(move |e| tx.send((Instant::now(), e)).is_ok()),
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(rx)
}

fn wait_end(rx: &Receiver<(Instant, Event)>) -> Result<(Vec<u32>, Finish)> {
    let mut ids = Vec::new();
    for (_, event) in rx.iter() {
        match event {
            Event::Token { id, .. } if id != u32::MAX => ids.push(id),
            Event::End(finish) => return Ok((ids, finish)),
            Event::Error { message } => bail!("{message}"),
            _ => {}
        }
    }
    bail!("the scheduler stopped before the job ended")
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        logprobs: None,
        constraint: None,
    }
}

/// Greedy, with the end-of-generation tokens banned (a stream that must
/// keep decoding).
fn endless(max_tokens: usize, tokenizer: &Tokenizer) -> GenerateParams {
    let mut params = greedy(max_tokens);
    params.sampling.logit_bias = tokenizer.eog_ids().iter().map(|&id| (id, -100.0)).collect();
    params
}

pub struct Serving<B: Backend> {
    pub model: Arc<B>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub gpu: bool,
    pub step_tokens: usize,
}

impl<B: Backend> Serving<B> {
    fn scheduler(
        &self,
        args: &ServingArgs,
        max_running: usize,
        prefix_cache: bool,
    ) -> SchedulerHandle {
        scheduler::spawn(
            self.model.clone(),
            self.tokenizer.clone(),
            SchedulerConfig {
                context: context(args),
                max_running,
                max_queued: 256,
                step_tokens: self.step_tokens,
                kv_pages: kv_pages(args, self.gpu),
                prefix_cache,
            },
        )
        .0
    }

    fn vocab(&self) -> usize {
        self.model.spec().vocab_size
    }

    /// Every measure, printed as it completes; the figures as JSON.
    pub fn run(&self, args: &ServingArgs, repeats: usize) -> Result<Value> {
        let wants = |name: &str| args.measures.iter().any(|m| m == name);
        let ttft = if wants("ttft") {
            self.time_to_first_token(args, repeats.clamp(1, 5))?
        } else {
            Value::Null
        };
        let pacing = if wants("pacing") {
            self.long_prompt_among_streams(args)?
        } else {
            Value::Null
        };
        let chat = if wants("chat") {
            self.multi_turn_chat(args)?
        } else {
            Value::Null
        };
        let throughput = if wants("throughput") {
            self.throughput(args)?
        } else {
            Value::Null
        };
        let constrained = if wants("constrained") {
            self.constrained(args)?
        } else {
            Value::Null
        };
        Ok(json!({
            "constrained": constrained,
            "time_to_first_token": ttft,
            "long_prompt_among_streams": pacing,
            "multi_turn_chat": chat,
            "throughput": throughput,
        }))
    }

    fn time_to_first_token(&self, args: &ServingArgs, repeats: usize) -> Result<Value> {
        let handle = self.scheduler(args, 1, true);
        let (mut cold, mut warm, mut cached) = (Vec::new(), Vec::new(), 0);
        for r in 0..repeats as u64 {
            let prefix = tokens(100 + r, args.shared_prefix, self.vocab());
            let ask = |tail: u64| -> Result<Finish> {
                let mut prompt = prefix.clone();
                prompt.extend(tokens(tail, 16, self.vocab()));
                let never = Arc::new(AtomicBool::new(false));
                Ok(wait_end(&submit(&handle, prompt, greedy(1), &never)?)?.1)
            };
            let first = ask(200 + r)?;
            let second = ask(300 + r)?;
            cold.push(
                first
                    .time_to_first_token
                    .context("no first token")?
                    .as_secs_f64(),
            );
            warm.push(
                second
                    .time_to_first_token
                    .context("no first token")?
                    .as_secs_f64(),
            );
            cached = second.cached_tokens;
        }
        let (cold, warm) = (median(cold), median(warm));
        println!(
            "ttft       {}-token shared prefix + 16: cold {:.1} ms, with the prefix cached {:.1} ms ({cached} tokens reused): {:.1}× lower (median of {repeats})",
            args.shared_prefix,
            cold * 1e3,
            warm * 1e3,
            cold / warm
        );
        Ok(
            json!({"shared_prefix": args.shared_prefix, "cold_ms": cold * 1e3, "cached_ms": warm * 1e3,
                  "ratio": cold / warm, "cached_tokens": cached, "repeats": repeats}),
        )
    }

    fn long_prompt_among_streams(&self, args: &ServingArgs) -> Result<Value> {
        let n = args.decoding_streams;
        let handle = self.scheduler(args, n + 1, true);
        let stop_streams = Arc::new(AtomicBool::new(false));
        // Each stream is a run of jobs of 32 + 256 tokens, the next
        // submitted as one ends, so the streams' contexts (and a decode
        // step's cost) stay the same over the measure. A thread per stream
        // records the token times of each job.
        let collectors: Vec<_> = (0..n as u64)
            .map(|s| {
                let (handle, stop) = (handle.clone(), stop_streams.clone());
                let (tokenizer, vocab) = (self.tokenizer.clone(), self.vocab());
                std::thread::spawn(move || -> Result<Vec<Vec<Instant>>> {
                    let mut jobs = Vec::new();
                    for round in 0.. {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let prompt = tokens(400 + s * 1000 + round, 32, vocab);
                        let rx = submit(&handle, prompt, endless(256, &tokenizer), &stop)?;
                        jobs.push(
                            rx.iter()
                                .filter(|(_, e)| {
                                    matches!(e, Event::Token { id, .. } if *id != u32::MAX)
                                })
                                .map(|(at, _)| at)
                                .collect::<Vec<Instant>>(),
                        );
                    }
                    Ok(jobs)
                })
            })
            .collect();
        // Decode alone for a while: the baseline (and the step timings the
        // chunk sizes are drawn from).
        // Long enough for every stream to have started a second job: the
        // baseline has the same traffic as the measure, but for the long prompt.
        let steps_each = 320;
        let warmup = Instant::now();
        while handle.stats().steps.load(Ordering::Relaxed) < steps_each {
            std::thread::sleep(Duration::from_millis(5));
            if warmup.elapsed() > Duration::from_secs(600) {
                bail!("the streams did not start");
            }
        }
        let baseline_from = Instant::now();
        eprintln!(
            "pacing: streams running after {:.1} s; baseline of {steps_each} steps",
            warmup.elapsed().as_secs_f64()
        );
        let steps = handle.stats().steps.load(Ordering::Relaxed);
        while handle.stats().steps.load(Ordering::Relaxed) < steps + steps_each {
            std::thread::sleep(Duration::from_millis(5));
        }
        let long_from = Instant::now();
        eprintln!(
            "pacing: baseline took {:.1} s; the long prompt goes in",
            (long_from - baseline_from).as_secs_f64()
        );
        let never = Arc::new(AtomicBool::new(false));
        let long = submit(
            &handle,
            tokens(500, args.long_prompt, self.vocab()),
            greedy(1),
            &never,
        )?;
        let (_, long_end) = wait_end(&long)?;
        let long_until = Instant::now();
        eprintln!(
            "pacing: the long prompt was read in {:.1} s; a second one to cancel",
            (long_until - long_from).as_secs_f64()
        );

        // A second long prompt, cancelled once its prefill has begun.
        let cancel = Arc::new(AtomicBool::new(false));
        let before = handle.stats().prefill_tokens.load(Ordering::Relaxed);
        let doomed = submit(
            &handle,
            tokens(600, args.long_prompt, self.vocab()),
            greedy(1),
            &cancel,
        )?;
        while handle.stats().prefill_tokens.load(Ordering::Relaxed) == before {
            std::thread::sleep(Duration::from_micros(200));
        }
        let read_at_cancel = handle.stats().prefill_tokens.load(Ordering::Relaxed);
        let cancelled_at = Instant::now();
        cancel.store(true, Ordering::Release);
        let (_, doomed_end) = wait_end(&doomed)?;
        let cancel_ms = cancelled_at.elapsed().as_secs_f64() * 1e3;
        let past_cancel = handle.stats().prefill_tokens.load(Ordering::Relaxed) - read_at_cancel;
        stop_streams.store(true, Ordering::Release);
        eprintln!("pacing: cancelled in {cancel_ms:.1} ms; stopping the streams");

        let (mut base, mut during) = (Vec::new(), Vec::new());
        for collector in collectors {
            for times in collector.join().expect("collector thread")? {
                for pair in times.windows(2) {
                    let gap = (pair[1] - pair[0]).as_secs_f64();
                    if pair[0] >= baseline_from && pair[1] <= long_from {
                        base.push(gap);
                    } else if pair[1] > long_from && pair[0] < long_until {
                        during.push(gap);
                    }
                }
            }
        }
        let (p99_base, p99_during) = (
            percentile(base.clone(), 0.99),
            percentile(during.clone(), 0.99),
        );
        println!(
            "pacing     {n} streams decoding, inter-token p99 {:.1} ms; while a {}-token prompt is read ({:.2} s to its first token): {:.1} ms ({:.2}×; {} and {} gaps)",
            p99_base * 1e3,
            args.long_prompt,
            long_end.time_to_first_token.unwrap_or_default().as_secs_f64(),
            p99_during * 1e3,
            p99_during / p99_base,
            base.len(),
            during.len()
        );
        println!(
            "cancel     a {}-token prompt cancelled after {read_at_cancel_rel} prompt tokens: ended in {cancel_ms:.1} ms, {past_cancel} prompt tokens run after the cancel ({:?})",
            args.long_prompt,
            doomed_end.stop_reason,
            read_at_cancel_rel = read_at_cancel - before,
        );
        Ok(json!({"streams": n, "long_prompt": args.long_prompt,
                  "p99_ms": p99_base * 1e3, "p99_during_prefill_ms": p99_during * 1e3,
                  "p99_ratio": p99_during / p99_base,
                  "long_prompt_ttft_s": long_end.time_to_first_token.unwrap_or_default().as_secs_f64(),
                  "cancel_ms": cancel_ms, "prompt_tokens_after_cancel": past_cancel}))
    }

    fn multi_turn_chat(&self, args: &ServingArgs) -> Result<Value> {
        let Some(template) = &self.template else {
            println!("chat       skipped: the model has no chat template");
            return Ok(Value::Null);
        };
        let handle = self.scheduler(args, 1, true);
        let words = [
            "river", "lantern", "orchard", "compass", "harbor", "meadow", "signal", "granite",
        ];
        let mut messages = vec![Message::new("system", "You are a brief assistant.")];
        let mut previous = 0; // tokens of the last prompt and its reply
        let mut turns = Vec::new();
        for turn in 0..args.turns {
            let word = words[turn % words.len()];
            messages.push(Message::new(
                "user",
                format!("Turn {turn}: say something about a {word}."),
            ));
            let text = template.render(&messages, true)?;
            let prompt = self.tokenizer.encode(&text, true, true);
            let new = prompt.len().saturating_sub(previous);
            let before = handle.stats().prefill_tokens.load(Ordering::Relaxed);
            let never = Arc::new(AtomicBool::new(false));
            let (ids, finish) = wait_end(&submit(&handle, prompt.clone(), greedy(24), &never)?)?;
            let ran = handle.stats().prefill_tokens.load(Ordering::Relaxed) - before;
            messages.push(Message::new("assistant", finish.text.clone()));
            previous = prompt.len() + ids.len();
            turns.push(
                json!({"prompt_tokens": prompt.len(), "new_tokens": new, "ran": ran,
                              "cached": finish.cached_tokens}),
            );
        }
        let line: Vec<String> = turns
            .iter()
            .map(|t| format!("{}/{}", t["ran"], t["new_tokens"]))
            .collect();
        println!(
            "chat       {} turns, prompt tokens run / new since the last turn's prompt and reply: {}",
            args.turns,
            line.join(" ")
        );
        Ok(json!({ "turns": turns }))
    }

    /// Decode speed with a grammar against without, greedy, alone and with
    /// many streams: generated tokens over the time after each first token.
    fn constrained(&self, args: &ServingArgs) -> Result<Value> {
        let grammars = engine::constraint::Grammars::new(self.tokenizer.clone(), self.vocab())
            .map_err(anyhow::Error::msg)?;
        // At least 64 items (two tokens or more each): no stream can close
        // its array within the 128 tokens, so the constrained streams run
        // as long as the free ones and the batch keeps its size (streams
        // ending early made the step smaller and the rate lower for that
        // reason alone).
        let grammar = engine::constraint::Grammar::JsonSchema(
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 64}),
        );
        let mut figures = Vec::new();
        for n in [1, throughput_streams(args, self.gpu)] {
            let handle = self.scheduler(args, n, false);
            // Generated tokens a second, and tokens a stream on average.
            let rate = |constrained: bool| -> Result<(f64, f64)> {
                let never = Arc::new(AtomicBool::new(false));
                let jobs: Vec<_> = (0..n as u64)
                    .map(|s| {
                        let mut params = greedy(128);
                        if constrained {
                            params.constraint =
                                Some(grammars.compile(&grammar).map_err(anyhow::Error::msg)?);
                        }
                        submit(&handle, tokens(700 + s, 32, self.vocab()), params, &never)
                    })
                    .collect::<Result<_>>()?;
                let (mut tokens_out, mut seconds) = (0, 0f64);
                for rx in &jobs {
                    let finish = wait_end(rx)?.1;
                    tokens_out += finish.tokens_out.saturating_sub(1);
                    seconds = seconds.max(finish.decode_time.as_secs_f64());
                }
                Ok((tokens_out as f64 / seconds, tokens_out as f64 / n as f64))
            };
            if self.gpu {
                // A first round of each captures the CUDA graph of every
                // step shape it meets (constrained streams end at different
                // steps, so they meet many), as a serving worker has them.
                rate(false)?;
                rate(true)?;
            }
            let (plain, plain_len) = rate(false)?;
            let (with_grammar, grammar_len) = rate(true)?;
            println!(
                "grammar    {n} stream(s), greedy decode: {plain:.1} tok/s free, {with_grammar:.1} under a JSON schema ({:+.1}%; {plain_len:.0} and {grammar_len:.0} tokens a stream)",
                (with_grammar / plain - 1.0) * 100.0
            );
            figures.push(json!({"streams": n, "free_tokens_per_second": plain,
                                "constrained_tokens_per_second": with_grammar,
                                "free_tokens_per_stream": plain_len,
                                "constrained_tokens_per_stream": grammar_len}));
        }
        Ok(Value::Array(figures))
    }

    fn throughput(&self, args: &ServingArgs) -> Result<Value> {
        let n = throughput_streams(args, self.gpu);
        let mut rates = [Vec::new(), Vec::new()];
        for round in 0..4u64 {
            let cache_on = round % 2 == 1;
            let handle = self.scheduler(args, n, cache_on);
            let never = Arc::new(AtomicBool::new(false));
            let start = Instant::now();
            let jobs: Vec<_> = (0..n as u64)
                .map(|s| {
                    submit(
                        &handle,
                        tokens(1000 * (round + 1) + s, 128, self.vocab()),
                        greedy(128),
                        &never,
                    )
                })
                .collect::<Result<_>>()?;
            let mut generated = 0;
            for rx in &jobs {
                generated += wait_end(rx)?.1.tokens_out;
            }
            rates[usize::from(cache_on)].push(generated as f64 / start.elapsed().as_secs_f64());
        }
        let (off, on) = (median(rates[0].clone()), median(rates[1].clone()));
        println!(
            "throughput {n} streams × (128 + 128), no shared prefix: {off:.1} tok/s with the prefix cache off, {on:.1} on ({:+.1}%)",
            (on / off - 1.0) * 100.0
        );
        Ok(
            json!({"streams": n, "cache_off_tokens_per_second": off, "cache_on_tokens_per_second": on,
                  "change": on / off - 1.0, "rounds": rates}),
        )
    }
}
