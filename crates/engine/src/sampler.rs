//! Turning logits into the next token: logit bias, repetition, presence
//! and frequency penalties, top-k, top-p, min-p, temperature and a seeded
//! draw, in llama.cpp's order.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings; the defaults are greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below) picks the most likely token.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens; 1 is off.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub penalty_last_n: usize,
    /// OpenAI's: subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before anything else (-100 bans one).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            penalty_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check ranges; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        if self.temperature < 0.0 {
            return Err("temperature must be ≥ 0".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return Err("top_p must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be in [0, 1]".into());
        }
        if self.repetition_penalty <= 0.0 {
            return Err("repetition_penalty must be > 0".into());
        }
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.logit_bias.iter().any(|(_, b)| b.is_nan()) {
            return Err("logit_bias values must be numbers".into());
        }
        Ok(())
    }

    /// Whether the next token is simply the largest logit (a backend may
    /// pick it without handing the logits over).
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logit_bias.is_empty()
    }
}

/// The sampling state of one sequence: its settings, random stream and recent tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    recent: VecDeque<u32>,
    /// How often each token was generated (presence and frequency penalties).
    generated: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            recent: VecDeque::new(),
            generated: std::collections::HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Record a generated token: for the penalty window, and for the
    /// presence and frequency penalties.
    pub fn accept_generated(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
        self.accept(token);
    }

    /// Record a token of the prompt (or a generated one, through
    /// [`Self::accept_generated`]) for the repetition penalty's window.
    pub fn accept(&mut self, token: u32) {
        if self.params.penalty_last_n == 0 {
            return;
        }
        if self.recent.len() == self.params.penalty_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    /// Pick the next token from `logits` (modified in place by the penalty).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::with_capacity(self.recent.len());
            for &t in &self.recent {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        // Then OpenAI's penalties, after the repetition penalty as in llama.cpp.
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(by_logit_desc);

        // top-p and min-p act on the distribution before temperature, as in llama.cpp.
        let probs = softmax(candidates.iter().map(|c| c.1));
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, &pr) in probs.iter().enumerate() {
                cumulative += pr;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            let keep = probs
                .iter()
                .take(candidates.len())
                .take_while(|&&pr| pr >= threshold)
                .count();
            candidates.truncate(keep.max(1));
        }

        let probs = softmax(candidates.iter().map(|c| c.1 / p.temperature));
        let draw: f32 = self.rng.gen();
        let mut cumulative = 0.0;
        for (c, pr) in candidates.iter().zip(&probs) {
            cumulative += pr;
            if draw < cumulative {
                return c.0;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 7,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(5.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 1.5, 1.4, -2.0]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps two tokens.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.7,
            ..params(1.0)
        });
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone()) < 2);
        }
        // min_p 0.3: tokens below 0.3 × 0.64 are dropped, again two remain.
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.3,
            ..params(1.0)
        });
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&mut logits.clone())).collect();
        assert!(draws.iter().all(|&t| t < 2));
        assert!(draws.contains(&1), "the second token is still drawn");
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0f32, 0.0];
        let frequency = |temperature| {
            let mut s = Sampler::new(params(temperature));
            (0..2000)
                .filter(|_| s.sample(&mut logits.clone()) == 0)
                .count() as f32
                / 2000.0
        };
        // p(0) = 1/(1+e^-1/T): 0.73 at T=1, 0.99995 at T=0.1, 0.55 at T=5.
        assert!((frequency(1.0) - 0.731).abs() < 0.04);
        assert!(frequency(0.1) > 0.99);
        assert!((frequency(5.0) - 0.55).abs() < 0.04);
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        s.accept(0);
        // 2.0 / 2 = 1.0 < 1.5, and a negative logit is pushed further down.
        let mut logits = [2.0, 1.5, -1.0];
        assert_eq!(s.sample(&mut logits), 1);
        assert_eq!(logits, [1.0, 1.5, -1.0]);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        s.accept(2);
        let mut logits = [2.0, 1.5, -1.0];
        s.sample(&mut logits);
        assert_eq!(logits[2], -2.0);
    }

    #[test]
    fn validation_names_the_field() {
        assert!(SamplingParams {
            temperature: f32::NAN,
            ..params(0.0)
        }
        .validate()
        .unwrap_err()
        .contains("temperature"));
        assert!(SamplingParams {
            top_p: 1.5,
            ..params(0.0)
        }
        .validate()
        .unwrap_err()
        .contains("top_p"));
        assert!(SamplingParams {
            min_p: -0.1,
            ..params(0.0)
        }
        .validate()
        .unwrap_err()
        .contains("min_p"));
        assert!(SamplingParams {
            repetition_penalty: 0.0,
            ..params(0.0)
        }
        .validate()
        .unwrap_err()
        .contains("repetition_penalty"));
        assert!(params(0.7).validate().is_ok());
    }

    #[test]
    fn logit_bias_bans_and_promotes() {
        let logits = [1.0, 5.0, 2.0, 4.5];
        let mut banned = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..params(0.0)
        });
        assert_eq!(banned.sample(&mut logits.clone()), 3);
        let mut promoted = Sampler::new(SamplingParams {
            logit_bias: vec![(0, 4.5)],
            ..params(0.0)
        });
        assert_eq!(promoted.sample(&mut logits.clone()), 0);
        // Sampled, a banned token never comes.
        let mut sampled = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0), (3, -100.0)],
            ..params(1.0)
        });
        for _ in 0..200 {
            let t = sampled.sample(&mut logits.clone());
            assert!(t == 0 || t == 2, "{t}");
        }
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        // mu[j] - c[j] * frequency - (c[j] > 0) * presence, over generated tokens only.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params(0.0)
        });
        s.accept(1); // a prompt token: not penalized
        s.accept_generated(2);
        s.accept_generated(2);
        s.accept_generated(3);
        let mut logits = vec![0.0, 1.0, 2.0, 3.0];
        s.sample(&mut logits);
        assert_eq!(logits, [0.0, 1.0, 2.0 - 2.0 * 0.25 - 0.5, 3.0 - 0.25 - 0.5]);
        assert!(!s.params().is_plain_greedy());
        assert!(params(0.0).is_plain_greedy());
    }
}
