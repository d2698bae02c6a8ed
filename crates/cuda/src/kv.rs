//! The KV cache on the GPU: f16 keys and values in fixed-size pages
//! (`engine::kv::PAGE_TOKENS` positions), shared by every sequence through
//! per-sequence block tables.
//!
//! All pages live in one allocation, `[layer][keys|values][page][position in
//! page][kv_dim]`, so a page index addresses the same slot in every layer. A
//! sequence's [`GpuCache`] holds its block table on the host (uploaded with
//! each step's metadata) and takes pages as it grows, from the device's free
//! list and from the scheduler's [`KvPool`] budget. A fork for the prefix
//! cache shares whole pages (each page counts its holders) and copies the
//! last, partly used one into a page of its own; a page goes back to both
//! when its last holder lets go. A cache never writes into a page another
//! holds: it appends past its own positions, and truncating to the middle of
//! a shared page keeps only the whole pages before it.

use std::sync::{Arc, Mutex};

use engine::backend::Cache;
use engine::kv::{KvPool, PAGE_TOKENS};
use engine::EngineError;

use crate::device::CudaDevice;
use crate::error::Result;
use crate::memory::DeviceBuffer;

/// Every layer's pages on the device, and which are free.
pub struct KvPages {
    buffer: DeviceBuffer,
    n_pages: usize,
    kv_dim: usize,
    state: Mutex<PageState>,
}

struct PageState {
    free: Vec<u32>,
    /// Caches holding each page.
    holders: Vec<u32>,
}

impl PageState {
    /// Let go of `pages`; returns how many became free.
    fn release(&mut self, pages: impl IntoIterator<Item = u32>) -> usize {
        let mut freed = 0;
        for page in pages {
            let holders = &mut self.holders[page as usize];
            *holders -= 1;
            if *holders == 0 {
                self.free.push(page);
                freed += 1;
            }
        }
        freed
    }
}

impl KvPages {
    /// Bytes of `n_pages` pages for a model of `n_layers` layers.
    pub fn bytes_for(n_layers: usize, kv_dim: usize, n_pages: usize) -> usize {
        n_layers * 2 * n_pages * PAGE_TOKENS * kv_dim * 2
    }

    pub fn new(
        device: &CudaDevice,
        n_layers: usize,
        kv_dim: usize,
        n_pages: usize,
    ) -> Result<Self> {
        let bytes = Self::bytes_for(n_layers, kv_dim, n_pages);
        Ok(Self {
            buffer: DeviceBuffer::new(device, bytes, "the KV cache")?,
            n_pages,
            kv_dim,
            state: Mutex::new(PageState {
                // Handed out from the end: low page numbers first.
                free: (0..n_pages as u32).rev().collect(),
                holders: vec![0; n_pages],
            }),
        })
    }

    pub fn n_pages(&self) -> usize {
        self.n_pages
    }

    pub fn free_pages(&self) -> usize {
        self.state().free.len()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PageState> {
        // The state is consistent between statements, so a panic elsewhere
        // while it was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes(&self) -> usize {
        self.buffer.bytes()
    }

    fn layer_bytes(&self) -> u64 {
        (self.n_pages * PAGE_TOKENS * self.kv_dim * 2) as u64
    }

    /// Device address of layer `layer`'s key pages.
    pub fn keys(&self, layer: usize) -> u64 {
        self.buffer.ptr() + 2 * layer as u64 * self.layer_bytes()
    }

    /// Device address of layer `layer`'s value pages.
    pub fn values(&self, layer: usize) -> u64 {
        self.keys(layer) + self.layer_bytes()
    }

    /// Queues on `device`'s stream the copy of page `from` into page `to`,
    /// keys and values of every layer. The thread must have the device's
    /// context current.
    pub(crate) fn copy_page(&self, device: &CudaDevice, from: u32, to: u32) -> Result<()> {
        use crate::error::DriverContext;
        let page = (PAGE_TOKENS * self.kv_dim * 2) as u64;
        let n_layers = self.buffer.bytes() / (2 * self.layer_bytes() as usize);
        let stream = device.stream();
        for layer in 0..n_layers {
            for base in [self.keys(layer), self.values(layer)] {
                // SAFETY: both pages lie within the allocation (page indices
                // below n_pages), and they are different pages.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        base + u64::from(to) * page,
                        base + u64::from(from) * page,
                        page as usize,
                        stream.cu_stream(),
                    )
                }
                .context(|| "copying a KV page".into())?;
            }
        }
        Ok(())
    }
}

/// One sequence's cache on the GPU.
pub struct GpuCache {
    pages: Arc<KvPages>,
    /// Page of positions `PAGE_TOKENS * i ..`: entry i.
    table: Vec<u32>,
    len: usize,
    capacity: usize,
    tokens: Vec<u32>,
    /// The scheduler's page budget, when there is one.
    pool: Option<KvPool>,
}

impl GpuCache {
    pub fn new(pages: Arc<KvPages>, pool: Option<&KvPool>, capacity: usize) -> Self {
        Self {
            pages,
            table: Vec::new(),
            len: 0,
            capacity,
            tokens: Vec::new(),
            pool: pool.cloned(),
        }
    }

    /// A cache holding `from`'s first `n` positions: its whole pages shared
    /// with `from`, the last, partly used one copied into a page of its own
    /// on `device` (queued; the thread must have its context current) — or,
    /// when no page is free for that, only the whole pages.
    pub fn fork(
        device: &CudaDevice,
        from: &GpuCache,
        n: usize,
        pool: Option<&KvPool>,
        capacity: usize,
    ) -> Result<Self> {
        let n = n.min(from.len).min(capacity);
        let mut fork = Self::share(from, n, pool, capacity);
        if n > fork.len && fork.reserve(n).is_ok() {
            let whole = fork.len / PAGE_TOKENS;
            from.pages
                .copy_page(device, from.table[whole], fork.table[whole])?;
            fork.len = n;
            fork.tokens = from.tokens[..n.min(from.tokens.len())].to_vec();
        }
        Ok(fork)
    }

    /// The whole pages of `from`'s first `n` positions, shared with it.
    fn share(from: &GpuCache, n: usize, pool: Option<&KvPool>, capacity: usize) -> Self {
        let whole = n.min(from.len).min(capacity) / PAGE_TOKENS;
        let table = from.table[..whole].to_vec();
        {
            let mut state = from.pages.state();
            for &page in &table {
                state.holders[page as usize] += 1;
            }
        }
        let len = whole * PAGE_TOKENS;
        Self {
            pages: from.pages.clone(),
            table,
            len,
            capacity,
            tokens: from.tokens[..len.min(from.tokens.len())].to_vec(),
            pool: pool.cloned(),
        }
    }

    /// The block table: the page of each `PAGE_TOKENS` positions.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// Mark `n` positions written by a forward pass as stored.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.table.len() * PAGE_TOKENS);
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Let go of the table's pages from entry `keep` on.
    fn release_from(&mut self, keep: usize) {
        if keep >= self.table.len() {
            return;
        }
        let freed = self.pages.state().release(self.table.drain(keep..));
        if let Some(pool) = &self.pool {
            pool.give_back(freed);
        }
    }
}

impl Cache for GpuCache {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn reserve(&mut self, positions: usize) -> Result<(), EngineError> {
        let needed = positions.div_ceil(PAGE_TOKENS);
        if needed <= self.table.len() {
            return Ok(());
        }
        let extra = needed - self.table.len();
        let mut state = self.pages.state();
        if state.free.len() < extra {
            return Err(EngineError::KvPoolExhausted {
                needed: extra,
                free: state.free.len(),
            });
        }
        if let Some(pool) = &self.pool {
            if !pool.take(extra) {
                return Err(EngineError::KvPoolExhausted {
                    needed: extra,
                    free: pool.free_pages(),
                });
            }
        }
        let at = state.free.len() - extra;
        let taken: Vec<u32> = state.free.drain(at..).rev().collect();
        for &page in &taken {
            state.holders[page as usize] = 1;
        }
        self.table.extend(taken);
        Ok(())
    }

    fn record_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn truncate(&mut self, len: usize) -> usize {
        let mut keep = len.min(self.len);
        if !keep.is_multiple_of(PAGE_TOKENS) {
            let page = self.table[keep / PAGE_TOKENS];
            if self.pages.state().holders[page as usize] > 1 {
                // The next write would land in a page another cache reads.
                keep -= keep % PAGE_TOKENS;
            }
        }
        self.release_from(keep.div_ceil(PAGE_TOKENS));
        self.len = keep;
        self.tokens.truncate(keep);
        keep
    }

    fn pages(&self) -> usize {
        self.table.len()
    }
}

impl Drop for GpuCache {
    fn drop(&mut self) {
        // Pages go back once no queued work can still write them: the
        // model's forward pass synchronizes before it returns.
        self.release_from(0);
    }
}
