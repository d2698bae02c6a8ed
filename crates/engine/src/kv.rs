//! Key/value caches on the CPU, in fixed-size pages drawn from a shared budget.
//!
//! Each sequence's cache grows a page (`PAGE_TOKENS` positions) at a time;
//! the pages are counted against a [`KvPool`] shared by every sequence of
//! the scheduler, so admission can wait for room instead of over-committing
//! memory, and a sequence's pages return to the pool when its cache is
//! dropped (finished, cancelled or disconnected alike).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::EngineError;

/// Positions per page.
pub const PAGE_TOKENS: usize = 16;

/// A budget of KV pages shared by many caches.
#[derive(Clone, Debug)]
pub struct KvPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    total: usize,
    used: AtomicUsize,
}

impl KvPool {
    pub fn new(total_pages: usize) -> Self {
        KvPool {
            inner: Arc::new(PoolInner {
                total: total_pages,
                used: AtomicUsize::new(0),
            }),
        }
    }

    /// Enough pages for `positions` tokens in total.
    pub fn for_positions(positions: usize) -> Self {
        Self::new(positions.div_ceil(PAGE_TOKENS))
    }

    pub fn total_pages(&self) -> usize {
        self.inner.total
    }

    pub fn used_pages(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    pub fn free_pages(&self) -> usize {
        self.total_pages() - self.used_pages()
    }

    /// Take `pages` from the budget; `false` (and nothing taken) when fewer are free.
    pub fn take(&self, pages: usize) -> bool {
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(pages)
                    .filter(|&after| after <= self.inner.total)
            })
            .is_ok()
    }

    /// Return `pages` taken earlier.
    pub fn give_back(&self, pages: usize) {
        self.inner.used.fetch_sub(pages, Ordering::AcqRel);
    }
}

/// Keys and values of every layer for positions `0..len`, f32.
/// Layout per layer: `[position][kv_head][head_dim]`.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// The token at each stored position, when the caller records them
    /// (lets a new prompt reuse the cached prefix it shares).
    tokens: Vec<u32>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
    pool: Option<KvPool>,
    pages: usize,
}

impl KvCache {
    /// A cache for at most `capacity` positions, not limited by any pool.
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        KvCache {
            keys: vec![Vec::new(); n_layers],
            values: vec![Vec::new(); n_layers],
            tokens: Vec::new(),
            kv_dim,
            len: 0,
            capacity,
            pool: None,
            pages: 0,
        }
    }

    /// A cache whose pages are counted against `pool`.
    pub fn new_in(pool: &KvPool, n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        let mut cache = Self::new(n_layers, kv_dim, capacity);
        cache.pool = Some(pool.clone());
        cache
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages held.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Make room for `positions` positions, taking pages from the pool.
    pub fn reserve(&mut self, positions: usize) -> Result<(), EngineError> {
        let needed = positions.div_ceil(PAGE_TOKENS);
        if needed <= self.pages {
            return Ok(());
        }
        let extra = needed - self.pages;
        if let Some(pool) = &self.pool {
            if !pool.take(extra) {
                return Err(EngineError::KvPoolExhausted {
                    needed: extra,
                    free: pool.free_pages(),
                });
            }
        }
        // Memory is taken here, so a failed allocation is an error for this
        // sequence alone, never an abort of the process and its other jobs.
        let floats = needed
            .checked_mul(PAGE_TOKENS * self.kv_dim)
            .ok_or(EngineError::KvAllocation { positions })?;
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            if layer.try_reserve_exact(floats - layer.len()).is_err() {
                if let Some(pool) = &self.pool {
                    pool.give_back(extra);
                }
                return Err(EngineError::KvAllocation { positions });
            }
        }
        self.pages = needed;
        Ok(())
    }

    /// Keep the first `len` positions (at most those stored) and give back
    /// the pages past them; returns the positions kept.
    pub fn truncate(&mut self, len: usize) -> usize {
        let len = len.min(self.len);
        let pages = len.div_ceil(PAGE_TOKENS);
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.truncate(len * self.kv_dim);
            layer.shrink_to(pages * PAGE_TOKENS * self.kv_dim);
        }
        self.tokens.truncate(len);
        self.len = len;
        if pages < self.pages {
            if let Some(pool) = &self.pool {
                pool.give_back(self.pages - pages);
            }
            self.pages = pages;
        }
        len
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// A new cache (pages from `pool`, for at most `capacity` positions)
    /// holding a copy of this one's first `n` positions and their tokens.
    pub fn copy_prefix(
        &self,
        n: usize,
        pool: Option<&KvPool>,
        capacity: usize,
    ) -> Result<KvCache, EngineError> {
        let n = n.min(self.len).min(capacity);
        let mut copy = KvCache::new(self.keys.len(), self.kv_dim, capacity);
        copy.pool = pool.cloned();
        copy.reserve(n)?;
        let floats = n * self.kv_dim;
        for (to, from) in copy.keys.iter_mut().zip(&self.keys) {
            to.extend_from_slice(&from[..floats]);
        }
        for (to, from) in copy.values.iter_mut().zip(&self.values) {
            to.extend_from_slice(&from[..floats]);
        }
        copy.tokens = self.tokens[..n.min(self.tokens.len())].to_vec();
        copy.len = n;
        Ok(copy)
    }

    /// Append `n` positions of keys and values for `layer` (`n × kv_dim` each).
    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        self.keys[layer].extend_from_slice(keys);
        self.values[layer].extend_from_slice(values);
    }

    /// Mark `n` positions appended to every layer as stored.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.keys.iter().all(|k| k.len() == self.len * self.kv_dim));
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Record the tokens of the positions just committed.
    pub fn record_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// Tokens recorded for the stored positions (may be fewer than `len`).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.capacity() * 4)
            .sum()
    }
}

/// Bytes of one page of a CPU cache: f32 keys and values of every layer
/// for [`PAGE_TOKENS`] positions.
pub fn cpu_page_bytes(n_layers: usize, kv_dim: usize) -> u64 {
    (PAGE_TOKENS * n_layers * kv_dim * 2 * std::mem::size_of::<f32>()) as u64
}

/// Bytes of memory the system can still give (`MemAvailable`), where known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Check that a KV budget of `bytes` (every page of every sequence) can be
/// held in host memory, so that no request can later ask for more than the
/// machine has; `what` says what sized it, for the error.
pub fn check_host_budget(bytes: u128, what: &str) -> Result<(), EngineError> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    if bytes > u128::from(available) {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        return Err(EngineError::Invalid(format!(
            "{what} needs {:.1} GiB of KV cache, but only {:.1} GiB of memory is available; lower it",
            gib(bytes as f64),
            gib(available as f64)
        )));
    }
    Ok(())
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.give_back(self.pages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_taken_as_positions_grow_and_returned_on_drop() {
        let pool = KvPool::new(4);
        let mut a = KvCache::new_in(&pool, 2, 8, 1000);
        a.reserve(1).unwrap();
        assert_eq!((a.pages(), pool.used_pages()), (1, 1));
        a.reserve(PAGE_TOKENS * 3).unwrap();
        assert_eq!(pool.used_pages(), 3);
        let mut b = KvCache::new_in(&pool, 2, 8, 1000);
        let err = b.reserve(PAGE_TOKENS * 2).unwrap_err();
        assert!(err.to_string().contains("1 free"), "{err}");
        b.reserve(PAGE_TOKENS).unwrap();
        assert_eq!(pool.free_pages(), 0);
        drop(a);
        assert_eq!(pool.used_pages(), 1);
        drop(b);
        assert_eq!(pool.used_pages(), 0);
    }

    #[test]
    fn a_copied_prefix_holds_the_same_positions_and_truncating_gives_pages_back() {
        let pool = KvPool::new(8);
        let kv_dim = 4;
        let mut a = KvCache::new_in(&pool, 2, kv_dim, 1000);
        let n = PAGE_TOKENS * 2 + 3;
        a.reserve(n + PAGE_TOKENS * 2).unwrap();
        for layer in 0..2 {
            let keys: Vec<f32> = (0..n * kv_dim).map(|i| (i + layer * 1000) as f32).collect();
            let values: Vec<f32> = keys.iter().map(|k| -k).collect();
            a.append(layer, &keys, &values);
        }
        a.commit(n);
        a.record_tokens(&(0..n as u32).collect::<Vec<_>>());
        assert_eq!(pool.used_pages(), 5);

        let b = a.copy_prefix(PAGE_TOKENS + 1, Some(&pool), 1000).unwrap();
        assert_eq!(
            (b.len(), b.pages(), pool.used_pages()),
            (PAGE_TOKENS + 1, 2, 7)
        );
        for layer in 0..2 {
            let floats = (PAGE_TOKENS + 1) * kv_dim;
            assert_eq!(b.layer(layer).0, &a.layer(layer).0[..floats]);
            assert_eq!(b.layer(layer).1, &a.layer(layer).1[..floats]);
        }
        assert_eq!(b.tokens(), &a.tokens()[..PAGE_TOKENS + 1]);
        // Two more pages than the pool has left: refused, nothing taken.
        assert!(a.copy_prefix(n, Some(&pool), 1000).is_err());
        assert_eq!(pool.used_pages(), 7);

        // Truncating keeps the positions asked for and frees the pages past them.
        assert_eq!(a.truncate(PAGE_TOKENS + 2), PAGE_TOKENS + 2);
        assert_eq!((a.pages(), pool.used_pages()), (2, 4));
        assert_eq!(a.truncate(n), PAGE_TOKENS + 2, "truncating never grows");
        drop(a);
        drop(b);
        assert_eq!(pool.used_pages(), 0);
    }

    #[test]
    fn an_allocation_the_machine_cannot_give_is_an_error_not_an_abort() {
        // A budget far past any machine's memory (as an unchecked --ctx-size
        // of 2^32 gave): reserving is an error and the pages go back.
        let pool = KvPool::new(1 << 40);
        let mut cache = KvCache::new_in(&pool, 30, 192, usize::MAX);
        let err = cache.reserve(1 << 40).unwrap_err();
        assert!(err.to_string().contains("cannot allocate"), "{err}");
        assert_eq!((pool.used_pages(), cache.pages()), (0, 0));
        assert!(cache.reserve(usize::MAX).is_err());
        cache.reserve(PAGE_TOKENS).unwrap();
        assert_eq!(pool.used_pages(), 1);
    }

    #[test]
    fn a_budget_past_the_available_memory_is_refused() {
        if available_memory().is_none() {
            return;
        }
        let err = check_host_budget(1 << 60, "--ctx-size 4294967296").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--ctx-size 4294967296 needs 1073741824.0 GiB of KV cache, but only"),
            "{err}"
        );
        check_host_budget(1 << 20, "a small context").unwrap();
    }
}
