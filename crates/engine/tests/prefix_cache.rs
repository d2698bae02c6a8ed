//! The scheduler's prefix cache and prompt chunking on the CPU backend, with
//! SmolLM2: a cache hit gives the same greedy output as a cold run, a chat's
//! next turn runs only its new tokens, kept caches are evicted when pages
//! run short, and a long prompt can be cancelled between its chunks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use engine::cpu::CpuModel;
use engine::generate::{generate_blocking, GenerateParams, StopReason};
use engine::scheduler::{self, Event, Finish, Job, SchedulerConfig, SchedulerHandle};
use gguf::GgufFile;
use tokenizer::Tokenizer;

mod common;
use common::smollm_path;

struct Smollm {
    model: Arc<CpuModel>,
    tokenizer: Arc<Tokenizer>,
}

impl Smollm {
    fn load() -> Self {
        let file = Arc::new(GgufFile::open(smollm_path()).unwrap());
        let tokenizer = Arc::new(Tokenizer::from_gguf(file.metadata()).unwrap());
        let model = Arc::new(CpuModel::load(file).unwrap());
        Smollm { model, tokenizer }
    }

    fn scheduler(
        &self,
        max_running: usize,
        kv_pages: usize,
        step_tokens: usize,
        prefix_cache: bool,
    ) -> SchedulerHandle {
        scheduler::spawn(
            self.model.clone(),
            self.tokenizer.clone(),
            SchedulerConfig {
                context: 512,
                max_running,
                max_queued: 16,
                step_tokens,
                kv_pages,
                prefix_cache,
            },
        )
        .0
    }

    fn tokens(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, false, false)
    }
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: Default::default(),
        stop: vec![],
        logprobs: None,
        constraint: None,
    }
}

/// The ids a job generated, and how it finished.
fn run(handle: &SchedulerHandle, prompt: Vec<u32>, max_tokens: usize) -> (Vec<u32>, Finish) {
    let (tx, rx) = mpsc::channel();
    handle
        .submit(Job {
            prompt,
            params: greedy(max_tokens),
            cancel: Arc::new(AtomicBool::new(false)),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        })
        .unwrap();
    let mut ids = Vec::new();
    for event in rx {
        match event {
            Event::Token { id, .. } if id != u32::MAX => ids.push(id),
            Event::End(finish) => return (ids, finish),
            Event::Error { message } => panic!("{message}"),
            _ => {}
        }
    }
    panic!("no end event")
}

const SHARED: &str = "You are a careful assistant. Answer in one short sentence, \
    and never invent facts you are not sure about. The user asks about geography, \
    history and the natural world; keep to what is known.";

#[test]
fn a_prefix_hit_gives_the_same_greedy_output_as_a_cold_run() {
    let m = Smollm::load();
    let shared = m.tokens(SHARED);
    let prompt = |question: &str| {
        let mut p = shared.clone();
        p.extend(m.tokens(question));
        p
    };
    let first = prompt(" Question: what is the capital of France?");
    let second = prompt(" Question: which river runs through Rome?");
    // Step budgets that cut the prompts at other places than the cache does.
    let cold = m.scheduler(2, 256, 24, false);
    let (cold_ids, cold_end) = run(&cold, second.clone(), 24);
    assert_eq!(cold_end.cached_tokens, 0);

    let warm = m.scheduler(2, 256, 24, true);
    let (first_ids, first_end) = run(&warm, first.clone(), 24);
    let (warm_ids, warm_end) = run(&warm, second.clone(), 24);
    let cached = warm_end.cached_tokens;
    assert_eq!(
        cached,
        common(&first, &second),
        "the shared prefix is reused"
    );
    assert!(cached >= shared.len() - 1, "{cached} of {}", shared.len());
    assert_eq!(
        warm_ids, cold_ids,
        "greedy output with and without a cache hit"
    );

    // The same prompt again: all but its last token come from the cache
    // (the last must run to give logits), and the output is the same.
    let (again, again_end) = run(&warm, second.clone(), 24);
    assert_eq!(
        (again, again_end.cached_tokens),
        (cold_ids, second.len() - 1)
    );

    // A chat's next turn extends the whole of the first exchange: it runs
    // only its new tokens.
    let mut next_turn = first.clone();
    next_turn.extend(&first_ids);
    let turn_two = m.tokens(" Question: and of Italy?");
    next_turn.extend(&turn_two);
    let (_, turn_end) = run(&warm, next_turn.clone(), 8);
    // Every token fed so far: the first prompt and its output, but for the
    // last generated token when the limit (not an end token) stopped it.
    let fed =
        first.len() + first_ids.len() - usize::from(first_end.stop_reason == StopReason::MaxTokens);
    assert_eq!(turn_end.cached_tokens, fed);
    let ran =
        first.len() + (second.len() - cached) + 1 + (next_turn.len() - turn_end.cached_tokens);
    assert_eq!(
        warm.stats().prefill_tokens.load(Ordering::Relaxed) as usize,
        ran,
        "prompt tokens run through the model"
    );
    assert_eq!(
        warm.pool().used_pages(),
        warm.stats().kept_pages.load(Ordering::Acquire),
        "with nothing running, the kept caches hold every page in use"
    );
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A sequence forks the prefix of one still running: both finish with the
/// output each has alone.
#[test]
fn a_prompt_shares_the_prefix_of_a_running_sequence() {
    let m = Smollm::load();
    let long = {
        let mut p = m.tokens(SHARED);
        p.extend(m.tokens(" Question: name three large deserts."));
        p
    };
    let short = {
        let mut p = m.tokens(SHARED);
        p.extend(m.tokens(" Question: how many legs has a spider?"));
        p
    };
    let cold = m.scheduler(2, 256, 512, false);
    let alone_long = run(&cold, long.clone(), 40).0;
    let alone_short = run(&cold, short.clone(), 8).0;

    let warm = m.scheduler(2, 256, 512, true);
    let (tx, rx) = mpsc::channel();
    warm.submit(Job {
        prompt: long.clone(),
        params: greedy(40),
        cancel: Arc::new(AtomicBool::new(false)),
        sink: Box::new(move |e| tx.send(e).is_ok()),
    })
    .unwrap();
    // Once the long one decodes, the short one arrives.
    assert!(matches!(rx.recv().unwrap(), Event::Started { .. }));
    let (short_ids, short_end) = run(&warm, short.clone(), 8);
    assert_eq!(short_end.cached_tokens, common(&long, &short));
    assert_eq!(short_ids, alone_short);
    let long_ids: Vec<u32> = rx
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } if id != u32::MAX => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(long_ids, alone_long);
}

/// With a budget of a few pages, many different prompts run to completion:
/// kept caches are evicted oldest first as admissions need their pages, and
/// at the end the pages in use are exactly those the kept caches hold.
#[test]
fn kept_caches_are_evicted_when_pages_run_short() {
    let m = Smollm::load();
    // Six pages: 96 positions, room for one 60-token sequence and a little.
    let handle = m.scheduler(1, 6, 512, true);
    let subjects = [
        "the sea",
        "a mountain",
        "the moon",
        "a river",
        "an old city",
        "a forest",
        "the desert",
        "a glacier",
        "the sky",
        "a volcano",
        "an island",
        "the wind",
    ];
    for (i, subject) in subjects.iter().enumerate() {
        let prompt = m.tokens(&format!(
            "Item {i}. Write one line about {subject}, please."
        ));
        let finish = generate_blocking(&handle, prompt, greedy(40), |_| true).unwrap();
        assert!(
            matches!(finish.stop_reason, StopReason::MaxTokens | StopReason::Eos),
            "prompt {i}: {:?}",
            finish.stop_reason
        );
        let kept = handle.stats().kept_pages.load(Ordering::Acquire);
        assert_eq!(handle.pool().used_pages(), kept, "after prompt {i}");
        assert!(kept <= 6);
        assert_eq!(handle.running(), 0);
    }
    // A prompt that needs every page evicts all that is kept and runs.
    let mut big = m.tokens(&"one two three four ".repeat(30));
    big.truncate(72);
    // 72 + 19 positions fed: all six pages.
    let finish = generate_blocking(&handle, big, greedy(20), |_| true).unwrap();
    assert_eq!(finish.cached_tokens, 0);
    assert_eq!(
        handle.pool().used_pages(),
        handle.stats().kept_pages.load(Ordering::Acquire)
    );
}

/// A long prompt arriving while a stream decodes is read in small chunks,
/// so a cancel ends it before its prefill is through.
#[test]
fn a_long_prompt_is_chunked_around_a_running_stream_and_cancels_between_chunks() {
    let m = Smollm::load();
    let handle = m.scheduler(2, 64, 512, true);
    let (tx_stream, rx_stream) = mpsc::channel();
    let stop_stream = Arc::new(AtomicBool::new(false));
    handle
        .submit(Job {
            prompt: m.tokens("Count slowly from one to one hundred:"),
            params: greedy(400),
            cancel: stop_stream.clone(),
            sink: Box::new(move |e| tx_stream.send(e).is_ok()),
        })
        .unwrap();
    // The stream decodes (a prompt arriving before its first token would
    // count as arriving with it, and be read unpaced).
    assert!(rx_stream.iter().any(|e| matches!(e, Event::Token { .. })));

    let long = m.tokens(&"the quick brown fox jumps over the lazy dog ".repeat(45));
    assert!(long.len() > 400, "{}", long.len());
    let before = handle.stats().prefill_tokens.load(Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    handle
        .submit(Job {
            prompt: long.clone(),
            params: greedy(4),
            cancel: cancel.clone(),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        })
        .unwrap();
    // Wait until its prefill has begun, then cancel it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.stats().prefill_tokens.load(Ordering::Relaxed) == before {
        assert!(Instant::now() < deadline, "the long prompt never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    cancel.store(true, Ordering::Release);
    let end = rx
        .iter()
        .find_map(|e| match e {
            Event::End(finish) => Some(finish),
            _ => None,
        })
        .unwrap();
    assert_eq!(end.stop_reason, StopReason::Cancelled);
    let read = handle.stats().prefill_tokens.load(Ordering::Relaxed) - before;
    assert!(
        (read as usize) < long.len() / 2,
        "{read} of {} prompt tokens were run before the cancel took effect",
        long.len()
    );
    // The stream went on decoding meanwhile.
    stop_stream.store(true, Ordering::Release);
    let tokens = rx_stream
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    assert!(tokens > 0);
}

/// Prompts submitted together (a burst) are read at the full step budget,
/// not paced as a prompt arriving while streams decode is: the first
/// streams' decoding does not slow the admission of those that came with them.
#[test]
fn a_burst_of_prompts_is_read_at_the_full_budget() {
    let m = Smollm::load();
    let handle = m.scheduler(8, 512, 128, false);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            m.tokens(&format!(
                "Story {i}: {}",
                "once upon a time, in a village by the sea, ".repeat(8)
            ))
        })
        .collect();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let receivers: Vec<_> = prompts
        .into_iter()
        .map(|prompt| {
            let (tx, rx) = mpsc::channel();
            handle
                .submit(Job {
                    prompt,
                    params: greedy(8),
                    cancel: Arc::new(AtomicBool::new(false)),
                    sink: Box::new(move |e| tx.send(e).is_ok()),
                })
                .unwrap();
            rx
        })
        .collect();
    for rx in receivers {
        assert!(rx.iter().any(|e| matches!(e, Event::End(_))));
    }
    // 8 decode steps each, the prompts in ⌈tokens / 128⌉ steps give or take
    // one per step's decode tokens; paced, the chunks would start at a few
    // tokens and take dozens of steps.
    let steps = handle.stats().steps.load(Ordering::Relaxed);
    let most = prompt_tokens.div_ceil(128) + 1 + 8 + 1;
    assert!(
        steps <= most,
        "{steps} steps for 8 prompts of {prompt_tokens} tokens in all and 8 tokens each (at most {most} expected)"
    );
}
