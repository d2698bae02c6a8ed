//! Weight upload: a GGUF file's tensors, as raw blocks, into one device
//! allocation.
//!
//! The tensors are laid out back to back in an arena (each at a 256-byte
//! boundary). The arena's image is streamed through a few pinned staging
//! buffers: while the copy engine moves chunk i to the device on the copy
//! stream, the host fills chunk i+1 (from the memory map, on the rayon pool)
//! into the next buffer; an event per buffer says when its last copy is done
//! and it may be refilled. Copies from pinned memory run at full PCIe speed
//! (53 GB/s measured on an H100 host, against 6 from pageable memory), so
//! the host side decides the load time: pinning the staging memory and
//! reading the file.
//!
//! Measured on an H200 machine (16 cores) with a 374 MiB Qwen2.5-0.5B
//! Q4_K_M file in the page cache, each upload from a freshly opened file
//! (`upload_staging_sweep` in tests/gpu.rs): pinning costs about 0.3 ms per
//! MiB (2 x 64 MiB: 47 ms of a 62 ms upload, 6.3 GB/s), and each staging
//! chunk costs a fixed ~0.2 ms of fill overhead, so small chunks lose too
//! (8 x 2 MiB: 8.2 GB/s). 2 x 16 MiB was best: 21-22 ms, 17.5-18.4 GB/s
//! (10 ms pinning, 10 ms filling, under 1 ms waiting for copies). With a
//! cold page cache the disk decides (1.75 GB/s there).
//!
//! The arena is a plain `cuMemAlloc` rather than a stream-ordered pool
//! allocation, so that what the weights cost is exact and visible in
//! `cuMemGetInfo`, and nothing of it lingers in a pool after it is freed.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::time::Instant;

use cudarc::driver::{
    result as driver, CudaEvent, CudaSlice, CudaView, DevicePtr, PinnedHostSlice,
};
use gguf::{GgmlType, GgufFile};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::device::CudaDevice;
use crate::error::{CudaError, DriverContext, Result};

/// Where each tensor starts in the arena.
const TENSOR_ALIGNMENT: usize = 256;
/// Host bytes filled by one rayon task.
const FILL_TASK_BYTES: usize = 1 << 20;
const MIB: f64 = 1024.0 * 1024.0;

/// How to upload.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Device memory the KV cache will need, counted in the free-memory check.
    pub kv_cache_bytes: u64,
    /// Size of each pinned staging buffer.
    pub staging_bytes: usize,
    /// Number of staging buffers (at least 2, so that one fills while one copies).
    pub staging_buffers: usize,
    /// Allocate the staging buffers write-combined (fast for the host to
    /// write and the GPU to read, slow for the host to read; only written here).
    pub write_combined: bool,
    /// Draw a progress bar on stderr (when it is a terminal) and print a
    /// summary line at the end.
    pub progress: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            kv_cache_bytes: 0,
            staging_bytes: 16 << 20,
            staging_buffers: 2,
            write_combined: true,
            progress: true,
        }
    }
}

/// One tensor in the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTensor {
    pub name: String,
    pub ty: GgmlType,
    /// GGUF order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// Byte range in the arena.
    pub range: Range<usize>,
}

impl DeviceTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A model's tensors on the device, as raw GGUF blocks in one allocation.
pub struct DeviceWeights {
    /// Always `Some` until drop, which frees it with `cuMemFree`.
    arena: Option<CudaSlice<u8>>,
    tensors: Vec<DeviceTensor>,
    by_name: HashMap<String, usize>,
}

impl DeviceWeights {
    pub fn tensors(&self) -> &[DeviceTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&DeviceTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The device bytes of `tensor`.
    pub fn data(&self, tensor: &DeviceTensor) -> CudaView<'_, u8> {
        self.arena().slice(tensor.range.clone())
    }

    /// Device address of `tensor`'s first byte (for kernels that take raw addresses).
    pub fn device_ptr(&self, tensor: &DeviceTensor) -> u64 {
        let arena = self.arena();
        // Event tracking is off (CudaDevice), so the returned guard records nothing.
        let (base, _guard) = arena.device_ptr(arena.stream());
        base + tensor.range.start as u64
    }

    /// Bytes allocated on the device for the weights.
    pub fn allocated_bytes(&self) -> usize {
        self.arena().len()
    }

    fn arena(&self) -> &CudaSlice<u8> {
        self.arena.as_ref().expect("the arena lives until drop")
    }
}

impl Drop for DeviceWeights {
    fn drop(&mut self) {
        let Some(arena) = self.arena.take() else {
            return;
        };
        let stream = arena.stream().clone();
        let context = stream.context().clone();
        // Work queued on other streams that reads the weights must be done
        // before the memory goes back; the owner of those streams ensures that
        // (see CudaDevice), this stream's own work is waited for here.
        context.record_err(stream.synchronize());
        let pointer = arena.leak();
        context.record_err(context.bind_to_thread());
        // SAFETY: `pointer` came from cuMemAlloc in `upload_weights`, the
        // CudaSlice that wrapped it was leaked (so it does not free it too),
        // and no work on its stream is pending.
        context.record_err(unsafe { driver::free_sync(pointer) });
    }
}

/// What an upload did, and where its time went.
#[derive(Clone, Debug)]
pub struct UploadReport {
    pub tensors: usize,
    /// Tensor bytes copied (the arena's padding not counted).
    pub tensor_bytes: u64,
    /// Bytes of the device allocation.
    pub allocated_bytes: u64,
    /// From the start of the upload to the last copy's completion.
    pub seconds: f64,
    /// Allocating (pinning) the staging buffers.
    pub staging_seconds: f64,
    /// Filling staging buffers from the file.
    pub fill_seconds: f64,
    /// Waiting for copies (a staging buffer to come free, and the last copy).
    pub wait_seconds: f64,
    /// Free device memory before and after (cuMemGetInfo).
    pub free_before: u64,
    pub free_after: u64,
    pub total: u64,
}

impl UploadReport {
    pub fn gigabytes_per_second(&self) -> f64 {
        self.tensor_bytes as f64 / self.seconds / 1e9
    }
}

impl fmt::Display for UploadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uploaded {} tensors, {} bytes ({:.1} MiB) in {:.1} ms ({:.2} GB/s: staging {:.1} ms, \
             fill {:.1} ms, copy wait {:.1} ms); GPU memory: {} bytes allocated, {} bytes used \
             (free {:.1} -> {:.1} of {:.1} MiB)",
            self.tensors,
            self.tensor_bytes,
            self.tensor_bytes as f64 / MIB,
            self.seconds * 1e3,
            self.gigabytes_per_second(),
            self.staging_seconds * 1e3,
            self.fill_seconds * 1e3,
            self.wait_seconds * 1e3,
            self.allocated_bytes,
            self.free_before.saturating_sub(self.free_after),
            self.free_before as f64 / MIB,
            self.free_after as f64 / MIB,
            self.total as f64 / MIB,
        )
    }
}

/// A tensor's bytes in the file and where they go in the arena.
struct Placement<'a> {
    data: &'a [u8],
    offset: usize,
}

/// Uploads every tensor of `gguf` to `device`, after checking that the
/// weights and `options.kv_cache_bytes` fit in free memory.
pub fn upload_weights(
    device: &CudaDevice,
    gguf: &GgufFile,
    options: &UploadOptions,
) -> Result<(DeviceWeights, UploadReport)> {
    if options.staging_bytes == 0 || options.staging_buffers < 2 {
        return Err(CudaError::Invalid {
            what: "upload options".into(),
            reason: format!(
                "need at least 2 staging buffers of at least 1 byte, got {} of {} bytes",
                options.staging_buffers, options.staging_bytes
            ),
        });
    }
    let start = Instant::now();
    let mut placements = Vec::with_capacity(gguf.tensors().len());
    let mut tensors = Vec::with_capacity(gguf.tensors().len());
    let mut arena_bytes = 0usize;
    for info in gguf.tensors() {
        let data = gguf.tensor_data(info);
        let offset = arena_bytes.next_multiple_of(TENSOR_ALIGNMENT);
        arena_bytes = offset + data.len();
        placements.push(Placement { data, offset });
        tensors.push(DeviceTensor {
            name: info.name.clone(),
            ty: info.ty,
            dims: info.dims.clone(),
            range: offset..arena_bytes,
        });
    }
    let tensor_bytes: u64 = placements.iter().map(|p| p.data.len() as u64).sum();

    let memory = device.memory()?;
    let need = arena_bytes as u64 + options.kv_cache_bytes;
    if need > memory.free {
        return Err(CudaError::OutOfMemory {
            device: device.index(),
            name: device.name().to_string(),
            need_mib: need as f64 / MIB,
            weights_mib: arena_bytes as f64 / MIB,
            kv_mib: options.kv_cache_bytes as f64 / MIB,
            free_mib: memory.free as f64 / MIB,
            total_mib: memory.total as f64 / MIB,
        });
    }

    let stream = device.copy_stream();
    let context = device.context();
    context
        .bind_to_thread()
        .context(|| format!("binding GPU {}", device.index()))?;
    // SAFETY: a plain allocation of arena_bytes (at least 1); every byte of it
    // is written below before anyone reads it (the image covers the padding too).
    let pointer = unsafe { driver::malloc_sync(arena_bytes.max(1)) }.context(|| {
        format!(
            "allocating {arena_bytes} bytes for the weights on GPU {}",
            device.index()
        )
    })?;
    // SAFETY: `pointer` is a fresh allocation of arena_bytes.max(1) bytes;
    // DeviceWeights frees it with cuMemFree (never through the CudaSlice).
    let arena = DeviceWeights {
        arena: Some(unsafe { stream.upgrade_device_ptr::<u8>(pointer, arena_bytes) }),
        by_name: tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect(),
        tensors,
    };

    let progress = if options.progress {
        let bar =
            ProgressBar::with_draw_target(Some(arena_bytes as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "uploading weights {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
            )
            .expect("valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let staging_start = Instant::now();
    let chunk = options.staging_bytes.min(arena_bytes.max(1));
    let flags = if options.write_combined {
        cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
    } else {
        0
    };
    let mut staging: Vec<(PinnedHostSlice<u8>, CudaEvent)> =
        Vec::with_capacity(options.staging_buffers);
    for _ in 0..options
        .staging_buffers
        .min(arena_bytes.div_ceil(chunk).max(1))
    {
        // SAFETY: staging memory is only read (by the copy) after being filled.
        let buffer = unsafe { context.alloc_pinned_with_flags::<u8>(chunk, flags) }
            .context(|| format!("allocating {chunk} bytes of pinned staging memory"))?;
        let done = context
            .new_event(None)
            .context(|| "creating a staging event".into())?;
        staging.push((buffer, done));
    }
    let staging_seconds = staging_start.elapsed().as_secs_f64();

    let (mut fill_seconds, mut wait_seconds) = (0.0, 0.0);
    let n_buffers = staging.len();
    for (i, start_byte) in (0..arena_bytes).step_by(chunk).enumerate() {
        let end_byte = (start_byte + chunk).min(arena_bytes);
        let (buffer, done) = &mut staging[i % n_buffers];
        // The buffer's previous copy must be finished before it is refilled.
        let wait_start = Instant::now();
        done.synchronize()
            .context(|| "waiting for a staging buffer".into())?;
        wait_seconds += wait_start.elapsed().as_secs_f64();

        let fill_start = Instant::now();
        let host = buffer
            .as_mut_slice()
            .context(|| "mapping a staging buffer".into())?;
        let host = &mut host[..end_byte - start_byte];
        fill(host, start_byte, &placements);
        fill_seconds += fill_start.elapsed().as_secs_f64();
        // SAFETY: `host` is pinned memory left untouched until `done` completes
        // (waited for above before the next fill, and by the stream
        // synchronize below); the destination range lies inside the arena.
        unsafe { driver::memcpy_htod_async(pointer + start_byte as u64, host, stream.cu_stream()) }
            .context(|| {
                format!(
                    "copying weight bytes {start_byte}..{end_byte} to GPU {}",
                    device.index()
                )
            })?;
        done.record(stream)
            .context(|| "recording a staging event".into())?;
        progress.inc((end_byte - start_byte) as u64);
    }
    let wait_start = Instant::now();
    stream
        .synchronize()
        .context(|| format!("waiting for the weight upload to GPU {}", device.index()))?;
    wait_seconds += wait_start.elapsed().as_secs_f64();
    let seconds = start.elapsed().as_secs_f64();
    progress.finish_and_clear();
    drop(staging);

    let after = device.memory()?;
    let report = UploadReport {
        tensors: arena.tensors.len(),
        tensor_bytes,
        allocated_bytes: arena_bytes as u64,
        seconds,
        staging_seconds,
        fill_seconds,
        wait_seconds,
        free_before: memory.free,
        free_after: after.free,
        total: after.total,
    };
    if options.progress {
        eprintln!("{report}");
    }
    Ok((arena, report))
}

/// Writes the arena image's bytes `start..start + dst.len()` into `dst`:
/// tensor bytes where a tensor lies, zeros in the alignment padding.
fn fill(dst: &mut [u8], start: usize, placements: &[Placement<'_>]) {
    dst.par_chunks_mut(FILL_TASK_BYTES)
        .enumerate()
        .for_each(|(task, dst)| {
            let task_start = start + task * FILL_TASK_BYTES;
            let task_end = task_start + dst.len();
            // The first tensor that ends after task_start (placements are sorted by offset).
            let first = placements.partition_point(|p| p.offset + p.data.len() <= task_start);
            let mut written = task_start;
            for p in placements[first..]
                .iter()
                .take_while(|p| p.offset < task_end)
            {
                let from = p.offset.max(task_start);
                let to = (p.offset + p.data.len()).min(task_end);
                dst[written - task_start..from - task_start].fill(0);
                dst[from - task_start..to - task_start]
                    .copy_from_slice(&p.data[from - p.offset..to - p.offset]);
                written = to;
            }
            dst[written - task_start..].fill(0);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_lays_out_tensors_with_zero_padding() {
        let a: Vec<u8> = (1..=10).collect();
        let b: Vec<u8> = (100..=130).collect();
        let placements = [
            Placement {
                data: &a,
                offset: 0,
            },
            Placement {
                data: &b,
                offset: 16,
            },
        ];
        let mut image = vec![0xee; 47];
        for (start, chunk) in [(0usize, 5usize), (5, 20), (25, 22)] {
            fill(&mut image[start..start + chunk], start, &placements);
        }
        let mut expected = a.clone();
        expected.resize(16, 0);
        expected.extend(&b);
        assert_eq!(image, expected);
    }

    #[test]
    fn fill_splits_large_chunks_across_tasks() {
        let a: Vec<u8> = (0..3 * FILL_TASK_BYTES + 7)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let b: Vec<u8> = vec![9; 100];
        let b_offset = a.len().next_multiple_of(TENSOR_ALIGNMENT);
        let placements = [
            Placement {
                data: &a,
                offset: 0,
            },
            Placement {
                data: &b,
                offset: b_offset,
            },
        ];
        let mut image = vec![0xee; b_offset + b.len()];
        fill(&mut image, 0, &placements);
        assert_eq!(&image[..a.len()], &a[..]);
        assert!(image[a.len()..b_offset].iter().all(|&x| x == 0));
        assert_eq!(&image[b_offset..], &b[..]);
    }
}
