//! The forward pass on the GPU: one decoder-only transformer described by a
//! [`ModelSpec`] (qwen2, llama, gemma3), batched over several sequences like
//! the CPU backend, with a paged f16 KV cache.
//!
//! Weights, by default, stay as the file's GGUF blocks (`upload.rs`):
//! products with up to `MATVEC_ROWS` (2) activation rows (decode) run
//! straight from the blocks (`matvec.cu`); larger batches convert each
//! matrix to an f16 scratch and multiply with cuBLAS. With
//! [`WeightsMode::F16`] every matrix is dequantized to f16 at load (the raw
//! blocks are then freed) and every product runs through cuBLAS.
//! Activations are f32 between kernels; the LM head's rows come back as
//! logits or, for greedy decoding, only as token ids (`sample.cu`). Decode
//! steps (up to 8 tokens, or one token for each of up to 64 sequences)
//! replay as CUDA graphs captured per shape, their kernels launched with
//! programmatic dependent launch (`kernels.rs`).
//!
//! Decode steps fuse RMSNorm into the products that follow it and stack
//! Q/K/V of one type into one launch. Measured speed and what bounds it:
//! docs/PERFORMANCE.md.
//!
//! By job: this module loads (weights to the device, in the one
//! [`ModelWeights`] description every backend reads); `workspace.rs` holds
//! the forward pass's buffers; `forward.rs` runs a step; `graphs.rs`
//! captures and replays decode steps as CUDA graphs.

mod forward;
mod graphs;
mod workspace;

use forward::{Output, Pick};
use workspace::{workspace_layout, Workspace};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::result as driver;
use engine::backend::{Backend, Segment, TokenMask};
use engine::kv::{KvPool, PAGE_TOKENS};
use engine::spec::ModelSpec;
use engine::weights::{HostWeights, LayerWeights, Matrix, ModelWeights};
use engine::EngineError;
use gguf::{GgmlType, GgufFile};

use crate::blas::Blas;
use crate::device::{CudaDevice, DeviceOptions};
use crate::error::{CudaError, DriverContext, Result};
use crate::kernels::{DeviceMatrix, Kernels, MATVEC_MAX_TOKENS, MAX_HEAD_DIM};
use crate::kv::{GpuCache, KvPages};
use crate::memory::{DeviceBuffer, Layout};
use crate::upload::{upload_weights, DeviceWeights, UploadOptions, UploadReport};

/// LM-head rows per pass (each pass reads the whole head once).
/// (64 rows of logits of a 152k vocabulary are 39 MB: part of the workspace.)
const LOGIT_ROWS: usize = 64;
/// Most activation rows a product runs through the mat-vec kernels by
/// default; from 3 rows cuBLAS on f16 weights is faster (H200, 64 streams
/// decoding per step: 8 rows 2,527 -> 3,220 tok/s, 4 rows 1,829 -> 1,969,
/// 2 rows 1,144 -> 1,001 the other way).
const MATVEC_ROWS: usize = 2;
/// Most tokens of a step replayed as a CUDA graph (one LM-head pass).
const GRAPH_MAX_TOKENS: usize = LOGIT_ROWS;
/// cuBLAS's workspace.
const BLAS_WORKSPACE_BYTES: usize = 16 << 20;
const MIB: f64 = 1024.0 * 1024.0;

/// How the weights are held on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsMode {
    /// The file's blocks, multiplied by fused dequantize-and-multiply kernels.
    Quantized,
    /// Dequantized to f16 at load, multiplied by cuBLAS.
    F16,
}

impl WeightsMode {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "quant" | "quantized" => Some(Self::Quantized),
            "f16" => Some(Self::F16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Quantized => "quant",
            Self::F16 => "f16",
        }
    }
}

/// How to load a model onto a GPU.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub device: DeviceOptions,
    pub weights: WeightsMode,
    /// KV pages (`PAGE_TOKENS` positions each) shared by all sequences.
    pub kv_pages: usize,
    /// Most tokens in one forward pass (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Show upload progress and print the load summary on stderr.
    pub progress: bool,
    /// Fuse the decode step's kernels (RMSNorm into the products that follow
    /// it, Q/K/V in one launch); off only to measure what fusing gains.
    pub fuse: bool,
    /// Most activation rows a product runs through the mat-vec kernels
    /// (more go through cuBLAS), 1..=8; to measure where cuBLAS wins.
    pub matvec_rows: usize,
    /// Positions a sequence may reach (picks Phi-3's RoPE factors); `None`:
    /// the training context.
    pub context: Option<usize>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: DeviceOptions::default(),
            weights: WeightsMode::Quantized,
            kv_pages: 4096usize.div_ceil(PAGE_TOKENS),
            max_batch_tokens: 512,
            progress: false,
            fuse: true,
            matvec_rows: MATVEC_ROWS,
            context: None,
        }
    }
}

/// What loading did and what it holds on the GPU.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub device: String,
    pub mode: WeightsMode,
    pub upload: UploadReport,
    /// Tensor bytes of the file.
    pub file_tensor_bytes: u64,
    /// Weights resident after loading: the blocks, or the f16 matrices.
    pub weights_bytes: u64,
    /// Norm and bias vectors, as f32.
    pub vector_bytes: u64,
    pub kv_bytes: u64,
    /// Activations, weight scratch, logits and cuBLAS's workspace.
    pub workspace_bytes: u64,
    /// Device memory taken from before the upload to the end of loading
    /// (cuMemGetInfo; includes kernel modules and cuBLAS's handle).
    pub used_bytes: u64,
    /// Dequantizing to f16 (f16 mode).
    pub convert_seconds: f64,
    /// Opening the device (the CUDA context, on a first load in a process).
    pub device_seconds: f64,
    /// Loading the kernel modules and looking up their functions.
    pub kernels_seconds: f64,
    /// Creating the cuBLAS handle and its workspace.
    pub blas_seconds: f64,
    pub seconds: f64,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded on {} ({} weights) in {:.3} s (device {:.3} s, kernels {:.3} s, cuBLAS {:.3} s, \
             upload {:.3} s, {:.2} GB/s{}); GPU memory: weights {:.1} MiB \
             (file tensors {:.1} MiB) + vectors {:.2} MiB + KV {:.1} MiB + workspace {:.1} MiB = {:.1} MiB, \
             measured {:.1} MiB",
            self.device,
            self.mode.name(),
            self.seconds,
            self.device_seconds,
            self.kernels_seconds,
            self.blas_seconds,
            self.upload.seconds,
            self.upload.gigabytes_per_second(),
            if self.mode == WeightsMode::F16 {
                format!(", f16 conversion {:.3} s", self.convert_seconds)
            } else {
                String::new()
            },
            self.weights_bytes as f64 / MIB,
            self.file_tensor_bytes as f64 / MIB,
            self.vector_bytes as f64 / MIB,
            self.kv_bytes as f64 / MIB,
            self.workspace_bytes as f64 / MIB,
            (self.weights_bytes + self.vector_bytes + self.kv_bytes + self.workspace_bytes) as f64 / MIB,
            self.used_bytes as f64 / MIB,
        )
    }
}

/// Where a model's weights lie on the device: matrices (blocks or f16) and
/// f32 vectors, as device addresses; an absent vector is `None`.
type DeviceModel = ModelWeights<DeviceMatrix, u64>;

/// What a decode step fuses in one layer, decided once at load from the
/// weights' types and shapes (and `CudaOptions::fuse`); a step takes it when
/// its rows run on the mat-vec kernels.
struct LayerFusion {
    /// RMSNorm inside the Q/K/V products, which run as these launches (Q,
    /// K, V as 0, 1, 2, grouped by weight layout).
    fused_qkv: bool,
    qkv_groups: Vec<Vec<usize>>,
    /// RMSNorm, gate, up and the activation in one launch.
    fused_gate_up: bool,
    /// Gate, up and the activation in one launch (from normed rows).
    gated_matvec: bool,
}

impl LayerFusion {
    fn plan(layer: &LayerWeights<DeviceMatrix, u64>, mode: WeightsMode, fuse: bool) -> Self {
        let matvec = |ws: &[&DeviceMatrix]| {
            mode == WeightsMode::Quantized && ws.iter().all(|w| Kernels::matvec_takes(w))
        };
        let qkv = [&layer.wq, &layer.wk, &layer.wv];
        let mut qkv_groups: Vec<Vec<usize>> = Vec::new();
        for (j, w) in qkv.iter().enumerate() {
            match qkv_groups.iter_mut().find(|g| same_layout(qkv[g[0]], w)) {
                Some(group) => group.push(j),
                None => qkv_groups.push(vec![j]),
            }
        }
        let gated_matvec = same_layout(&layer.gate, &layer.up) && matvec(&[&layer.gate]);
        LayerFusion {
            fused_qkv: fuse && matvec(&qkv),
            qkv_groups,
            fused_gate_up: fuse && gated_matvec,
            gated_matvec,
        }
    }
}

/// A kernel's pointer argument for an optional vector (null when absent).
fn or_null(v: Option<u64>) -> u64 {
    v.unwrap_or(0)
}

/// A model on one GPU.
pub struct CudaModel {
    spec: ModelSpec,
    mode: WeightsMode,
    weights: DeviceModel,
    /// Per layer.
    fusion: Vec<LayerFusion>,
    /// Most activation rows a product runs through the mat-vec kernels
    /// (more go through cuBLAS): `CudaOptions::matvec_rows`.
    matvec_rows: usize,
    work: Mutex<Workspace>,
    kv: Arc<KvPages>,
    _vectors: DeviceBuffer,
    _f16_weights: Option<DeviceBuffer>,
    _raw: Option<DeviceWeights>,
    blas: Blas,
    kernels: Kernels,
    device: CudaDevice,
    report: LoadReport,
}

fn to_engine(e: CudaError) -> EngineError {
    match e {
        CudaError::Model(e) => e,
        e => EngineError::Invalid(format!("GPU: {e}")),
    }
}

fn invalid(what: &str, reason: String) -> CudaError {
    CudaError::Invalid {
        what: what.to_string(),
        reason,
    }
}

impl CudaModel {
    /// Uploads `file`'s weights to a GPU and prepares the forward pass.
    pub fn load(file: Arc<GgufFile>, options: &CudaOptions) -> Result<Self> {
        let start = Instant::now();
        let spec = ModelSpec::from_gguf_for_context(&file, options.context)?;
        let host = HostWeights::load(&file, &spec)?;
        check_shapes(&spec, &host)?;
        let device_start = Instant::now();
        let device = CudaDevice::open(&options.device)?;
        let device_seconds = device_start.elapsed().as_secs_f64();
        let free_before = device.memory()?.free;
        let kernels_start = Instant::now();
        let kernels = Kernels::load(&device)?;
        let kernels_seconds = kernels_start.elapsed().as_secs_f64();

        let kv_dim = spec.kv_dim();
        let kv_bytes = KvPages::bytes_for(spec.n_layers, kv_dim, options.kv_pages);
        // Only the quantized mode dequantizes layer matrices for prefill GEMMs.
        let scratch_values = match options.weights {
            WeightsMode::Quantized => host
                .layers
                .iter()
                .flat_map(|l| l.matrices())
                .map(|m| m.rows * m.cols)
                .max()
                .unwrap_or(0),
            WeightsMode::F16 => 0,
        };
        // f16 mode: one f16 region per matrix (a tied head shares the
        // embedding's), keyed by tensor and first row.
        let key = |m: &Matrix| (m.name.clone(), m.first_row);
        let mut f16_layout = Layout::default();
        let mut f16_offsets = HashMap::new();
        if options.weights == WeightsMode::F16 {
            for m in host.matrices() {
                f16_offsets
                    .entry(key(m))
                    .or_insert_with(|| f16_layout.add(m.rows * m.cols * 2));
            }
        }
        // At least a full LM-head pass of rows, whose f16 copy shares act_f16.
        let max_tokens = options.max_batch_tokens.max(LOGIT_ROWS);
        let (workspace_layout, parts) =
            workspace_layout(&spec, max_tokens, scratch_values, options.kv_pages);
        let extra = kv_bytes + workspace_layout.bytes() + BLAS_WORKSPACE_BYTES + f16_layout.bytes();

        let (raw, upload) = upload_weights(
            &device,
            &file,
            &UploadOptions {
                kv_cache_bytes: extra as u64,
                progress: options.progress,
                ..Default::default()
            },
        )?;
        let raw_matrix = |m: &Matrix| -> Result<DeviceMatrix> {
            let tensor = raw
                .tensor(&m.name)
                .ok_or_else(|| invalid(&m.name, "missing from the upload".into()))?;
            Ok(DeviceMatrix {
                ty: m.ty,
                rows: m.rows,
                cols: m.cols,
                row_bytes: m.row_bytes(),
                ptr: raw.device_ptr(tensor) + (m.first_row * m.row_bytes()) as u64,
            })
        };

        // f16 mode: every matrix dequantized once, then the blocks are freed.
        let convert_start = Instant::now();
        let f16_weights = if options.weights == WeightsMode::F16 {
            let buffer = DeviceBuffer::new(&device, f16_layout.bytes(), "the f16 weights")?;
            let mut done = HashSet::new();
            for m in host.matrices() {
                if !done.insert(key(m)) {
                    continue;
                }
                let src = raw_matrix(m)?;
                let dst = buffer.ptr() + f16_offsets[&key(m)] as u64;
                // SAFETY: `src` is the matrix's blocks in the arena, `dst`
                // its rows × cols f16 region of `buffer`; both outlive the
                // synchronize below.
                unsafe {
                    kernels.dequantizer.dequantize_f16_raw(
                        device.stream(),
                        m.ty,
                        src.ptr,
                        (m.rows * m.cols) as u64,
                        dst,
                    )?
                };
            }
            device.synchronize()?;
            Some(buffer)
        } else {
            None
        };
        let convert_seconds = convert_start.elapsed().as_secs_f64();
        let matrix = |m: &Matrix| -> Result<DeviceMatrix> {
            match &f16_weights {
                Some(buffer) => Ok(DeviceMatrix {
                    ty: GgmlType::F16,
                    rows: m.rows,
                    cols: m.cols,
                    row_bytes: m.cols * 2,
                    ptr: buffer.ptr() + f16_offsets[&key(m)] as u64,
                }),
                None => raw_matrix(m),
            }
        };

        // Norm, bias and RoPE factor vectors: one buffer, each vector on a
        // 256-byte boundary like every other buffer.
        let vector_values: usize = host.vectors().map(|v| v.len().next_multiple_of(64)).sum();
        let vector_buffer = DeviceBuffer::new(&device, vector_values * 4, "norm and bias vectors")?;
        let mut values: Vec<f32> = Vec::with_capacity(vector_values);
        let base = vector_buffer.ptr();
        let weights: DeviceModel = host.map(matrix, |v: &Vec<f32>| -> Result<u64> {
            let at = base + 4 * values.len() as u64;
            values.extend_from_slice(v);
            values.resize(values.len().next_multiple_of(64), 0.0);
            Ok(at)
        })?;
        // SAFETY: the buffer holds exactly these values; pageable memory is
        // copied out before the call returns.
        unsafe {
            driver::memcpy_htod_async(vector_buffer.ptr(), &values, device.stream().cu_stream())
        }
        .context(|| "uploading norm and bias vectors".into())?;
        let raw = if f16_weights.is_some() {
            drop(raw);
            None
        } else {
            Some(raw)
        };

        let kv = Arc::new(KvPages::new(
            &device,
            spec.n_layers,
            kv_dim,
            options.kv_pages,
        )?);
        let buffer = DeviceBuffer::new(
            &device,
            workspace_layout.bytes(),
            "the forward pass's workspace",
        )?;
        let work = parts.place(buffer, max_tokens, scratch_values);
        let blas_start = Instant::now();
        let blas = Blas::new(&device, BLAS_WORKSPACE_BYTES)?;
        let blas_seconds = blas_start.elapsed().as_secs_f64();
        device.synchronize()?;
        let used = free_before.saturating_sub(device.memory()?.free);
        let weights_bytes = match &f16_weights {
            Some(b) => b.bytes() as u64,
            None => raw.as_ref().map_or(0, |r| r.allocated_bytes() as u64),
        };
        let report = LoadReport {
            device: format!("GPU {} ({})", device.index(), device.name()),
            mode: options.weights,
            file_tensor_bytes: upload.tensor_bytes,
            upload,
            weights_bytes,
            vector_bytes: vector_buffer.bytes() as u64,
            kv_bytes: kv.bytes() as u64,
            workspace_bytes: (work.bytes + BLAS_WORKSPACE_BYTES) as u64,
            used_bytes: used,
            convert_seconds,
            device_seconds,
            kernels_seconds,
            blas_seconds,
            seconds: start.elapsed().as_secs_f64(),
        };
        if options.progress {
            eprintln!("{report}");
        }
        Ok(Self {
            spec,
            mode: options.weights,
            fusion: weights
                .layers
                .iter()
                .map(|l| LayerFusion::plan(l, options.weights, options.fuse))
                .collect(),
            weights,
            matvec_rows: options.matvec_rows.clamp(1, MATVEC_MAX_TOKENS),
            work: Mutex::new(work),
            kv,
            _vectors: vector_buffer,
            _f16_weights: f16_weights,
            _raw: raw,
            blas,
            kernels,
            device,
            report,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    pub fn mode(&self) -> WeightsMode {
        self.mode
    }

    /// KV pages on the device, and how many are free.
    pub fn kv_pages(&self) -> (usize, usize) {
        (self.kv.n_pages(), self.kv.free_pages())
    }

    /// A cache for `context` positions limited only by the device's pages.
    pub fn new_cache(&self, context: usize) -> GpuCache {
        GpuCache::new(self.kv.clone(), None, context)
    }

    /// A cache holding `from`'s first `n` positions ([`GpuCache::fork`]).
    pub fn fork(
        &self,
        from: &GpuCache,
        n: usize,
        pool: Option<&KvPool>,
        context: usize,
    ) -> Result<GpuCache> {
        self.device
            .context()
            .bind_to_thread()
            .context(|| format!("binding GPU {}", self.device.index()))?;
        GpuCache::fork(&self.device, from, n, pool, context)
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // Buffers are freed by address; nothing queued may still use them.
        let _ = self.device.synchronize();
    }
}

/// Checks what the kernels assume about shapes.
/// Whether two matrices can share a matvec launch.
fn same_layout(a: &DeviceMatrix, b: &DeviceMatrix) -> bool {
    (a.ty, a.cols, a.row_bytes) == (b.ty, b.cols, b.row_bytes)
}

/// Whether the GPU kernels can run this model (shapes and weight types);
/// needs no GPU, so `inspect` can say it for any file.
pub fn check_shapes(spec: &ModelSpec, host: &HostWeights) -> Result<()> {
    if spec.head_dim > MAX_HEAD_DIM || !spec.head_dim.is_multiple_of(8) {
        return Err(invalid(
            "model",
            format!("head size {} is not supported by the GPU kernels (a multiple of 8, at most {MAX_HEAD_DIM})", spec.head_dim),
        ));
    }
    for m in host.matrices() {
        if m.cols % 8 != 0 {
            return Err(invalid(
                &m.name,
                format!(
                    "rows of {} values: the GPU kernels need a multiple of 8",
                    m.cols
                ),
            ));
        }
        if !crate::dequantize::TYPES.contains(&m.ty) {
            return Err(CudaError::UnsupportedType(m.ty));
        }
    }
    Ok(())
}

impl Backend for CudaModel {
    type Cache = GpuCache;

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn new_cache_in(&self, pool: &KvPool, context: usize) -> GpuCache {
        GpuCache::new(self.kv.clone(), Some(pool), context)
    }

    fn fork_cache(
        &self,
        from: &GpuCache,
        n: usize,
        pool: &KvPool,
        context: usize,
    ) -> Result<GpuCache, EngineError> {
        self.fork(from, n, Some(pool), context).map_err(to_engine)
    }

    fn forward_logits(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        match self.run(batch, Pick::Logits, None)? {
            Output::Logits(rows) => Ok(rows),
            Output::Tokens(_) => unreachable!("logits were asked for"),
        }
    }

    fn forward_greedy(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        match self.run(batch, Pick::Greedy, None)? {
            Output::Tokens(ids) => Ok(ids),
            Output::Logits(_) => unreachable!("token ids were asked for"),
        }
    }

    fn forward_greedy_masked(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
        masks: &mut dyn FnMut() -> Vec<Option<TokenMask>>,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let rows: usize = batch
            .iter()
            .map(|s| engine::backend::rows_wanted(s.logits, s.tokens.len()))
            .sum();
        if rows > LOGIT_ROWS {
            // More rows than the workspace's logits hold: masked on the host.
            let logits = self.forward_logits(batch)?;
            return Ok(engine::backend::masked_argmax_rows(
                &logits,
                self.spec.vocab_size,
                &masks(),
            ));
        }
        match self.run(batch, Pick::Masked(masks), None)? {
            Output::Tokens(ids) => Ok(ids),
            Output::Logits(_) => unreachable!("token ids were asked for"),
        }
    }
}
