//! The KV cache on the GPU: f16 keys and values in fixed-size pages
//! (`engine::kv::PAGE_TOKENS` positions), shared by every sequence through
//! per-sequence block tables.
//!
//! All pages live in one allocation, `[layer][keys|values][page][position in
//! page][kv_dim]`, so a page index addresses the same slot in every layer. A
//! sequence's [`GpuCache`] holds its block table on the host (uploaded with
//! each step's metadata) and takes pages as it grows: from the scheduler's
//! [`KvPool`] budget (through a CPU cache that stores nothing, so that the
//! pool's counts stay true) and from the device's free list. Dropping the
//! cache gives both back.

use std::sync::{Arc, Mutex};

use engine::backend::Cache;
use engine::kv::{KvCache, KvPool, PAGE_TOKENS};
use engine::EngineError;

use crate::device::CudaDevice;
use crate::error::Result;
use crate::memory::DeviceBuffer;

/// Every layer's pages on the device, and which are free.
pub struct KvPages {
    buffer: DeviceBuffer,
    n_pages: usize,
    kv_dim: usize,
    free: Mutex<Vec<u32>>,
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
            // Handed out from the end: low page numbers first.
            free: Mutex::new((0..n_pages as u32).rev().collect()),
        })
    }

    pub fn n_pages(&self) -> usize {
        self.n_pages
    }

    pub fn free_pages(&self) -> usize {
        self.free.lock().expect("KV free list").len()
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
    budget: Option<KvCache>,
}

impl GpuCache {
    pub fn new(pages: Arc<KvPages>, pool: Option<&KvPool>, capacity: usize) -> Self {
        Self {
            pages,
            table: Vec::new(),
            len: 0,
            capacity,
            tokens: Vec::new(),
            budget: pool.map(|pool| KvCache::new_in(pool, 0, 0, capacity)),
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

    /// Forget positions from `len` on (their pages stay with the cache).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.tokens.truncate(self.len);
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
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
        let mut free = self.pages.free.lock().expect("KV free list");
        if free.len() < extra {
            return Err(EngineError::KvPoolExhausted {
                needed: extra,
                free: free.len(),
            });
        }
        if let Some(budget) = &mut self.budget {
            budget.reserve(positions)?;
        }
        let at = free.len() - extra;
        self.table.extend(free.drain(at..).rev());
        Ok(())
    }

    fn record_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }
}

impl Drop for GpuCache {
    fn drop(&mut self) {
        // Pages go back once no queued work can still write them: the
        // model's forward pass synchronizes before it returns.
        if let Ok(mut free) = self.pages.free.lock() {
            free.extend(self.table.drain(..));
        }
    }
}
