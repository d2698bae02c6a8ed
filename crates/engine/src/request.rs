//! What a generation request is and what comes back: the types the
//! scheduler and every front end (the blocking helper, the HTTP routes, the
//! CLI) share, in one module that depends on neither.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::constraint::Constraint;
use crate::sampler::SamplingParams;

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Report each generated token's log-probability with this many of the
    /// most likely alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// The grammar the output must keep to.
    pub constraint: Option<Constraint>,
}

/// Most alternatives a token's log-probability may come with (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability under the model (the log-softmax of
/// the logits the backend returned, before any sampling setting), and the
/// most likely tokens at its position, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// `token`'s log-probability and the `top` most likely tokens of `logits`.
    pub fn of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // In f64: a vocabulary of 150,000 terms.
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let log_sum = max as f64 + sum.ln();
        let logprob = |l: f32| (f64::from(l) - log_sum) as f32;
        let mut best: Vec<u32> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (id, &l) in logits.iter().enumerate() {
                if best.len() == top && l <= logits[best[top - 1] as usize] {
                    continue;
                }
                let at = best.partition_point(|&b| logits[b as usize] >= l);
                best.insert(at, id as u32);
                best.truncate(top);
            }
        }
        TokenLogprob {
            logprob: logits
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
            top: best
                .into_iter()
                .map(|id| (id, logprob(logits[id as usize])))
                .collect(),
        }
    }
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
        /// When the job asked for log-probabilities.
        logprob: Option<TokenLogprob>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_and_the_top_tokens_come_in_order() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lp = TokenLogprob::of(&logits, 4, 3);
        let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let want = |l: f32| (f64::from(l).exp() / total).ln() as f32;
        assert!((lp.logprob - want(0.5)).abs() < 1e-6);
        // Ties keep the lower id first.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        for (id, l) in &lp.top {
            assert!((l - want(logits[*id as usize])).abs() < 1e-6);
        }
        let probabilities: f64 = (0..5)
            .map(|i| f64::from(TokenLogprob::of(&logits, i, 0).logprob).exp())
            .sum();
        assert!((probabilities - 1.0).abs() < 1e-6);
        assert!(TokenLogprob::of(&logits, 1, 0).top.is_empty());
    }
}
