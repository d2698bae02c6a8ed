//! What a generation request is and what comes back: the types the
//! scheduler and every front end (the blocking helper, the HTTP routes, the
//! CLI) share, in one module that depends on neither.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::sampler::SamplingParams;

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// Why generation ended (the worker API's `stop_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `max_tokens` were generated, or the context is full.
    MaxTokens,
    /// The model produced an end-of-generation token.
    Eos,
    /// A stop string appeared in the text.
    StopSequence,
    /// The caller asked to stop.
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxTokens => "MAX_TOKENS",
            StopReason::Eos => "EOS",
            StopReason::StopSequence => "STOP_SEQUENCE",
            StopReason::Cancelled => "CANCELLED",
        }
    }
}

/// What a job hears about itself, in order: any number of `Token`s, then
/// exactly one `End` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Prefill is done; `prompt_tokens` were run.
    Started {
        prompt_tokens: usize,
    },
    /// Generated token number `index` (from 0) and the text that became
    /// final with it (possibly empty: half a UTF-8 character, or text held
    /// back while it might still be a stop string).
    Token {
        index: usize,
        id: u32,
        text: String,
    },
    End(Finish),
    Error {
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache (not run again).
    pub cached_tokens: usize,
    pub tokens_out: usize,
    /// Time from submission to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// Time spent generating after the first token.
    pub decode_time: Duration,
    pub text: String,
}

/// Receives a job's events; returning `false` (the client is gone) cancels the job.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub cancel: Arc<AtomicBool>,
    pub sink: Sink,
}
