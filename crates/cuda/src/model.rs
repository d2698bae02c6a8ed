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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::result as driver;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use engine::backend::{split_rows, Backend, Cache, Segment};
use engine::cpu::Logits;
use engine::kv::{KvPool, PAGE_TOKENS};
use engine::spec::{Activation, ModelSpec, RopeStyle};
use engine::weights::{HostWeights, Matrix, ModelWeights};
use engine::EngineError;
use gguf::{GgmlType, GgufFile};

use crate::blas::Blas;
use crate::device::{CudaDevice, DeviceOptions};
use crate::error::{CudaError, DriverContext, Result};
use crate::kernels::{
    argmax_index, Attention, DeviceMatrix, Kernels, MatvecOut, QkvPrepare, MATVEC_MAX_TOKENS,
    MAX_HEAD_DIM,
};
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
    pub seconds: f64,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded on {} ({} weights) in {:.3} s (upload {:.3} s, {:.2} GB/s{}); GPU memory: weights {:.1} MiB \
             (file tensors {:.1} MiB) + vectors {:.2} MiB + KV {:.1} MiB + workspace {:.1} MiB = {:.1} MiB, \
             measured {:.1} MiB",
            self.device,
            self.mode.name(),
            self.seconds,
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

/// A kernel's pointer argument for an optional vector (null when absent).
fn or_null(v: Option<u64>) -> u64 {
    v.unwrap_or(0)
}

/// Buffers of one forward pass, carved from one allocation; T = max_batch_tokens.
struct Workspace {
    _buffer: DeviceBuffer,
    max_tokens: usize,
    x: u64,       // T × n_embd, the residual stream
    normed: u64,  // T × n_embd
    q: u64,       // T × q_dim
    k: u64,       // T × kv_dim
    v: u64,       // T × kv_dim
    attn: u64,    // T × q_dim
    tmp: u64,     // T × n_embd, a block's output before its post-norm
    gate: u64,    // T × n_ff
    up: u64,      // T × n_ff
    act_f16: u64, // T × max(n_embd, q_dim, n_ff), f16: GEMM input
    scratch: u64, // scratch_values f16: a matrix dequantized for a GEMM
    scratch_values: usize,
    final_rows: u64, // LOGIT_ROWS × n_embd
    logits: u64,     // LOGIT_ROWS × vocab
    ids: u64,        // T u64 argmax keys
    meta: u64,       // meta_len u32
    meta_len: usize,
    bytes: usize,
    /// Decode steps captured as CUDA graphs, by shape.
    graphs: HashMap<GraphKey, Graph>,
    /// A capture of a mat-vec-sized step failed: launch kernels one by one.
    graphs_unavailable: bool,
    /// Larger steps (through cuBLAS) whose capture failed: run directly.
    uncapturable: HashSet<GraphKey>,
}

/// What fixes a decode step's graph: every address is the workspace's, so
/// only the sizes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GraphKey {
    tokens: usize,
    rows: usize,
    greedy: bool,
}

/// Where a step's metadata lies on the device.
struct StepAddresses {
    tokens: u64,
    positions: u64,
    table_offsets: u64,
    wanted: u64,
    tables: u64,
}

/// A captured graph.
struct Graph(CudaGraph);

// SAFETY: a graph is used only under the workspace's lock, so never from two
// threads at once (what CUDA requires of graph objects); its handles are
// valid on any thread of the process.
unsafe impl Send for Graph {}

/// A model on one GPU.
pub struct CudaModel {
    spec: ModelSpec,
    mode: WeightsMode,
    weights: DeviceModel,
    fuse: bool,
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
        let device = CudaDevice::open(&options.device)?;
        let free_before = device.memory()?.free;
        let kernels = Kernels::load(&device)?;

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
        let blas = Blas::new(&device, BLAS_WORKSPACE_BYTES)?;
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
            seconds: start.elapsed().as_secs_f64(),
        };
        if options.progress {
            eprintln!("{report}");
        }
        Ok(Self {
            spec,
            mode: options.weights,
            weights,
            fuse: options.fuse,
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

    /// One sequence's forward pass that also returns intermediate results
    /// (`name`, `tokens × width` values): every step of layer 0, the residual
    /// stream after each layer, and the last position's logits.
    pub fn forward_traced(
        &self,
        cache: &mut GpuCache,
        tokens: &[u32],
    ) -> Result<(Vec<f32>, engine::cpu::Trace), EngineError> {
        let mut trace = Vec::new();
        let mut batch = [Segment {
            kv: cache,
            tokens,
            logits: Logits::Last,
        }];
        let logits = match self.run(&mut batch, false, Some(&mut trace))? {
            Output::Logits(mut rows) => rows.pop().unwrap_or_default(),
            Output::Tokens(_) => unreachable!("logits were asked for"),
        };
        Ok((logits, trace))
    }

    /// The batched forward pass; `greedy` returns token ids instead of logits.
    fn run(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
        greedy: bool,
        mut trace: Option<&mut Vec<(String, Vec<f32>)>>,
    ) -> Result<Output, EngineError> {
        for seg in batch.iter() {
            engine::backend::check_segment(
                &self.spec,
                seg.tokens,
                seg.kv.len(),
                seg.kv.capacity(),
            )?;
        }
        let n: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut work = self
            .work
            .lock()
            .map_err(|_| EngineError::Invalid("GPU workspace poisoned".into()))?;
        if n > work.max_tokens {
            return Err(EngineError::Invalid(format!(
                "a forward pass of {n} tokens exceeds the GPU workspace of {} tokens",
                work.max_tokens
            )));
        }
        // Reserve every cache's pages first, so a full pool fails before any work.
        for seg in batch.iter_mut() {
            let positions = seg.kv.len() + seg.tokens.len();
            seg.kv.reserve(positions)?;
        }

        // Step metadata, one upload: tokens | positions | table offsets | wanted rows | block tables.
        let mut meta: Vec<u32> = Vec::with_capacity(4 * n);
        meta.extend(batch.iter().flat_map(|s| s.tokens.iter().copied()));
        for seg in batch.iter() {
            let start = seg.kv.len() as u32;
            meta.extend((0..seg.tokens.len() as u32).map(|i| start + i));
        }
        let mut table_offset = 0u32;
        for seg in batch.iter() {
            meta.extend(std::iter::repeat_n(table_offset, seg.tokens.len()));
            table_offset += seg.kv.table().len() as u32;
        }
        let mut wanted: Vec<u32> = Vec::new();
        let mut row = 0u32;
        for seg in batch.iter() {
            let m = seg.tokens.len() as u32;
            match seg.logits {
                Logits::Last => wanted.push(row + m - 1),
                Logits::All => wanted.extend(row..row + m),
                Logits::None => {}
            }
            row += m;
        }
        meta.extend(&wanted);
        for seg in batch.iter() {
            meta.extend(seg.kv.table());
        }
        if meta.len() > work.meta_len {
            return Err(EngineError::Invalid(format!(
                "step metadata of {} entries exceeds the GPU workspace's {}",
                meta.len(),
                work.meta_len
            )));
        }
        let (tokens_at, positions_at, offsets_at, wanted_at, tables_at) = {
            let at = |i: usize| work.meta + 4 * i as u64;
            (at(0), at(n), at(2 * n), at(3 * n), at(3 * n + wanted.len()))
        };

        let at = StepAddresses {
            tokens: tokens_at,
            positions: positions_at,
            table_offsets: offsets_at,
            wanted: wanted_at,
            tables: tables_at,
        };
        let lone_tokens = batch.iter().all(|seg| seg.tokens.len() == 1);
        // Decode steps run as CUDA graphs: any step of up to 8 tokens, and
        // steps of one token for each of up to 64 sequences (a 64-stream
        // step is ~700 launches, whose host time would otherwise exceed the
        // GPU's), so the shapes captured stay few.
        let graph_key = (trace.is_none()
            && (n <= MATVEC_MAX_TOKENS || (lone_tokens && n <= GRAPH_MAX_TOKENS))
            && (1..=LOGIT_ROWS).contains(&wanted.len()))
        .then_some(GraphKey {
            tokens: n,
            rows: wanted.len(),
            greedy,
        });
        let result = (|| -> Result<Output> {
            // The raw copies below use the thread's current context (the
            // scheduler runs this on its own thread).
            self.device
                .context()
                .bind_to_thread()
                .context(|| format!("binding GPU {}", self.device.index()))?;
            let stream = self.device.stream();
            // SAFETY: `meta` is pageable host memory copied out before the call returns.
            unsafe { driver::memcpy_htod_async(work.meta, &meta, stream.cu_stream()) }
                .context(|| "uploading step metadata".into())?;
            if let Some(key) = graph_key {
                if self.replay(&mut work, key, &at)? {
                    return self.collect(&work, wanted.len(), greedy);
                }
            }
            self.layers_forward(
                &work,
                n,
                at.tokens,
                at.positions,
                at.table_offsets,
                at.tables,
                &mut trace,
            )?;
            self.head(&work, &wanted, at.wanted, greedy)
        })();
        // Nothing queued may outlive this call (caches may drop their pages next).
        let synced = self.device.synchronize();
        let output = result.map_err(to_engine)?;
        synced.map_err(to_engine)?;
        for seg in batch.iter_mut() {
            seg.kv.commit(seg.tokens.len());
        }
        // Split the rows among the segments.
        let modes: Vec<Logits> = batch.iter().map(|s| s.logits).collect();
        let lengths: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        let vocab = self.spec.vocab_size;
        Ok(match output {
            Output::Logits(mut all) => {
                let mut flat = all.pop().unwrap_or_default();
                engine::backend::final_softcap(&self.spec, &mut flat);
                Output::Logits(split_rows(&flat, vocab, &modes, &lengths))
            }
            Output::Tokens(mut all) => {
                let flat = all.pop().unwrap_or_default();
                Output::Tokens(split_rows(&flat, 1, &modes, &lengths))
            }
        })
    }

    /// The results of a replayed decode step: `rows` token ids or logits rows.
    fn collect(&self, work: &Workspace, rows: usize, greedy: bool) -> Result<Output> {
        if greedy {
            Ok(Output::Tokens(vec![self.fetch_ids(work, rows)?]))
        } else {
            let logits = self.fetch(work.logits, rows * self.spec.vocab_size)?;
            Ok(Output::Logits(vec![logits]))
        }
    }

    /// The first `rows` argmax results, as token ids.
    fn fetch_ids(&self, work: &Workspace, rows: usize) -> Result<Vec<u32>> {
        let stream = self.device.stream();
        let mut keys = vec![0u64; rows];
        if rows > 0 {
            // SAFETY: `ids` holds `rows` u64 written by argmax_rows on this stream.
            unsafe { driver::memcpy_dtoh_async(&mut keys, work.ids, stream.cu_stream()) }
                .context(|| "copying token ids to the host".into())?;
            stream
                .synchronize()
                .context(|| "waiting for token ids".into())?;
        }
        Ok(keys.into_iter().map(argmax_index).collect())
    }

    /// Copies `count` f32 from the device (after the queued work).
    fn fetch(&self, ptr: u64, count: usize) -> Result<Vec<f32>> {
        let mut host = vec![0f32; count];
        let stream = self.device.stream();
        // SAFETY: `ptr` holds `count` f32 written by queued work; the copy is
        // ordered after it on the stream and waited for below.
        unsafe { driver::memcpy_dtoh_async(&mut host, ptr, stream.cu_stream()) }
            .context(|| "copying activations to the host".into())?;
        stream
            .synchronize()
            .context(|| "waiting for activations".into())?;
        Ok(host)
    }

    /// `y (+)= x · Wᵀ` for `n` rows: matvec from the blocks for a few rows,
    /// else cuBLAS on f16 (the weights dequantized to the scratch when needed).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.matmul_from(work, w, x, false, n, y, ldy, accumulate)
            .map(|_| ())
    }

    /// [`Self::matmul`] where `x_in_f16` says that the f16 activation buffer
    /// already holds x (the previous product of the same input left it
    /// there). Returns whether it now does.
    #[allow(clippy::too_many_arguments)]
    fn matmul_from(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        x: u64,
        x_in_f16: bool,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<bool> {
        // SAFETY (every block below): the addresses come from this model's
        // buffers, sized at load for max_batch_tokens rows of every width.
        if self.on_matvec(n, &[w]) {
            unsafe { self.kernels.matvec(w, x, n, y, ldy, accumulate)? };
            return Ok(x_in_f16);
        }
        if !x_in_f16 {
            // SAFETY: act_f16 holds max_batch_tokens rows of every width.
            unsafe { self.kernels.f32_to_f16(x, work.act_f16, n * w.cols)? };
        }
        self.matmul_blas(work, w, n, y, ldy, accumulate)?;
        Ok(true)
    }

    /// `y (+)= x · Wᵀ` through cuBLAS, x as f16 in `work.act_f16`: W itself
    /// if f16, else dequantized to f16 scratch a chunk of rows at a time.
    fn matmul_blas(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        // SAFETY (every block below): as for `matmul`.
        if w.ty == GgmlType::F16 {
            return unsafe {
                self.blas
                    .gemm_f16(w.ptr, w.rows, w.cols, work.act_f16, n, y, ldy, accumulate)
            };
        }
        let chunk_rows = (work.scratch_values / w.cols).max(1);
        let stream = self.device.stream();
        for first in (0..w.rows).step_by(chunk_rows) {
            let rows = chunk_rows.min(w.rows - first);
            if rows * w.cols > work.scratch_values {
                return Err(invalid(
                    "weight scratch",
                    format!("{}×{} does not fit", rows, w.cols),
                ));
            }
            unsafe {
                if !self.kernels.rows_to_f16(w, first, rows, work.scratch)? {
                    self.kernels.dequantizer.dequantize_f16_raw(
                        stream,
                        w.ty,
                        w.ptr + (first * w.row_bytes) as u64,
                        (rows * w.cols) as u64,
                        work.scratch,
                    )?;
                }
                self.blas.gemm_f16(
                    work.scratch,
                    rows,
                    w.cols,
                    work.act_f16,
                    n,
                    y + 4 * first as u64,
                    ldy,
                    accumulate,
                )?;
            }
        }
        Ok(())
    }

    /// Whether a decode-sized product of `n` rows through `ws` runs fused
    /// (RMSNorm inside the matvec, matrices of one type in one launch).
    fn fused(&self, n: usize, ws: &[&DeviceMatrix]) -> bool {
        self.fuse && self.on_matvec(n, ws)
    }

    /// Whether products of `n` rows through `ws` run on the mat-vec kernels
    /// (quantized weights, few rows, rows of whole 8-value stretches) rather
    /// than through cuBLAS.
    fn on_matvec(&self, n: usize, ws: &[&DeviceMatrix]) -> bool {
        self.mode == WeightsMode::Quantized
            && n <= self.matvec_rows
            && ws.iter().all(|w| Kernels::matvec_takes(w))
    }

    /// Embedding and every layer, leaving the residual stream in `work.x`.
    #[allow(clippy::too_many_arguments)]
    fn layers_forward(
        &self,
        work: &Workspace,
        n: usize,
        tokens: u64,
        positions: u64,
        table_offsets: u64,
        block_tables: u64,
        trace: &mut Option<&mut Vec<(String, Vec<f32>)>>,
    ) -> Result<()> {
        let spec = &self.spec;
        let k = &self.kernels;
        let (embd, q_dim, kv_dim, ff) = (spec.n_embd, spec.q_dim(), spec.kv_dim(), spec.n_ff);
        let eps = spec.rms_eps;
        let tracing = trace.is_some();
        let mut record = |name: String, ptr: u64, width: usize| -> Result<()> {
            if let Some(trace) = trace.as_deref_mut() {
                trace.push((name, self.fetch(ptr, n * width)?));
            }
            Ok(())
        };
        // SAFETY (every kernel call below): the buffers are this model's,
        // sized at load for max_batch_tokens ≥ n rows; the metadata holds n
        // tokens (below the vocabulary: checked), their positions, table
        // offsets, and tables covering every position (reserved).
        unsafe {
            k.embed(
                &self.weights.token_embd,
                tokens,
                n,
                spec.embedding_scale.unwrap_or(1.0),
                work.x,
            )?;
        }
        for (index, layer) in self.weights.layers.iter().enumerate() {
            let first = index == 0;
            let qkv = [
                (&layer.wq, work.q, q_dim),
                (&layer.wk, work.k, kv_dim),
                (&layer.wv, work.v, kv_dim),
            ];
            if self.fused(n, &[&layer.wq, &layer.wk, &layer.wv]) {
                // RMSNorm inside the products, one launch per weight type.
                let mut done = [false; 3];
                for i in 0..3 {
                    if done[i] {
                        continue;
                    }
                    let mut outs: Vec<MatvecOut<'_>> = Vec::with_capacity(3);
                    for j in i..3 {
                        if !done[j] && same_layout(qkv[j].0, qkv[i].0) {
                            done[j] = true;
                            outs.push(MatvecOut {
                                w: qkv[j].0,
                                y: qkv[j].1,
                                ldy: qkv[j].2,
                            });
                        }
                    }
                    // SAFETY: x holds n rows of n_embd; q, k and v n rows of their widths.
                    unsafe {
                        k.matvec_stacked(&outs, work.x, n, Some((layer.attn_norm, eps)), false)?
                    };
                }
                if first && tracing {
                    unsafe { k.rms_norm(work.x, 0, layer.attn_norm, eps, embd, n, work.normed)? };
                }
            } else {
                unsafe { k.rms_norm(work.x, 0, layer.attn_norm, eps, embd, n, work.normed)? };
                // One f16 copy of the normed rows serves all three.
                let mut in_f16 = false;
                for (w, y, ldy) in qkv {
                    in_f16 = self.matmul_from(work, w, work.normed, in_f16, n, y, ldy, false)?;
                }
            }
            if first {
                record("layer0.attn_norm".into(), work.normed, embd)?;
                record("layer0.q_proj".into(), work.q, q_dim)?;
                record("layer0.k_proj".into(), work.k, kv_dim)?;
                record("layer0.v_proj".into(), work.v, kv_dim)?;
            }
            let plan = spec.layers[index];
            unsafe {
                k.qkv_prepare(&QkvPrepare {
                    q: work.q,
                    k: work.k,
                    v: work.v,
                    bq: or_null(layer.bq),
                    bk: or_null(layer.bk),
                    bv: or_null(layer.bv),
                    q_norm: or_null(layer.q_norm),
                    k_norm: or_null(layer.k_norm),
                    eps,
                    positions,
                    table_offsets,
                    block_tables,
                    k_cache: self.kv.keys(index),
                    v_cache: self.kv.values(index),
                    n_tokens: n,
                    n_heads: spec.n_heads,
                    n_kv_heads: spec.n_kv_heads,
                    head_dim: spec.head_dim,
                    // 0: this layer does not rotate.
                    rope_dims: if plan.rope { spec.rope_dims } else { 0 },
                    // As the CPU backend computes it, so the angles match bit for bit.
                    theta_scale: plan.rope_theta.powf(-2.0 / spec.rope_dims as f32),
                    neox: spec.rope_style == RopeStyle::Neox,
                    rope_factors: or_null(self.weights.rope_factors),
                    freq_scale: plan.rope_freq_scale,
                    attn_factor: spec.rope_attn_factor,
                })?;
                k.attention(&Attention {
                    q: work.q,
                    k_cache: self.kv.keys(index),
                    v_cache: self.kv.values(index),
                    positions,
                    table_offsets,
                    block_tables,
                    n_tokens: n,
                    n_heads: spec.n_heads,
                    n_kv_heads: spec.n_kv_heads,
                    head_dim: spec.head_dim,
                    window: spec.window(index).unwrap_or(0),
                    scale: spec.attention_scale,
                    softcap: spec.attn_softcap.unwrap_or(0.0),
                    out: work.attn,
                })?;
            }
            if first {
                record("layer0.q_rope".into(), work.q, q_dim)?;
                record("layer0.k_rope".into(), work.k, kv_dim)?;
                record("layer0.attn".into(), work.attn, q_dim)?;
            }
            self.residual(work, &layer.wo, work.attn, n, layer.post_attn_norm)?;
            if first {
                record("layer0.x_attn".into(), work.x, embd)?;
            }

            let gelu = spec.activation == Activation::GeluTanh;
            if layer.gate.ty == layer.up.ty && self.fused(n, &[&layer.gate, &layer.up]) {
                // SAFETY: gate and up are ff × n_embd; x holds n rows, gate n rows of ff.
                unsafe {
                    k.matvec_gated(
                        &layer.gate,
                        &layer.up,
                        work.x,
                        n,
                        Some((layer.ffn_norm, eps)),
                        work.gate,
                        gelu,
                    )?
                };
                if first && tracing {
                    unsafe { k.rms_norm(work.x, 0, layer.ffn_norm, eps, embd, n, work.normed)? };
                }
            } else {
                unsafe { k.rms_norm(work.x, 0, layer.ffn_norm, eps, embd, n, work.normed)? };
                if same_layout(&layer.gate, &layer.up) && self.on_matvec(n, &[&layer.gate]) {
                    // SAFETY: as above, from the normed rows.
                    unsafe {
                        k.matvec_gated(
                            &layer.gate,
                            &layer.up,
                            work.normed,
                            n,
                            None,
                            work.gate,
                            gelu,
                        )?
                    };
                } else {
                    let in_f16 = self.matmul_from(
                        work,
                        &layer.gate,
                        work.normed,
                        false,
                        n,
                        work.gate,
                        ff,
                        false,
                    )?;
                    self.matmul_from(work, &layer.up, work.normed, in_f16, n, work.up, ff, false)?;
                    unsafe { k.gated_activation(work.gate, work.up, n * ff, gelu)? };
                }
            }
            if first {
                record("layer0.ffn_norm".into(), work.normed, embd)?;
                record("layer0.ffn_act".into(), work.gate, ff)?;
            }
            self.residual(work, &layer.down, work.gate, n, layer.post_ffn_norm)?;
            record(format!("layer{index}.out"), work.x, embd)?;
        }
        Ok(())
    }

    /// `x += W·a`, or `x += RMSNorm(W·a)·post_norm` where the spec has post-norms.
    fn residual(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        a: u64,
        n: usize,
        post_norm: Option<u64>,
    ) -> Result<()> {
        let embd = self.spec.n_embd;
        let Some(post_norm) = post_norm else {
            return self.matmul(work, w, a, n, work.x, embd, true);
        };
        self.matmul(work, w, a, n, work.tmp, embd, false)?;
        // SAFETY: x and tmp hold n × n_embd f32; post_norm n_embd f32.
        unsafe {
            self.kernels
                .add_rms_norm(work.x, work.tmp, post_norm, self.spec.rms_eps, embd, n)
        }
    }

    /// Final norm and LM head of `rows` (≤ LOGIT_ROWS) wanted rows from
    /// number `first` on (`wanted_at` holds their indices on the device) into
    /// `work.logits`, and with `greedy` their argmax into `work.ids[first..]`.
    fn head_kernels(
        &self,
        work: &Workspace,
        rows: usize,
        first: usize,
        wanted_at: u64,
        greedy: bool,
    ) -> Result<()> {
        let (embd, vocab) = (self.spec.n_embd, self.spec.vocab_size);
        // SAFETY: the rows index n ≤ max_batch_tokens rows of x; final_rows
        // and logits hold LOGIT_ROWS rows; ids holds max_batch_tokens.
        unsafe {
            self.kernels.rms_norm(
                work.x,
                wanted_at + 4 * first as u64,
                self.weights.output_norm,
                self.spec.rms_eps,
                embd,
                rows,
                work.final_rows,
            )?;
        }
        if rows == 1 {
            self.matmul(
                work,
                &self.weights.output,
                work.final_rows,
                rows,
                work.logits,
                vocab,
                false,
            )?;
        } else {
            // Several rows: the head's weights (the largest matrix) are read
            // once through cuBLAS rather than by the few-row matvec.
            // SAFETY: final_rows holds LOGIT_ROWS rows of n_embd; act_f16 room for them.
            unsafe {
                self.kernels.f32_to_f16(
                    work.final_rows,
                    work.act_f16,
                    rows * self.weights.output.cols,
                )?
            };
            self.matmul_blas(work, &self.weights.output, rows, work.logits, vocab, false)?;
        }
        if greedy {
            unsafe {
                self.kernels
                    .argmax_rows(work.logits, vocab, rows, work.ids + 8 * first as u64)?
            };
        }
        Ok(())
    }

    /// A decode step (every address and size fixed by `key`) as a CUDA graph:
    /// captured on first use, replayed after. The step's metadata is already
    /// on the device; the results are left in `work.logits` / `work.ids`.
    /// Returns false, having run nothing, if graphs cannot be used here.
    fn replay(&self, work: &mut Workspace, key: GraphKey, at: &StepAddresses) -> Result<bool> {
        if work.graphs_unavailable || work.uncapturable.contains(&key) {
            return Ok(false);
        }
        if !work.graphs.contains_key(&key) {
            let stream = self.device.stream();
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .context(|| "starting a CUDA graph capture".into())?;
            let captured = self
                .layers_forward(
                    work,
                    key.tokens,
                    at.tokens,
                    at.positions,
                    at.table_offsets,
                    at.tables,
                    &mut None,
                )
                .and_then(|()| self.head_kernels(work, key.rows, 0, at.wanted, key.greedy));
            let graph = stream.end_capture(CUgraphInstantiate_flags(0));
            match (captured, graph) {
                (Ok(()), Ok(Some(graph))) => {
                    work.graphs.insert(key, Graph(graph));
                }
                (captured, graph) => {
                    // Run without graphs from now on; the caller runs this step directly.
                    let why = match (captured, graph) {
                        (Err(e), _) => e.to_string(),
                        (_, Err(e)) => e.to_string(),
                        _ => "the capture produced no graph".to_string(),
                    };
                    if key.tokens <= MATVEC_MAX_TOKENS {
                        eprintln!("CUDA graphs unavailable ({why}); launching kernels one by one");
                        work.graphs_unavailable = true;
                    } else {
                        eprintln!(
                            "CUDA graph capture of a {}-token step failed ({why}); such steps run without one",
                            key.tokens
                        );
                        work.uncapturable.insert(key);
                    }
                    return Ok(false);
                }
            }
        }
        work.graphs[&key]
            .0
            .launch()
            .context(|| "launching a decode step's CUDA graph".into())?;
        Ok(true)
    }

    /// Final norm and LM head of the wanted rows (`wanted_at` holds their
    /// indices on the device), LOGIT_ROWS at a time.
    fn head(
        &self,
        work: &Workspace,
        wanted: &[u32],
        wanted_at: u64,
        greedy: bool,
    ) -> Result<Output> {
        let vocab = self.spec.vocab_size;
        let stream = self.device.stream();
        let mut logits = if greedy {
            Vec::new()
        } else {
            vec![0f32; wanted.len() * vocab]
        };
        for first in (0..wanted.len()).step_by(LOGIT_ROWS) {
            let rows = LOGIT_ROWS.min(wanted.len() - first);
            self.head_kernels(work, rows, first, wanted_at, greedy)?;
            if !greedy {
                let dst = &mut logits[first * vocab..(first + rows) * vocab];
                // SAFETY: `logits` holds rows × vocab f32 written just before on this stream.
                unsafe { driver::memcpy_dtoh_async(dst, work.logits, stream.cu_stream()) }
                    .context(|| "copying logits to the host".into())?;
                stream
                    .synchronize()
                    .context(|| "waiting for logits".into())?;
            }
        }
        if greedy {
            Ok(Output::Tokens(vec![self.fetch_ids(work, wanted.len())?]))
        } else {
            Ok(Output::Logits(vec![logits]))
        }
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // Buffers are freed by address; nothing queued may still use them.
        let _ = self.device.synchronize();
    }
}

/// A forward pass's result: per segment (or, inside `run`, one flat list).
enum Output {
    Logits(Vec<Vec<f32>>),
    Tokens(Vec<Vec<u32>>),
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

/// Offsets of the workspace's buffers (bytes), before the allocation exists.
struct WorkspaceParts {
    offsets: [usize; 15],
    meta_len: usize,
}

fn workspace_layout(
    spec: &ModelSpec,
    max_tokens: usize,
    scratch_values: usize,
    kv_pages: usize,
) -> (Layout, WorkspaceParts) {
    let t = max_tokens;
    let (embd, q_dim, kv_dim, ff, vocab) = (
        spec.n_embd,
        spec.q_dim(),
        spec.kv_dim(),
        spec.n_ff,
        spec.vocab_size,
    );
    let widest = embd.max(q_dim).max(ff);
    let meta_len = 4 * t + kv_pages;
    let mut layout = Layout::default();
    let offsets = [
        layout.add(4 * t * embd),           // x
        layout.add(4 * t * embd),           // normed
        layout.add(4 * t * q_dim),          // q
        layout.add(4 * t * kv_dim),         // k
        layout.add(4 * t * kv_dim),         // v
        layout.add(4 * t * q_dim),          // attn
        layout.add(4 * t * embd),           // tmp
        layout.add(4 * t * ff),             // gate
        layout.add(4 * t * ff),             // up
        layout.add(2 * t * widest),         // act_f16
        layout.add(2 * scratch_values),     // scratch
        layout.add(4 * LOGIT_ROWS * embd),  // final_rows
        layout.add(4 * LOGIT_ROWS * vocab), // logits
        layout.add(8 * t),                  // ids: argmax keys
        layout.add(4 * meta_len),           // meta
    ];
    (layout, WorkspaceParts { offsets, meta_len })
}

impl WorkspaceParts {
    fn place(&self, buffer: DeviceBuffer, max_tokens: usize, scratch_values: usize) -> Workspace {
        let base = buffer.ptr();
        let at = |i: usize| base + self.offsets[i] as u64;
        Workspace {
            max_tokens,
            x: at(0),
            normed: at(1),
            q: at(2),
            k: at(3),
            v: at(4),
            attn: at(5),
            tmp: at(6),
            gate: at(7),
            up: at(8),
            act_f16: at(9),
            scratch: at(10),
            scratch_values,
            final_rows: at(11),
            logits: at(12),
            ids: at(13),
            meta: at(14),
            meta_len: self.meta_len,
            bytes: buffer.bytes(),
            graphs: HashMap::new(),
            graphs_unavailable: false,
            uncapturable: HashSet::new(),
            _buffer: buffer,
        }
    }
}

impl Backend for CudaModel {
    type Cache = GpuCache;

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn new_cache_in(&self, pool: &KvPool, context: usize) -> GpuCache {
        GpuCache::new(self.kv.clone(), Some(pool), context)
    }

    fn forward_logits(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        match self.run(batch, false, None)? {
            Output::Logits(rows) => Ok(rows),
            Output::Tokens(_) => unreachable!("logits were asked for"),
        }
    }

    fn forward_greedy(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        match self.run(batch, true, None)? {
            Output::Tokens(ids) => Ok(ids),
            Output::Logits(_) => unreachable!("token ids were asked for"),
        }
    }
}
