//! What the scheduler needs from a model backend (the CPU one here, the GPU
//! one in the `cuda` crate): the model's spec, a KV cache per sequence whose
//! pages come from the scheduler's pool, and a batched forward pass that
//! returns either logits or, for greedy decoding, token ids alone (so that a
//! GPU backend can pick them where the logits are).

use crate::cpu::{CpuModel, Logits};
use crate::kv::{KvCache, KvPool};
use crate::sampler::argmax;
use crate::spec::ModelSpec;
use crate::EngineError;

/// One sequence's key/value cache, wherever it lives.
pub trait Cache: Send {
    /// Positions stored.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Positions it may hold.
    fn capacity(&self) -> usize;
    /// Make room for `positions` positions (pages from the pool); fails
    /// without side effects when the pool is short.
    fn reserve(&mut self, positions: usize) -> Result<(), EngineError>;
    /// Record the tokens of the positions just stored.
    fn record_tokens(&mut self, tokens: &[u32]);
    /// The tokens recorded for the stored positions.
    fn tokens(&self) -> &[u32];
    /// Keep at most the first `len` positions and give back the pages past
    /// them; returns the positions kept, which may be fewer than asked where
    /// the cache cannot write into a page it shares with another.
    fn truncate(&mut self, len: usize) -> usize;
    /// Pages held (a page shared with other caches included).
    fn pages(&self) -> usize;
}

/// One sequence's part of a batched forward pass.
pub struct Segment<'a, C> {
    pub kv: &'a mut C,
    /// Tokens at positions `kv.len()..`.
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// A model that runs forward passes over batches of sequences.
pub trait Backend: Send + Sync + 'static {
    type Cache: Cache;

    fn spec(&self) -> &ModelSpec;

    /// A cache for `context` positions whose pages are drawn from `pool`.
    fn new_cache_in(&self, pool: &KvPool, context: usize) -> Self::Cache;

    /// A cache like [`Backend::new_cache_in`]'s that already holds the
    /// first `n` positions of `from` (keys, values and tokens), or fewer
    /// where the backend shares whole pages only: read its `len()`.
    fn fork_cache(
        &self,
        from: &Self::Cache,
        n: usize,
        pool: &KvPool,
        context: usize,
    ) -> Result<Self::Cache, EngineError>;

    /// Runs every segment's tokens, appends their keys and values to their
    /// caches, and returns each segment's logits as its `logits` asks
    /// (`rows × vocab`).
    fn forward_logits(
        &self,
        batch: &mut [Segment<'_, Self::Cache>],
    ) -> Result<Vec<Vec<f32>>, EngineError>;

    /// As [`Backend::forward_logits`], but returns the index of the largest
    /// logit of each row instead of the row (the first on ties).
    fn forward_greedy(
        &self,
        batch: &mut [Segment<'_, Self::Cache>],
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let vocab = self.spec().vocab_size;
        Ok(self
            .forward_logits(batch)?
            .iter()
            .map(|logits| logits.chunks_exact(vocab).map(argmax).collect())
            .collect())
    }

    /// As [`Backend::forward_greedy`], each row's choice limited to the
    /// tokens its segment's mask allows (none: any token). `masks` gives one
    /// entry per segment; it is called once, as late as the backend can
    /// (masks may still be computed while the pass runs).
    fn forward_greedy_masked(
        &self,
        batch: &mut [Segment<'_, Self::Cache>],
        masks: &mut dyn FnMut() -> Vec<Option<TokenMask>>,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let logits = self.forward_logits(batch)?;
        Ok(masked_argmax_rows(
            &logits,
            self.spec().vocab_size,
            &masks(),
        ))
    }
}

/// Each segment's rows of logits (`vocab` wide) picked greedily within the
/// segment's mask, as [`Backend::forward_greedy_masked`] returns them.
pub fn masked_argmax_rows(
    logits: &[Vec<f32>],
    vocab: usize,
    masks: &[Option<TokenMask>],
) -> Vec<Vec<u32>> {
    logits
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let mask = masks.get(i).and_then(Option::as_ref);
            rows.chunks_exact(vocab)
                .map(|row| masked_argmax(row, mask))
                .collect()
        })
        .collect()
}

/// The tokens allowed next: bit `t % 32` of word `t / 32` is set when token
/// `t` may come (words past the end allow nothing).
pub type TokenMask = Vec<u32>;

/// Whether `mask` allows `token`.
pub fn mask_allows(mask: &[u32], token: usize) -> bool {
    mask.get(token / 32)
        .is_some_and(|w| w >> (token % 32) & 1 == 1)
}

/// The index of the largest logit among the tokens `mask` allows (the first
/// on ties; 0 when it allows none).
pub fn masked_argmax(logits: &[f32], mask: Option<&TokenMask>) -> u32 {
    let Some(mask) = mask else {
        return argmax(logits);
    };
    let mut best: Option<usize> = None;
    for (i, &l) in logits.iter().enumerate() {
        if mask_allows(mask, i) && best.is_none_or(|b| l > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

impl Cache for KvCache {
    fn len(&self) -> usize {
        KvCache::len(self)
    }

    fn capacity(&self) -> usize {
        KvCache::capacity(self)
    }

    fn reserve(&mut self, positions: usize) -> Result<(), EngineError> {
        KvCache::reserve(self, positions)
    }

    fn record_tokens(&mut self, tokens: &[u32]) {
        KvCache::record_tokens(self, tokens)
    }

    fn tokens(&self) -> &[u32] {
        KvCache::tokens(self)
    }

    fn truncate(&mut self, len: usize) -> usize {
        KvCache::truncate(self, len)
    }

    fn pages(&self) -> usize {
        KvCache::pages(self)
    }
}

impl Backend for CpuModel {
    type Cache = KvCache;

    fn spec(&self) -> &ModelSpec {
        CpuModel::spec(self)
    }

    fn new_cache_in(&self, pool: &KvPool, context: usize) -> KvCache {
        CpuModel::new_cache_in(self, pool, context)
    }

    fn fork_cache(
        &self,
        from: &KvCache,
        n: usize,
        pool: &KvPool,
        context: usize,
    ) -> Result<KvCache, EngineError> {
        // Positions are contiguous per sequence here, so a fork is a copy
        // (a memory copy of the keys and values, far cheaper than running
        // the tokens again).
        from.copy_prefix(n, Some(pool), context)
    }

    fn forward_logits(
        &self,
        batch: &mut [Segment<'_, KvCache>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut segments: Vec<crate::cpu::Segment<'_>> = batch
            .iter_mut()
            .map(|s| crate::cpu::Segment {
                kv: &mut *s.kv,
                tokens: s.tokens,
                logits: s.logits,
            })
            .collect();
        // The whole pass runs on a worker of the rayon pool, so that its
        // hundreds of parallel products per token fork and join inside the
        // pool instead of each being injected from this (the scheduler's)
        // thread.
        rayon::scope(|_| CpuModel::forward_batch(self, &mut segments))
    }
}

/// What every backend checks of a segment before running it: tokens to
/// run, room in its cache, ids inside the vocabulary.
pub fn check_segment(
    spec: &ModelSpec,
    tokens: &[u32],
    cached: usize,
    capacity: usize,
) -> Result<(), EngineError> {
    let n = tokens.len();
    if n == 0 {
        return Err(EngineError::Invalid("no tokens to run".into()));
    }
    if cached + n > capacity {
        return Err(EngineError::ContextFull {
            needed: cached + n,
            capacity,
        });
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= spec.vocab_size) {
        return Err(EngineError::Invalid(format!(
            "token id {bad} is outside the vocabulary of {}",
            spec.vocab_size
        )));
    }
    Ok(())
}

/// Rows of results a segment of `length` tokens asks for.
pub fn rows_wanted(logits: Logits, length: usize) -> usize {
    match logits {
        Logits::Last => 1,
        Logits::All => length,
        Logits::None => 0,
    }
}

/// Splits a batch's results (`width` values per wanted row, in batch order)
/// among its segments, given each one's `Logits` and token count.
pub fn split_rows<T: Clone>(
    flat: &[T],
    width: usize,
    modes: &[Logits],
    lengths: &[usize],
) -> Vec<Vec<T>> {
    let mut at = 0;
    modes
        .iter()
        .zip(lengths)
        .map(|(&mode, &length)| {
            let rows = rows_wanted(mode, length);
            let part = flat[at * width..(at + rows) * width].to_vec();
            at += rows;
            part
        })
        .collect()
}

/// The model's final logit soft-capping (`cap · tanh(logit / cap)`, Gemma 2),
/// applied where logits leave a backend. It keeps the order, so greedy ids
/// need none.
pub fn final_softcap(spec: &ModelSpec, logits: &mut [f32]) {
    if let Some(cap) = spec.final_softcap {
        for l in logits.iter_mut() {
            *l = cap * (*l / cap).tanh();
        }
    }
}
