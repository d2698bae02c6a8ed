//! Plain device allocations addressed by raw pointer: the forward pass's
//! weights (f16 mode), vectors, KV pages and workspace.
//!
//! They are `cuMemAlloc`s, like the weight arena, so that what the model
//! holds is exact in `cuMemGetInfo` and nothing lingers in a stream-ordered
//! pool. Kernels take raw addresses (several buffers are carved into named
//! regions), so the owner keeps each buffer alive while work that uses it may
//! still run: `CudaModel` synchronizes its stream before dropping them.

use std::sync::Arc;

use cudarc::driver::{result as driver, CudaContext};

use crate::device::CudaDevice;
use crate::error::{DriverContext, Result};

/// Device bytes, freed on drop.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    context: Arc<CudaContext>,
}

impl DeviceBuffer {
    /// `bytes` uninitialized bytes (at least 1 is allocated); `what` names it in errors.
    pub fn new(device: &CudaDevice, bytes: usize, what: &str) -> Result<Self> {
        let context = device.context().clone();
        context
            .bind_to_thread()
            .context(|| format!("binding GPU {}", device.index()))?;
        // SAFETY: a plain allocation; its users write before they read.
        let ptr = unsafe { driver::malloc_sync(bytes.max(1)) }.context(|| {
            format!(
                "allocating {bytes} bytes ({:.1} MiB) for {what} on GPU {}",
                bytes as f64 / 1048576.0,
                device.index()
            )
        })?;
        Ok(Self {
            ptr,
            bytes,
            context,
        })
    }

    /// Its device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.context.record_err(self.context.bind_to_thread());
        // SAFETY: `ptr` came from cuMemAlloc and is freed only here; the
        // owner has waited for the work that used it (see the module doc).
        self.context
            .record_err(unsafe { driver::free_sync(self.ptr) });
    }
}

/// Lays regions out one after another at 256-byte boundaries, for carving
/// one allocation into named buffers.
#[derive(Default)]
pub struct Layout {
    bytes: usize,
}

impl Layout {
    /// Reserves `bytes` and returns their offset.
    pub fn add(&mut self, bytes: usize) -> usize {
        let offset = self.bytes.next_multiple_of(256);
        self.bytes = offset + bytes;
        offset
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
