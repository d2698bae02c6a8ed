//! Continuous batching: one thread owns the model and runs every request.
//!
//! Requests arrive on a channel, each with a sink for its events and a cancel
//! flag. Each step runs one forward pass over the next token of every
//! decoding sequence plus prompt chunks of sequences still prefilling. While
//! sequences decode, the chunks are sized by trial so that a step takes at
//! most about [`PACE`] times a decode-only step (timed as the scheduler
//! runs), so a long prompt never stalls the streams already running, and a
//! cancel takes effect at the next chunk. A sequence's KV pages are reserved from the
//! shared pool when it is admitted (prompt plus its token limit), so a
//! request that was admitted never fails for lack of room; those that do not
//! fit yet wait in the queue.
//!
//! Prefix cache: a finished sequence's cache is kept (its unused pages given
//! back), and a new prompt that starts with the tokens of a kept or running
//! cache starts from them: it takes a kept cache over when its prompt extends
//! all of it (the next turn of a chat), or forks the shared prefix (a copy on
//! the CPU, shared pages on the GPU). Kept caches are evicted oldest first
//! when an admission needs their pages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokenizer::{StreamDecoder, Tokenizer};

use crate::backend::{Backend, Cache, Segment, TokenMask};
use crate::constraint::Constraint;
use crate::cpu::Logits;
use crate::kv::KvPool;
pub use crate::request::{Event, Finish, Job, Sink};
use crate::request::{StopReason, TokenLogprob, MAX_TOP_LOGPROBS};
use crate::sampler::Sampler;
use crate::stop::StopMatcher;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Positions one sequence may use (prompt plus generated).
    pub context: usize,
    /// Sequences decoding at once.
    pub max_running: usize,
    /// Jobs waiting beyond those; more are refused.
    pub max_queued: usize,
    /// Tokens per forward pass (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// KV pages shared by all sequences.
    pub kv_pages: usize,
    /// Keep finished sequences' caches and start new prompts from the
    /// prefix they share with one.
    pub prefix_cache: bool,
}

/// While sequences decode, a step with prompt chunks aims to take at most
/// this many times a decode-only step (so a stream's inter-token time stays
/// under twice its usual while a long prompt is read).
pub const PACE: f64 = 1.5;

/// Finished caches kept at most (each admission compares its prompt with
/// every one).
const MAX_KEPT: usize = 256;

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the queue is full ({0} jobs waiting)")]
    QueueFull(usize),
    #[error("the scheduler has stopped")]
    Stopped,
}

/// Counters the scheduler keeps up to date, readable from any thread.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Jobs submitted and not yet running: those a free slot will take at
    /// the next step, and those queued behind full slots.
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub steps: AtomicUsize,
    /// Prompt tokens run through the model.
    pub prefill_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead.
    pub prefix_hit_tokens: AtomicU64,
    /// Finished sequences' caches kept for reuse, and the pages they hold
    /// (a page two of them share counts for each).
    pub kept_caches: AtomicUsize,
    pub kept_pages: AtomicUsize,
}

/// The way in: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct SchedulerHandle {
    /// Jobs with the time they were submitted.
    tx: SyncSender<(Job, Instant)>,
    stats: Arc<SchedulerStats>,
    pool: KvPool,
    config: SchedulerConfig,
}

impl SchedulerHandle {
    /// Queue a job; refused at once when `max_queued` jobs are already
    /// queued behind full slots. A job a free slot can take does not count:
    /// it starts at the scheduler's next step (the slot is free now even if
    /// the scheduler is busy with a step).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let most = self.config.max_queued.max(1);
        let free = self.free_slots();
        self.stats
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < most + free).then_some(q + 1)
            })
            .map_err(|_| SubmitError::QueueFull(most))?;
        self.tx.try_send((job, Instant::now())).map_err(|e| {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull(self.config.max_queued),
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Acquire)
    }

    /// Slots no sequence holds.
    pub fn free_slots(&self) -> usize {
        self.config.max_running.saturating_sub(self.running())
    }

    /// Jobs queued behind full slots (what `--max-queue` limits): those
    /// submitted and not running, less the ones free slots will take.
    pub fn queued(&self) -> usize {
        self.stats
            .queued
            .load(Ordering::Acquire)
            .saturating_sub(self.free_slots())
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}

/// Start the scheduler thread. It ends when every handle is dropped and the
/// work in hand is done.
pub fn spawn<B: Backend>(
    model: Arc<B>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
) -> (SchedulerHandle, JoinHandle<()>) {
    // Room for a full queue plus a job for every slot.
    let (tx, rx) = mpsc::sync_channel(config.max_queued.max(1) + config.max_running);
    let stats = Arc::new(SchedulerStats::default());
    let pool = KvPool::new(config.kv_pages);
    let handle = SchedulerHandle {
        tx,
        stats: stats.clone(),
        pool: pool.clone(),
        config: config.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            Loop {
                model,
                tokenizer,
                config,
                pool,
                stats,
                rx,
                waiting: VecDeque::new(),
                running: Vec::new(),
                kept: Vec::new(),
                pace: Pace::default(),
                oldest_first: false,
            }
            .run()
        })
        .expect("spawning the scheduler thread");
    (handle, thread)
}

/// What a step's forward pass gave one sequence.
enum Output {
    Logits(Vec<f32>),
    /// The greedy choice of each row asked for.
    Token(Vec<u32>),
}

struct Waiting {
    job: Job,
    submitted: Instant,
    /// Submitted while streams were decoding (see [`Sequence::paced`]).
    paced: bool,
}

struct Sequence<C> {
    job: Job,
    kv: C,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// Prompt tokens already in the cache (run, or from the prefix cache).
    prefilled: usize,
    /// Prompt tokens that came from the prefix cache.
    cached: usize,
    /// The grammar the output keeps to, if any.
    constraint: Option<Constraint>,
    /// The sampled token to feed next.
    next: Option<u32>,
    generated: usize,
    text: String,
    submitted: Instant,
    /// Its prompt arrived while other streams were decoding (a stream had
    /// its first token before it was submitted): its chunks keep to their
    /// pace. Prompts that came with the first streams (a burst) are read at
    /// the full step budget, as the first of them were.
    paced: bool,
    first_token: Option<Instant>,
    max_tokens: usize,
}

impl<C> Sequence<C> {
    /// A step that runs it up to prompt position `end` gives it a token:
    /// it is decoding, or that step reads its prompt's last chunk.
    fn wants_token(&self, end: usize) -> bool {
        self.next.is_some() || end == self.job.prompt.len()
    }
}

struct Loop<B: Backend> {
    model: Arc<B>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    pool: KvPool,
    stats: Arc<SchedulerStats>,
    rx: Receiver<(Job, Instant)>,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<B::Cache>>,
    /// Finished sequences' caches, least recently used first.
    kept: Vec<B::Cache>,
    pace: Pace,
    /// Whether this step's prompt budget goes to the longest-waiting prompt
    /// first (alternating with shortest-first while prompts compete).
    oldest_first: bool,
}

/// Sizes prompt chunks while sequences decode. The cost of a step is not
/// linear in its tokens (the CPU's products work in tiles of tokens, the
/// GPU switches from mat-vec kernels to GEMMs past a few rows), so the chunk
/// is found by trial: it grows while steps stay within [`PACE`] times a
/// decode-only step and shrinks when they do not — when the running average
/// of mixed steps is past the pace, or one step is clearly past it (a
/// quarter more): single steps on a busy machine vary by more than the
/// pace's margin, and reacting to each drove the chunk down to one token. A
/// decode step's cost drifts (the streams' contexts grow, streams come and
/// go), so every [`Pace::PROBE_EVERY`] steps with prompt tokens one runs
/// without them, to time it afresh.
struct Pace {
    /// Seconds of a step with decode tokens only (a running average).
    decode_step: Option<f64>,
    /// Mixed steps' time over the decode step's (a running average).
    mixed_ratio: Option<f64>,
    /// Prompt tokens the next step with decoding sequences may carry.
    chunk: usize,
    /// Steps with prompt tokens since the last decode-only one.
    since_probe: usize,
    /// The smallest chunk that took a step past the pace lately: the chunk
    /// stays below it, so that trying a larger one again (a step past the
    /// pace) happens once per [`Pace::CEILING_STEPS`], not every few steps.
    ceiling: Option<usize>,
    /// Steps with prompt tokens since the ceiling was set.
    since_ceiling: usize,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            decode_step: None,
            mixed_ratio: None,
            chunk: 4,
            since_probe: 0,
            ceiling: None,
            since_ceiling: 0,
        }
    }
}

impl Pace {
    const WEIGHT: f64 = 0.25;
    const PROBE_EVERY: usize = 8;
    const CEILING_STEPS: usize = 256;

    /// Prompt tokens a step with decoding sequences may carry (0: a
    /// decode-only step, to time one).
    fn prompt_budget(&self, most: usize) -> usize {
        if self.since_probe >= Self::PROBE_EVERY {
            return 0;
        }
        self.chunk.clamp(1, most)
    }

    fn record(&mut self, seconds: f64, decode_tokens: usize, prompt_tokens: usize) {
        if decode_tokens == 0 {
            return;
        }
        if prompt_tokens == 0 {
            self.since_probe = 0;
            self.decode_step = Some(match self.decode_step {
                Some(a) => a + Self::WEIGHT * (seconds - a),
                None => seconds,
            });
            return;
        }
        self.since_probe += 1;
        self.since_ceiling += 1;
        if self.since_ceiling >= Self::CEILING_STEPS {
            self.ceiling = None;
        }
        let Some(decode) = self.decode_step else {
            return;
        };
        let ratio = seconds / decode;
        let average = match self.mixed_ratio {
            Some(a) => a + Self::WEIGHT * (ratio - a),
            None => ratio,
        };
        self.mixed_ratio = Some(average);
        if average > PACE || ratio > PACE * 1.25 {
            self.ceiling = Some(self.ceiling.map_or(prompt_tokens, |c| c.min(prompt_tokens)));
            self.since_ceiling = 0;
            self.chunk = (self.chunk * 2 / 3).max(1);
            // The next chunks start the average afresh at the pace.
            self.mixed_ratio = Some(average.min(PACE));
        } else if ratio <= PACE && prompt_tokens >= self.chunk {
            // The chunk was the limit and the step kept its pace: try more,
            // but not what went past the pace lately.
            let grown = self.chunk + (self.chunk / 4).max(1);
            self.chunk = match self.ceiling {
                Some(c) => grown.min(c.saturating_sub(1)).max(self.chunk),
                None => grown,
            };
        }
    }
}

/// Tokens `a` and `b` share from the start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<B: Backend> Loop<B> {
    fn run(mut self) {
        let mut open = true;
        loop {
            open &= self.receive(open);
            if !open && self.waiting.is_empty() && self.running.is_empty() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Take new jobs; block briefly only when there is nothing to do.
    fn receive(&mut self, open: bool) -> bool {
        if !open {
            return false;
        }
        let idle = self.running.is_empty() && self.waiting.is_empty();
        if idle {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok((job, submitted)) => self.enqueue(job, submitted),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok((job, submitted)) => self.enqueue(job, submitted),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn enqueue(&mut self, job: Job, submitted: Instant) {
        let paced = self
            .running
            .iter()
            .filter_map(|s| s.first_token)
            .any(|t| t < submitted);
        self.waiting.push_back(Waiting {
            job,
            submitted,
            paced,
        });
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        let mut kept = VecDeque::with_capacity(before);
        for mut w in self.waiting.drain(..) {
            if w.job.cancel.load(Ordering::Acquire) {
                let finish = Finish {
                    stop_reason: StopReason::Cancelled,
                    prompt_tokens: w.job.prompt.len(),
                    cached_tokens: 0,
                    tokens_out: 0,
                    time_to_first_token: None,
                    decode_time: Duration::ZERO,
                    text: String::new(),
                };
                (w.job.sink)(Event::End(finish));
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.cancel.load(Ordering::Acquire) {
                let seq = self.take_running(i);
                self.finish(seq, StopReason::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    /// Start waiting jobs, in order, while there are slots and pages for them.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else {
                return;
            };
            let prompt_len = front.job.prompt.len();
            if prompt_len == 0 || prompt_len >= self.config.context {
                let mut w = self.waiting.pop_front().expect("front exists");
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                let message = format!(
                    "the prompt has {prompt_len} tokens; it must have 1 to {} for a context of {}",
                    self.config.context - 1,
                    self.config.context
                );
                (w.job.sink)(Event::Error { message });
                continue;
            }
            let max_tokens = front
                .job
                .params
                .max_tokens
                .min(self.config.context - prompt_len);
            // Positions fed: the prompt and every generated token but the last.
            let positions = prompt_len + max_tokens.saturating_sub(1).max(1);
            let prompt = front.job.prompt.clone();
            let mut kv = self.reuse(&prompt);
            while kv.reserve(positions).is_err() {
                if !self.evict_oldest() {
                    // Not enough room yet; it waits for running sequences
                    // to finish. A cache taken over stays kept meanwhile.
                    if kv.len() > 0 && self.config.prefix_cache {
                        self.keep(kv);
                    }
                    return;
                }
            }
            let cached = kv.len();
            let w = self.waiting.pop_front().expect("front exists");
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            if let Err(message) = w.job.params.sampling.validate() {
                let mut job = w.job;
                (job.sink)(Event::Error { message });
                continue;
            }
            let mut job = w.job;
            let constraint = job.params.constraint.take();
            let w = Waiting { job, ..w };
            let mut sampler = Sampler::new(w.job.params.sampling.clone());
            for &t in &w.job.prompt {
                sampler.accept(t);
            }
            let stops = StopMatcher::new(w.job.params.stop.iter().cloned());
            self.running.push(Sequence {
                kv,
                sampler,
                decoder: StreamDecoder::new(false),
                stops,
                prefilled: cached,
                cached,
                constraint,
                next: None,
                generated: 0,
                text: String::new(),
                submitted: w.submitted,
                paced: w.paced,
                first_token: None,
                max_tokens,
                job: w.job,
            });
            self.stats
                .prefix_hit_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            self.stats
                .running
                .store(self.running.len(), Ordering::Release);
        }
    }

    /// A cache for a new sequence with `prompt`, holding the longest prefix
    /// of it that a kept or running cache holds (at most all but its last
    /// token, which must run to give logits).
    fn reuse(&mut self, prompt: &[u32]) -> B::Cache {
        let fresh = |model: &B, pool: &KvPool, context| model.new_cache_in(pool, context);
        if !self.config.prefix_cache {
            return fresh(&self.model, &self.pool, self.config.context);
        }
        let limit = prompt.len().saturating_sub(1);
        let shared = |kv: &B::Cache| {
            common_prefix(&kv.tokens()[..kv.len().min(kv.tokens().len())], prompt).min(limit)
        };
        let best_kept = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, kv)| (shared(kv), i))
            .max();
        let best_running = self
            .running
            .iter()
            .enumerate()
            .map(|(i, seq)| (shared(&seq.kv), i))
            .max();
        let (kept_len, kept_at) = best_kept.unwrap_or((0, 0));
        let (running_len, running_at) = best_running.unwrap_or((0, 0));
        if kept_len == 0 && running_len == 0 {
            return fresh(&self.model, &self.pool, self.config.context);
        }
        if kept_len >= running_len {
            if kept_len == self.kept[kept_at].len() {
                // The prompt extends all of it (a chat's next turn): take it over.
                let kv = self.kept.remove(kept_at);
                self.count_kept();
                return kv;
            }
            let kv = self.kept.remove(kept_at);
            let fork = self
                .model
                .fork_cache(&kv, kept_len, &self.pool, self.config.context);
            // Most recently used now.
            self.kept.push(kv);
            self.count_kept();
            fork.unwrap_or_else(|_| fresh(&self.model, &self.pool, self.config.context))
        } else {
            self.model
                .fork_cache(
                    &self.running[running_at].kv,
                    running_len,
                    &self.pool,
                    self.config.context,
                )
                .unwrap_or_else(|_| fresh(&self.model, &self.pool, self.config.context))
        }
    }

    /// Keep a finished sequence's cache for reuse, its unused pages given back.
    fn keep(&mut self, mut kv: B::Cache) {
        let len = kv.len();
        if kv.truncate(len) == 0 {
            return;
        }
        self.kept.push(kv);
        if self.kept.len() > MAX_KEPT {
            self.kept.remove(0);
        }
        self.count_kept();
    }

    /// Drop the least recently used kept cache; `false` when none is left.
    fn evict_oldest(&mut self) -> bool {
        if self.kept.is_empty() {
            return false;
        }
        self.kept.remove(0);
        self.count_kept();
        true
    }

    fn count_kept(&self) {
        let pages = self.kept.iter().map(Cache::pages).sum();
        self.stats.kept_pages.store(pages, Ordering::Release);
        self.stats
            .kept_caches
            .store(self.kept.len(), Ordering::Release);
    }

    /// One forward pass over every running sequence, then sampling.
    fn step(&mut self) {
        // Decode tokens first (one per decoding sequence), then prompt chunks in the remaining budget.
        let decoding = self.running.iter().filter(|s| s.next.is_some()).count();
        let room = self.config.step_tokens.saturating_sub(decoding).max(1);
        // Only prompts that arrived while streams were decoding are paced.
        let paced = decoding > 0
            && self
                .running
                .iter()
                .any(|s| s.next.is_none() && s.prefilled < s.job.prompt.len() && s.paced);
        let mut budget = if paced {
            self.pace.prompt_budget(room)
        } else {
            room
        };
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (sequence, start, end) of tokens to feed
        let mut next_tokens: Vec<[u32; 1]> = vec![[0]; self.running.len()];
        let mut prefilling: Vec<usize> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            if let Some(t) = seq.next {
                next_tokens[i] = [t];
                plan.push((i, 0, 1));
            } else if seq.prefilled < seq.job.prompt.len() {
                prefilling.push(i);
            }
        }
        // The shortest prompts first, so that a short request is not kept
        // waiting behind a long one; but when prompts compete, every other
        // step goes to the one waiting longest first, so that a stream of
        // short requests cannot starve a long prompt.
        prefilling.sort_by_key(|&i| self.running[i].job.prompt.len() - self.running[i].prefilled);
        if prefilling.len() > 1 && decoding > 0 {
            self.oldest_first = !self.oldest_first;
            if self.oldest_first {
                if let Some(at) =
                    (0..prefilling.len()).min_by_key(|&k| self.running[prefilling[k]].submitted)
                {
                    let oldest = prefilling.remove(at);
                    prefilling.insert(0, oldest);
                }
            }
        }
        for i in prefilling {
            if budget == 0 {
                break;
            }
            let seq = &self.running[i];
            let take = (seq.job.prompt.len() - seq.prefilled).min(budget);
            budget -= take;
            plan.push((i, seq.prefilled, seq.prefilled + take));
        }
        if plan.is_empty() {
            return;
        }
        let prompt_tokens: usize = plan
            .iter()
            .filter(|&&(i, ..)| self.running[i].next.is_none())
            .map(|&(_, start, end)| end - start)
            .sum();
        let started = Instant::now();
        // Greedy sequences need only the best token: when every sequence
        // that gets one this step is greedy, the backend picks it (on the
        // GPU, without moving the logits), within its grammar's mask if it
        // has one.
        let greedy = plan.iter().all(|&(i, _, end)| {
            let seq = &self.running[i];
            let wants_token = seq.wants_token(end);
            let p = &seq.job.params;
            !wants_token || (p.sampling.is_plain_greedy() && p.logprobs.is_none())
        });
        let result = {
            let mut segments: Vec<Segment<'_, B::Cache>> = Vec::with_capacity(plan.len());
            // The grammars of sequences that get a token this step, by segment.
            let mut constraints: Vec<(usize, &mut Constraint)> = Vec::new();
            let mut seqs: Vec<Option<&mut Sequence<B::Cache>>> =
                self.running.iter_mut().map(Some).collect();
            for (segment, &(i, start, end)) in plan.iter().enumerate() {
                let seq = seqs[i].take().expect("each sequence appears once");
                let wants_token = seq.wants_token(end);
                if let (true, Some(c)) = (wants_token, seq.constraint.as_mut()) {
                    constraints.push((segment, c));
                }
                let (tokens, logits): (&[u32], Logits) = if seq.next.is_some() {
                    (&next_tokens[i], Logits::Last)
                } else {
                    let last_chunk = end == seq.job.prompt.len();
                    (
                        &seq.job.prompt[start..end],
                        if last_chunk {
                            Logits::Last
                        } else {
                            Logits::None
                        },
                    )
                };
                segments.push(Segment {
                    kv: &mut seq.kv,
                    tokens,
                    logits,
                });
            }
            let model = &self.model;
            let n_segments = segments.len();
            if constraints.is_empty() {
                if greedy {
                    model
                        .forward_greedy(&mut segments)
                        .map(|ids| ids.into_iter().map(Output::Token).collect::<Vec<_>>())
                } else {
                    model
                        .forward_logits(&mut segments)
                        .map(|rows| rows.into_iter().map(Output::Logits).collect::<Vec<_>>())
                }
            } else {
                // The token masks are computed while the forward pass runs
                // (a failed one is reported when the token is taken).
                std::thread::scope(|scope| {
                    if greedy {
                        let masks = scope.spawn(move || on_grammars(constraints, Constraint::mask));
                        let mut masks = Some(masks);
                        let mut by_segment = || {
                            let mut out: Vec<Option<TokenMask>> = vec![None; n_segments];
                            let computed = masks.take().map(|m| m.join());
                            for (segment, mask) in computed.into_iter().flatten().flatten() {
                                // A failed mask allows nothing; the error comes with the token.
                                out[segment] = Some(mask.unwrap_or_default());
                            }
                            out
                        };
                        let ids = model.forward_greedy_masked(&mut segments, &mut by_segment);
                        ids.map(|ids| ids.into_iter().map(Output::Token).collect::<Vec<_>>())
                    } else {
                        // The masks are kept in the grammars, for restrict().
                        let masks =
                            scope.spawn(move || on_grammars(constraints, Constraint::prepare));
                        let rows = model.forward_logits(&mut segments);
                        let _ = masks.join();
                        rows.map(|rows| rows.into_iter().map(Output::Logits).collect::<Vec<_>>())
                    }
                })
            }
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .prefill_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        // Unpaced steps with prompt chunks say nothing about the pace.
        if result.is_ok() && (paced || prompt_tokens == 0) {
            self.pace
                .record(started.elapsed().as_secs_f64(), decoding, prompt_tokens);
        }
        let outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                // A failed step fails the sequences in it; the others go on.
                let message = e.to_string();
                let mut failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let mut seq = self.take_running(i);
                    (seq.job.sink)(Event::Error {
                        message: message.clone(),
                    });
                }
                return;
            }
        };

        self.accept_ahead(&plan, &outputs);
        let mut done: Vec<(usize, Result<StopReason, String>)> = Vec::new();
        for (&(i, start, end), output) in plan.iter().zip(outputs) {
            let seq = &mut self.running[i];
            if let Some(fed) = seq.next.take() {
                seq.kv.record_tokens(&[fed]);
            } else {
                seq.kv.record_tokens(&seq.job.prompt[start..end]);
                seq.prefilled = end;
                if end < seq.job.prompt.len() {
                    continue;
                }
                let prompt_tokens = seq.job.prompt.len();
                if !(seq.job.sink)(Event::Started { prompt_tokens }) {
                    done.push((i, Ok(StopReason::Cancelled)));
                    continue;
                }
            }
            if let Some(end) = Self::sample_and_emit(&self.tokenizer, seq, output) {
                done.push((i, end));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, end) in done {
            let mut seq = self.take_running(i);
            match end {
                Ok(reason) => self.finish(seq, reason),
                // Its cache is dropped: nothing to reuse from a failed sequence.
                Err(message) => {
                    (seq.job.sink)(Event::Error { message });
                }
            }
        }
    }

    /// The grammars of the step's greedy tokens move past them on the
    /// thread pool (a grammar's step costs about three times its mask, and
    /// with many constrained streams they would otherwise run one after
    /// another between two forward passes); [`Self::sample_and_emit`] then
    /// takes each result as it goes.
    fn accept_ahead(&mut self, plan: &[(usize, usize, usize)], outputs: &[Output]) {
        if self.running.iter().all(|s| s.constraint.is_none()) {
            return;
        }
        let mut seqs: Vec<Option<&mut Sequence<B::Cache>>> =
            self.running.iter_mut().map(Some).collect();
        let mut work: Vec<(&mut Constraint, u32)> = Vec::new();
        for (&(i, _, end), output) in plan.iter().zip(outputs) {
            let Some(seq) = seqs[i].take() else { continue };
            let wants_token = seq.wants_token(end);
            let (Output::Token(ids), Some(constraint), true) =
                (output, seq.constraint.as_mut(), wants_token)
            else {
                continue;
            };
            let token = ids.first().copied().unwrap_or(0);
            // As sample_and_emit decides: no grammar step for a sequence
            // that ends here.
            if seq.generated < seq.max_tokens && !self.tokenizer.is_eog(token) {
                work.push((constraint, token));
            }
        }
        if work.len() > 1 {
            use rayon::prelude::*;
            work.into_par_iter()
                .for_each(|(constraint, token)| constraint.accept_ahead(token));
        }
    }

    /// Running sequence `i`, out of the running list, whose count the stats
    /// follow at once (a client told its sequence ended sees it gone).
    fn take_running(&mut self, i: usize) -> Sequence<B::Cache> {
        let seq = self.running.swap_remove(i);
        self.stats
            .running
            .store(self.running.len(), Ordering::Release);
        seq
    }

    /// Pick the next token, stream its text; `Some` when the sequence ends
    /// (why, or the error that ended it).
    fn sample_and_emit(
        tokenizer: &Tokenizer,
        seq: &mut Sequence<B::Cache>,
        output: Output,
    ) -> Option<Result<StopReason, String>> {
        if seq.generated >= seq.max_tokens {
            return Some(Ok(StopReason::MaxTokens));
        }
        let (token, logprob) = match output {
            Output::Logits(mut logits) => {
                // The sampler and the grammar edit the logits: the model's
                // own are kept for the report.
                let model_logits = seq.job.params.logprobs.map(|_| logits.clone());
                if let Some(constraint) = &mut seq.constraint {
                    if let Err(e) = constraint.restrict(&mut logits) {
                        return Some(Err(format!("the output's grammar: {e}")));
                    }
                }
                let token = seq.sampler.sample(&mut logits);
                let logprob = model_logits
                    .zip(seq.job.params.logprobs)
                    .map(|(l, top)| TokenLogprob::of(&l, token, top.min(MAX_TOP_LOGPROBS)));
                (token, logprob)
            }
            // One row was asked for (Logits::Last), so one id came back.
            Output::Token(ids) => {
                if let Some(constraint) = &mut seq.constraint {
                    // Computed already, unless it failed: then this says why.
                    if let Err(e) = constraint.prepare() {
                        return Some(Err(format!("the output's grammar: {e}")));
                    }
                }
                (ids.first().copied().unwrap_or(0), None)
            }
        };
        if seq.first_token.is_none() {
            seq.first_token = Some(Instant::now());
        }
        if tokenizer.is_eog(token) {
            return Some(Ok(StopReason::Eos));
        }
        if let Some(constraint) = &mut seq.constraint {
            if let Err(e) = constraint.accept(token) {
                return Some(Err(format!("the output's grammar: {e}")));
            }
        }
        seq.sampler.accept_generated(token);
        let index = seq.generated;
        seq.generated += 1;
        let piece = seq.decoder.push(tokenizer, token).unwrap_or_default();
        let matched = seq.stops.push(&piece);
        seq.text.push_str(&matched.emit);
        let alive = (seq.job.sink)(Event::Token {
            index,
            id: token,
            text: matched.emit,
            logprob,
        });
        if !alive {
            return Some(Ok(StopReason::Cancelled));
        }
        if matched.stopped {
            return Some(Ok(StopReason::StopSequence));
        }
        if seq.constraint.as_ref().is_some_and(Constraint::is_finished) {
            // The grammar is complete: only the end token could follow.
            return Some(Ok(StopReason::Eos));
        }
        if seq.generated >= seq.max_tokens {
            return Some(Ok(StopReason::MaxTokens));
        }
        seq.next = Some(token);
        None
    }

    fn finish(&mut self, mut seq: Sequence<B::Cache>, reason: StopReason) {
        if matches!(reason, StopReason::MaxTokens | StopReason::Eos) {
            // Text still held back (a partial character or a partial stop string) is final now.
            let rest = seq.stops.push(&seq.decoder.flush());
            let tail = if rest.stopped {
                rest.emit
            } else {
                rest.emit + &seq.stops.finish()
            };
            if !tail.is_empty() {
                seq.text.push_str(&tail);
                let index = seq.generated.saturating_sub(1);
                (seq.job.sink)(Event::Token {
                    index,
                    id: u32::MAX,
                    text: tail,
                    logprob: None,
                });
            }
        }
        let finish = Finish {
            stop_reason: reason,
            prompt_tokens: seq.job.prompt.len(),
            cached_tokens: seq.cached,
            tokens_out: seq.generated,
            time_to_first_token: seq.first_token.map(|t| t - seq.submitted),
            decode_time: seq.first_token.map(|t| t.elapsed()).unwrap_or_default(),
            text: std::mem::take(&mut seq.text),
        };
        // The KV pages go back to the pool (or the cache is kept, its pages
        // free to evict) before the client hears the end, so a client that
        // submits again at once finds room.
        let Sequence { mut job, kv, .. } = seq;
        if self.config.prefix_cache {
            self.keep(kv);
        } else {
            drop(kv);
        }
        (job.sink)(Event::End(finish));
    }
}

/// `work` on each grammar (its mask, the costly part), by segment, on up to
/// 8 threads: one mask takes tens to hundreds of microseconds, so with many
/// constrained streams a single thread would outlast the forward pass.
fn on_grammars<R: Send>(
    constraints: Vec<(usize, &mut Constraint)>,
    work: fn(&mut Constraint) -> R,
) -> Vec<(usize, R)> {
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = constraints.len().div_ceil(8).min(cores).clamp(1, 8);
    let mut constraints = constraints;
    let per_thread = constraints.len().div_ceil(threads).max(1);
    let run = |chunk: &mut [(usize, &mut Constraint)]| -> Vec<(usize, R)> {
        chunk
            .iter_mut()
            .map(|(segment, c)| (*segment, work(c)))
            .collect()
    };
    if threads == 1 {
        return run(&mut constraints);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = constraints
            .chunks_mut(per_thread)
            .map(|chunk| scope.spawn(move || run(chunk)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_chunks_grow_within_the_pace_shrink_past_it_and_a_decode_step_is_timed_often() {
        let mut pace = Pace::default();
        assert_eq!(pace.prompt_budget(512), 4);
        pace.record(0.100, 8, 0);
        // Steps within PACE × 0.1 s that used the whole chunk: it grows.
        pace.record(0.120, 8, 4);
        assert_eq!(pace.prompt_budget(512), 5);
        pace.record(0.140, 8, 5);
        assert_eq!(pace.prompt_budget(512), 6);
        // One past it: it shrinks, and does not reach 6 again for a while.
        pace.record(0.200, 8, 6);
        assert_eq!(pace.prompt_budget(512), 4);
        pace.record(0.110, 8, 4);
        pace.record(0.110, 8, 5);
        pace.record(0.110, 8, 5);
        assert_eq!(
            pace.prompt_budget(512),
            5,
            "held below the chunk that went past"
        );
        for _ in 0..Pace::CEILING_STEPS {
            pace.record(0.110, 8, 0);
            pace.record(0.110, 8, 5);
        }
        assert_eq!(
            pace.prompt_budget(512),
            6,
            "tried again once the ceiling is old"
        );
        pace.record(0.200, 8, 6);
        pace.record(0.110, 8, 1);
        pace.chunk = 4;
        // A step that did not use the whole chunk teaches nothing about more.
        pace.record(0.110, 8, 2);
        assert_eq!(pace.prompt_budget(3), 3);
        // After PROBE_EVERY steps with prompt tokens, a decode-only one.
        for _ in 0..Pace::PROBE_EVERY - 4 {
            pace.record(0.110, 8, 1);
        }
        assert_eq!(pace.prompt_budget(512), 0);
        // Decode steps got slower (longer contexts): the bound follows.
        pace.record(0.300, 8, 0);
        assert_eq!(pace.prompt_budget(512), 4);
        pace.record(0.180, 8, 4);
        assert_eq!(
            pace.prompt_budget(512),
            5,
            "0.18 s is within 1.5 × the new average"
        );
        // One step a little past the pace is noise; steps past it on average are not.
        pace.record(0.26, 8, 5);
        assert_eq!(
            pace.prompt_budget(512),
            5,
            "one step a little past the pace"
        );
        let mut more = 0;
        while pace.chunk == 5 && more < 6 {
            pace.record(0.26, 8, 5);
            more += 1;
        }
        assert!(
            pace.chunk == 3 && more >= 2,
            "past the pace on average: smaller after {more} more steps"
        );
    }
}
