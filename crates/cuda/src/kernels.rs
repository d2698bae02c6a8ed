//! Typed launchers for the forward pass's kernels (`kernels/{matvec, norm,
//! elementwise, rope, attention, sample}.cu`). Buffers are raw device
//! addresses (see `memory.rs`); each launcher says what shapes it expects.

use std::sync::Arc;

use cudarc::driver::sys::{
    self, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
};
use cudarc::driver::{
    result as driver, CudaFunction, CudaModule, CudaStream, DriverError, LaunchConfig,
};
use gguf::GgmlType;

use crate::compile::{ATTENTION, ELEMENTWISE, MATVEC, NORM, ROPE, SAMPLE};
use crate::dequantize::{Dequantizer, TYPES};
use crate::device::CudaDevice;
use crate::error::{CudaError, DriverContext, Result};

/// Weight rows per matvec block (MATVEC_WARPS in matvec.cu).
const MATVEC_ROWS_PER_BLOCK: u32 = 4;
/// Rows at least this long are split over a block's warps in matvec.
const SPLIT_ROW_COLS: usize = 2048;
/// Token rows per matvec launch row of blocks (the kernels' TOKENS).
pub const MATVEC_MAX_TOKENS: usize = 8;
/// Matrices one matvec launch takes (`Segments` in matvec.cu).
pub const MATVEC_MAX_SEGMENTS: usize = 3;
/// Most shared memory a matvec block stages rows in (the default limit).
const MATVEC_MAX_STAGE_BYTES: usize = 48 * 1024;
/// Values each lane of a matvec takes at a time: rows are whole stretches.
const MATVEC_STRETCH: usize = 8;
/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
const ELEMENTWISE_THREADS: u32 = 256;
/// Most activation rows `matmul_q` takes (MMQ_TOKENS in matvec.cu).
pub const MATMUL_Q_MAX_ROWS: usize = 64;
/// Warps of a `matmul_q` block, weight rows a warp, values staged at a time
/// (MMQ_WARPS, MMQ_ROWS, MMQ_CHUNK in matvec.cu), and each warp's f16 tile.
const MATMUL_Q_WARPS: usize = 4;
const MATMUL_Q_WARP_ROWS: usize = 16;
const MATMUL_Q_CHUNK: usize = 256;
const MATMUL_Q_TILE_BYTES: usize = 16 * 72 * 2;
/// The shared memory a `matmul_q` block may take (Q8_K's is the most).
const MATMUL_Q_MAX_SHARED: usize = 64 * 1024;
/// Most warps an attention block takes (ATTENTION_MAX_WARPS in attention.cu).
pub const ATTENTION_MAX_WARPS: u32 = 16;
/// Largest head the attention and RoPE kernels handle (MAX_HEAD_DIM).
pub const MAX_HEAD_DIM: usize = 256;

/// A weight matrix on the device: `rows` rows of `cols` values of type `ty`,
/// `row_bytes` apart, from address `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub ptr: u64,
}

/// One output of a stacked matvec: the matrix and where its rows go.
pub struct MatvecOut<'a> {
    pub w: &'a DeviceMatrix,
    /// `n` rows of `ldy` f32.
    pub y: u64,
    pub ldy: usize,
}

/// A matvec launch's arguments (see `MATVEC_ARGS` in matvec.cu).
struct MatvecLaunch {
    w: [u64; MATVEC_MAX_SEGMENTS],
    y: [u64; MATVEC_MAX_SEGMENTS],
    rows: [u32; MATVEC_MAX_SEGMENTS],
    ldy: [u32; MATVEC_MAX_SEGMENTS],
    total_rows: usize,
    row_bytes: usize,
    cols: usize,
    x: u64,
    n: usize,
    norm: Option<(u64, f32)>,
    accumulate: bool,
    /// Products per row: 2 for the gated kernels, else 1.
    sums: usize,
    /// Whether rows go through shared memory (block formats).
    staged: bool,
}

/// When a mat-vec launch runs as a persistent grid (see [`Kernels`]).
#[derive(Clone, Copy, Debug)]
struct MatvecPersist {
    blocks_per_sm: u32,
    min_bytes: usize,
}

impl MatvecPersist {
    /// `WORKER_ORCD_MATVEC_PERSIST=blocks_per_sm[,min_bytes]` (0: off).
    fn from_env() -> Option<Self> {
        let value = std::env::var("WORKER_ORCD_MATVEC_PERSIST").ok()?;
        let mut fields = value.split(',').map(|f| f.trim().parse::<usize>());
        let blocks_per_sm = fields.next()?.ok()?;
        let min_bytes = fields.next().and_then(|f| f.ok()).unwrap_or(0);
        (blocks_per_sm > 0).then_some(Self {
            blocks_per_sm: blocks_per_sm as u32,
            min_bytes,
        })
    }
}

/// The kernels of one formats' matvec and embedding.
struct FormatKernels {
    matvec_1: CudaFunction,
    matvec_8: CudaFunction,
    /// Indexed [gelu][tokens 8], as matvec_gated_{silu,gelu}_<format>_{1,8}.
    gated: [[CudaFunction; 2]; 2],
    embed: CudaFunction,
    rows_f16: CudaFunction,
    /// The persistent grid's one-token kernels, [plain, gated SiLU, gated
    /// GELU] (block formats only).
    persist: Option<[CudaFunction; 3]>,
    /// The tensor-core product of a few rows (block formats only).
    matmul_q: Option<CudaFunction>,
}

pub struct Kernels {
    stream: Arc<CudaStream>,
    /// Whether launches allow programmatic dependent launch (see [`Launch`]).
    pdl: bool,
    /// The device's streaming multiprocessors.
    sm_count: u32,
    /// Mat-vec launches over at least `min_bytes` of weights run a
    /// persistent grid of `blocks_per_sm` blocks an SM (see matvec.cu);
    /// `None`: one block per row group always.
    matvec_persist: Option<MatvecPersist>,
    /// Whether products of 1 to MATMUL_Q_MAX_ROWS rows may run on the
    /// tensor-core kernel (`matmul_q` in matvec.cu; Ampere and later).
    matmul_q_enabled: bool,
    matmul_q_reduce: CudaFunction,
    /// Indexed like `dequantize::TYPES`.
    formats: Vec<FormatKernels>,
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    gated_silu: CudaFunction,
    gated_gelu_tanh: CudaFunction,
    f32_to_f16: CudaFunction,
    qkv_prepare: CudaFunction,
    attention: CudaFunction,
    argmax_rows: CudaFunction,
    argmax_rows_masked: CudaFunction,
    pub dequantizer: Dequantizer,
}

fn function(module: &Arc<CudaModule>, file: &str, name: &str) -> Result<CudaFunction> {
    module
        .load_function(name)
        .context(|| format!("finding kernel {name} in kernels/{file}.cu"))
}

/// A kernel argument: passed to the driver from an 8-byte slot, the value in
/// its low bytes (little-endian hosts; the driver copies the parameter's
/// own size).
trait LaunchArg: Copy {
    fn bits(self) -> u64;
}

impl LaunchArg for u32 {
    fn bits(self) -> u64 {
        u64::from(self)
    }
}

impl LaunchArg for u64 {
    fn bits(self) -> u64 {
        self
    }
}

impl LaunchArg for f32 {
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
}

/// One launch through `cuLaunchKernelEx`. With `pdl` (Hopper and later), the
/// launch allows programmatic dependent launch: the kernel may start while
/// the one before it in the stream still runs, and every kernel launched
/// here first does what needs nothing from earlier kernels (a matvec loads
/// its weight rows), then waits for them (`wait_for_prerequisites` in
/// common.cuh), so a decode step's chain of small kernels overlaps each
/// launch and weight fetch with the kernel before.
struct Launch<'a> {
    stream: &'a CudaStream,
    function: &'a CudaFunction,
    pdl: bool,
    args: Vec<u64>,
}

impl Launch<'_> {
    fn arg<T: LaunchArg>(&mut self, value: &T) -> &mut Self {
        self.args.push(value.bits());
        self
    }

    /// # Safety
    /// The arguments must be the kernel's, in order, and every address they
    /// hold valid for what the kernel does with it.
    unsafe fn launch(&mut self, config: LaunchConfig) -> std::result::Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> = self
            .args
            .iter_mut()
            .map(|slot| (slot as *mut u64).cast())
            .collect();
        let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: u32::from(self.pdl),
        };
        // SAFETY: the parameters point at live slots, one per kernel
        // parameter (as the caller vouches); the attribute outlives the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

fn grid(x: u32, y: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether `ty` stores values in blocks (the matvec stages their rows; the
/// plain float types are read 16 bytes at a time as they are).
fn is_block_format(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// A staged row's shared-memory slot (`stage_row` in matvec.cu), in 16-byte
/// units: the row, plus room for its misalignment at both ends.
fn stage_slot_units(row_bytes: usize) -> usize {
    row_bytes.div_ceil(16) + 2
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| CudaError::Invalid {
        what: what.to_string(),
        reason: format!("{v} does not fit the kernels' 32-bit sizes"),
    })
}

/// How `matmul_q` lays out its grid: `(row tiles, splits, chunks a
/// split)`. Enough blocks for 8 an SM where the row tiles alone
/// give fewer, no more splits than 256-value chunks or than `partial_bytes`
/// holds sums for (`n` rows of `rows` f32 a split), every split non-empty.
fn matmul_q_splits(
    rows: usize,
    cols: usize,
    n: usize,
    sm_count: usize,
    partial_bytes: usize,
) -> (usize, usize, usize) {
    let row_tiles = rows.div_ceil(MATMUL_Q_WARPS * MATMUL_Q_WARP_ROWS);
    let chunks = cols.div_ceil(MATMUL_Q_CHUNK);
    let wanted = (8 * sm_count).div_ceil(row_tiles);
    let room = partial_bytes / (4 * n * rows).max(1);
    let splits = wanted.min(chunks).min(room).max(1);
    let per_split = chunks.div_ceil(splits);
    (row_tiles, chunks.div_ceil(per_split), per_split)
}

/// Blocks for a grid-stride elementwise kernel over `n` values.
fn elementwise_blocks(n: usize) -> u32 {
    (n.div_ceil(ELEMENTWISE_THREADS as usize)).clamp(1, 65_536) as u32
}

impl Kernels {
    pub fn load(device: &CudaDevice) -> Result<Self> {
        let matvec = device.load_module(&MATVEC)?;
        let formats = TYPES
            .iter()
            .map(|&ty| {
                let stem = crate::dequantize::stem(ty);
                let gated = |act: &str, tokens: usize| {
                    function(
                        &matvec,
                        "matvec",
                        &format!("matvec_gated_{act}_{stem}_{tokens}"),
                    )
                };
                Ok(FormatKernels {
                    matvec_1: function(&matvec, "matvec", &format!("matvec_{stem}_1"))?,
                    matvec_8: function(&matvec, "matvec", &format!("matvec_{stem}_8"))?,
                    gated: [
                        [gated("silu", 1)?, gated("silu", 8)?],
                        [gated("gelu", 1)?, gated("gelu", 8)?],
                    ],
                    embed: function(&matvec, "matvec", &format!("embed_{stem}"))?,
                    rows_f16: function(&matvec, "matvec", &format!("rows_to_f16_{stem}"))?,
                    matmul_q: if is_block_format(ty) {
                        let f = function(&matvec, "matvec", &format!("matmul_q_{stem}"))?;
                        f.set_attribute(
                            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            MATMUL_Q_MAX_SHARED as i32,
                        )
                        .context(|| format!("allowing matmul_q_{stem} its shared memory"))?;
                        Some(f)
                    } else {
                        None
                    },
                    persist: if is_block_format(ty) {
                        let f = |prefix: &str| {
                            function(
                                &matvec,
                                "matvec",
                                &format!("matvec_{prefix}persist_{stem}_1"),
                            )
                        };
                        Some([f("")?, f("gated_silu_")?, f("gated_gelu_")?])
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = device.load_module(&NORM)?;
        let elementwise = device.load_module(&ELEMENTWISE)?;
        let rope = device.load_module(&ROPE)?;
        let attention = device.load_module(&ATTENTION)?;
        let sample = device.load_module(&SAMPLE)?;
        Ok(Self {
            stream: device.stream().clone(),
            // Programmatic dependent launch needs Hopper (sm_90); the
            // kernels' griddepcontrol instructions exist only there.
            // WORKER_ORCD_PDL=0 turns it off, to measure what it brings.
            pdl: device.compute_capability().0 >= 9
                && std::env::var("WORKER_ORCD_PDL").map_or(true, |v| v != "0"),
            sm_count: device
                .context()
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .context(|| "reading the GPU's multiprocessor count".into())?
                as u32,
            matvec_persist: MatvecPersist::from_env(),
            // Off until measured on a GPU: WORKER_ORCD_MATMUL_Q=1 turns it on.
            matmul_q_enabled: device.compute_capability().0 >= 8
                && std::env::var("WORKER_ORCD_MATMUL_Q").is_ok_and(|v| v == "1"),
            matmul_q_reduce: function(&matvec, "matvec", "matmul_q_reduce")?,
            formats,
            rms_norm: function(&norm, "norm", "rms_norm")?,
            add_rms_norm: function(&norm, "norm", "add_rms_norm")?,
            gated_silu: function(&elementwise, "elementwise", "gated_silu")?,
            gated_gelu_tanh: function(&elementwise, "elementwise", "gated_gelu_tanh")?,
            f32_to_f16: function(&elementwise, "elementwise", "f32_to_f16")?,
            qkv_prepare: function(&rope, "rope", "qkv_prepare")?,
            attention: function(&attention, "attention", "attention")?,
            argmax_rows: function(&sample, "sample", "argmax_rows")?,
            argmax_rows_masked: function(&sample, "sample", "argmax_rows_masked")?,
            dequantizer: Dequantizer::new(device)?,
        })
    }

    fn launch<'a>(&'a self, function: &'a CudaFunction) -> Launch<'a> {
        Launch {
            stream: &self.stream,
            function,
            pdl: self.pdl,
            args: Vec::with_capacity(24),
        }
    }

    fn format(&self, ty: GgmlType) -> Result<&FormatKernels> {
        TYPES
            .iter()
            .position(|&t| t == ty)
            .map(|i| &self.formats[i])
            .ok_or(CudaError::UnsupportedType(ty))
    }

    /// Makes mat-vec launches over at least `min_bytes` of weights run a
    /// persistent grid of `blocks_per_sm` blocks an SM (0: never), in place
    /// of what `WORKER_ORCD_MATVEC_PERSIST` said at load.
    pub fn set_matvec_persist(&mut self, blocks_per_sm: u32, min_bytes: usize) {
        self.matvec_persist = (blocks_per_sm > 0).then_some(MatvecPersist {
            blocks_per_sm,
            min_bytes,
        });
    }

    /// Whether the matvec kernels take `w`: rows of whole 8-value stretches.
    pub fn matvec_takes(w: &DeviceMatrix) -> bool {
        w.cols.is_multiple_of(MATVEC_STRETCH)
    }

    /// `y[t][r] (+)= Σ_c w[r][c] · x[t][c]`: x is `n × w.cols` f32, y is `n`
    /// rows of `ldy` f32.
    ///
    /// # Safety
    /// The addresses must hold those shapes (x 16-byte aligned) while the
    /// stream's work runs.
    pub unsafe fn matvec(
        &self,
        w: &DeviceMatrix,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.matvec_stacked(&[MatvecOut { w, y, ldy }], x, n, None, accumulate) }
    }

    /// Several products of one input in one launch (Q, K and V): for each
    /// output, `y[t][r] (+)= rstd(x[t]) · Σ_c w[r][c] · x[t][c] · norm[c]`
    /// with `norm = Some((weights, eps))` (RMSNorm fused into the input), or
    /// the plain product without it. The matrices share type and width.
    ///
    /// # Safety
    /// As for [`Self::matvec`]; `norm` holds `cols` f32.
    pub unsafe fn matvec_stacked(
        &self,
        outs: &[MatvecOut<'_>],
        x: u64,
        n: usize,
        norm: Option<(u64, f32)>,
        accumulate: bool,
    ) -> Result<()> {
        let first = outs.first().ok_or_else(|| CudaError::Invalid {
            what: "stacked matvec".into(),
            reason: "no matrices".into(),
        })?;
        let (ty, cols, row_bytes) = (first.w.ty, first.w.cols, first.w.row_bytes);
        if outs.len() > MATVEC_MAX_SEGMENTS
            || outs
                .iter()
                .any(|o| (o.w.ty, o.w.cols, o.w.row_bytes) != (ty, cols, row_bytes))
            || !Self::matvec_takes(first.w)
        {
            return Err(CudaError::Invalid {
                what: "stacked matvec".into(),
                reason: format!(
                    "{} matrices of types and shapes {:?}: at most {MATVEC_MAX_SEGMENTS} of one type and width, \
                     a multiple of {MATVEC_STRETCH} values",
                    outs.len(),
                    outs.iter()
                        .map(|o| format!("{} {}×{}", o.w.ty, o.w.rows, o.w.cols))
                        .collect::<Vec<_>>()
                ),
            });
        }
        let format = self.format(ty)?;
        let total_rows: usize = outs.iter().map(|o| o.w.rows).sum();
        let mut w = [0u64; MATVEC_MAX_SEGMENTS];
        let mut y = [0u64; MATVEC_MAX_SEGMENTS];
        let mut rows = [0u32; MATVEC_MAX_SEGMENTS];
        let mut ldy = [0u32; MATVEC_MAX_SEGMENTS];
        for (i, o) in outs.iter().enumerate() {
            w[i] = o.w.ptr;
            y[i] = o.y;
            rows[i] = u32_of("rows", o.w.rows)?;
            ldy[i] = u32_of("ldy", o.ldy)?;
        }
        let kernel = if n == 1 {
            &format.matvec_1
        } else {
            &format.matvec_8
        };
        let persist = format.persist.as_ref().filter(|_| n == 1).map(|k| &k[0]);
        // SAFETY: passed on to the caller.
        unsafe {
            self.launch_matvec(
                kernel,
                persist,
                MatvecLaunch {
                    w,
                    y,
                    rows,
                    ldy,
                    total_rows,
                    row_bytes,
                    cols,
                    x,
                    n,
                    norm,
                    accumulate,
                    sums: 1,
                    staged: is_block_format(ty),
                },
                &|| format!("launching matvec for {ty} {total_rows}×{cols}"),
            )
        }
    }

    /// `y[t][r] = act(Σ_c gate[r][c] · x'[t][c]) · Σ_c up[r][c] · x'[t][c]`
    /// with x' = x, or RMSNorm(x) · norm with `norm = Some((weights, eps))`:
    /// the FFN's first half in one launch (`gelu`: GELU-tanh, else SiLU).
    /// x is `n × cols` f32, y `n × rows` f32; gate and up share type and shape.
    ///
    /// # Safety
    /// As for [`Self::matvec_stacked`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matvec_gated(
        &self,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        x: u64,
        n: usize,
        norm: Option<(u64, f32)>,
        y: u64,
        gelu: bool,
    ) -> Result<()> {
        if (gate.ty, gate.rows, gate.cols) != (up.ty, up.rows, up.cols) || !Self::matvec_takes(gate)
        {
            return Err(CudaError::Invalid {
                what: "fused gate/up product".into(),
                reason: format!(
                    "gate is {} {}×{}, up {} {}×{}",
                    gate.ty, gate.rows, gate.cols, up.ty, up.rows, up.cols
                ),
            });
        }
        let format = self.format(gate.ty)?;
        let kernel = &format.gated[usize::from(gelu)][usize::from(n > 1)];
        let persist = format
            .persist
            .as_ref()
            .filter(|_| n == 1)
            .map(|k| &k[1 + usize::from(gelu)]);
        let rows = u32_of("rows", gate.rows)?;
        // SAFETY: passed on to the caller.
        unsafe {
            self.launch_matvec(
                kernel,
                persist,
                MatvecLaunch {
                    w: [gate.ptr, up.ptr, 0],
                    y: [y, 0, 0],
                    rows: [rows, 0, 0],
                    ldy: [rows, 0, 0],
                    total_rows: gate.rows,
                    row_bytes: gate.row_bytes,
                    cols: gate.cols,
                    x,
                    n,
                    norm,
                    accumulate: false,
                    sums: 2,
                    staged: is_block_format(gate.ty),
                },
                &|| {
                    format!(
                        "launching the gated matvec for {} {}×{}",
                        gate.ty, gate.rows, gate.cols
                    )
                },
            )
        }
    }

    /// # Safety
    /// As for [`Self::matvec_stacked`]; `kernel` is one of the matvec
    /// kernels, `persist` its persistent-grid form where there is one.
    unsafe fn launch_matvec(
        &self,
        kernel: &CudaFunction,
        persist: Option<&CudaFunction>,
        l: MatvecLaunch,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let tokens_per_block = if l.n == 1 { 1 } else { MATVEC_MAX_TOKENS };
        // Long rows take a whole block each (see matvec.cu).
        let warps_per_row: u32 = if l.cols >= SPLIT_ROW_COLS {
            MATVEC_ROWS_PER_BLOCK
        } else {
            1
        };
        let total_rows = u32_of("rows", l.total_rows)?;
        let mut config = grid(
            total_rows.div_ceil(MATVEC_ROWS_PER_BLOCK / warps_per_row),
            u32_of("token blocks", l.n.div_ceil(tokens_per_block))?,
            MATVEC_ROWS_PER_BLOCK * 32,
        );
        // Block formats' rows are first copied to shared memory (see
        // matvec.cu): a slot per row and sum.
        let (stage_slot, stage_bytes) = if l.staged {
            let slot = stage_slot_units(l.row_bytes);
            let slots = (MATVEC_ROWS_PER_BLOCK / warps_per_row) as usize * l.sums;
            let bytes = slot * slots * 16;
            if bytes <= MATVEC_MAX_STAGE_BYTES {
                (u32_of("stage slot", slot)?, bytes as u32)
            } else {
                (0, 0)
            }
        } else {
            (0, 0)
        };
        config.shared_mem_bytes = stage_bytes;
        // A persistent grid double-buffers its stage (see matvec.cu).
        let mut kernel = kernel;
        if let (Some(p), Some(persist)) = (self.matvec_persist, persist) {
            let blocks = self.sm_count * p.blocks_per_sm;
            if stage_slot != 0
                && l.total_rows * l.row_bytes * l.sums >= p.min_bytes
                && 2 * stage_bytes as usize <= MATVEC_MAX_STAGE_BYTES
                && blocks < config.grid_dim.0
            {
                kernel = persist;
                config.grid_dim.0 = blocks;
                config.shared_mem_bytes = 2 * stage_bytes;
            }
        }
        let (row_bytes, cols, n_tokens) = (
            l.row_bytes as u64,
            u32_of("cols", l.cols)?,
            u32_of("tokens", l.n)?,
        );
        let (norm, eps) = l.norm.unwrap_or((0, 0.0));
        let accumulate = u32::from(l.accumulate);
        let mut launch = self.launch(kernel);
        for w in &l.w {
            launch.arg(w);
        }
        for rows in &l.rows {
            launch.arg(rows);
        }
        for y in &l.y {
            launch.arg(y);
        }
        for ldy in &l.ldy {
            launch.arg(ldy);
        }
        launch
            .arg(&row_bytes)
            .arg(&cols)
            .arg(&l.x)
            .arg(&n_tokens)
            .arg(&norm)
            .arg(&eps)
            .arg(&accumulate)
            .arg(&warps_per_row)
            .arg(&stage_slot);
        // SAFETY: the caller vouches for the buffers; the arguments match the kernel's.
        unsafe { launch.launch(config) }.context(what)?;
        Ok(())
    }

    /// Makes products of a few rows use the tensor-core kernel (`matmul_q`)
    /// or not, in place of what `WORKER_ORCD_MATMUL_Q` said at load.
    pub fn set_matmul_q(&mut self, enabled: bool) {
        self.matmul_q_enabled = enabled;
    }

    /// `y[t][r] (+)= Σ_c w[r][c] · x[t][c]` for `n` ≤ [`MATMUL_Q_MAX_ROWS`]
    /// rows of x (f16, `n × w.cols`) on the tensor cores, W read in its
    /// block format once (`matmul_q` in matvec.cu). Long rows are split over
    /// several blocks whose partial sums go to `partial` (`partial_bytes`
    /// long; fewer splits where it is short). Returns false, having launched
    /// nothing, where the kernel does not take `w` or `n` (plain float
    /// types, widths not a multiple of 64, pre-Ampere GPUs, disabled).
    ///
    /// # Safety
    /// x must hold `n × w.cols` f16, y `n` rows of `ldy` f32, partial
    /// `partial_bytes`, while the stream's work runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_q(
        &self,
        w: &DeviceMatrix,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
        partial: u64,
        partial_bytes: usize,
    ) -> Result<bool> {
        // Checked before the format lookup: off, this runs for every
        // product of a step that goes through cuBLAS.
        if !self.matmul_q_enabled || n == 0 || n > MATMUL_Q_MAX_ROWS || !w.cols.is_multiple_of(64) {
            return Ok(false);
        }
        let Some(kernel) = self.format(w.ty)?.matmul_q.as_ref() else {
            return Ok(false);
        };
        let chunk_bytes = MATMUL_Q_CHUNK / w.ty.block_size() * w.ty.type_size();
        let slot_units = chunk_bytes.div_ceil(16) + 1;
        let shared =
            MATMUL_Q_WARPS * (2 * MATMUL_Q_WARP_ROWS * slot_units * 16 + MATMUL_Q_TILE_BYTES);
        if shared > MATMUL_Q_MAX_SHARED {
            return Ok(false);
        }
        let (row_tiles, splits, per_split) =
            matmul_q_splits(w.rows, w.cols, n, self.sm_count as usize, partial_bytes);
        let mut config = grid(
            u32_of("row tiles", row_tiles)?,
            u32_of("splits", splits)?,
            (MATMUL_Q_WARPS * 32) as u32,
        );
        config.shared_mem_bytes = shared as u32;
        let (row_bytes, rows, cols, n_tokens, ldy32) = (
            w.row_bytes as u64,
            u32_of("rows", w.rows)?,
            u32_of("cols", w.cols)?,
            u32_of("tokens", n)?,
            u32_of("ldy", ldy)?,
        );
        let (accumulate, per_split32, slot_units32) = (
            u32::from(accumulate),
            u32_of("chunks", per_split)?,
            u32_of("slot", slot_units)?,
        );
        let mut launch = self.launch(kernel);
        launch
            .arg(&w.ptr)
            .arg(&row_bytes)
            .arg(&rows)
            .arg(&cols)
            .arg(&x)
            .arg(&n_tokens)
            .arg(&y)
            .arg(&ldy32)
            .arg(&accumulate)
            .arg(&per_split32)
            .arg(&partial)
            .arg(&slot_units32);
        // SAFETY: as the caller vouches; the arguments match the kernel's.
        unsafe { launch.launch(config) }
            .context(|| format!("launching matmul_q for {} {}×{}", w.ty, w.rows, w.cols))?;
        if splits > 1 {
            let splits32 = u32_of("splits", splits)?;
            let mut launch = self.launch(&self.matmul_q_reduce);
            launch
                .arg(&partial)
                .arg(&splits32)
                .arg(&n_tokens)
                .arg(&rows)
                .arg(&y)
                .arg(&ldy32)
                .arg(&accumulate);
            // SAFETY: partial holds the splits' sums the launch above wrote.
            unsafe { launch.launch(grid(elementwise_blocks(n * w.rows), 1, ELEMENTWISE_THREADS)) }
                .context(|| "launching matmul_q_reduce".into())?;
        }
        Ok(true)
    }

    /// Rows `first..first + rows` of the block-format matrix `w` as f16 into
    /// `dst` (`rows × w.cols`, 16-byte aligned), for a product through
    /// cuBLAS. Returns false, having launched nothing, where this kernel does
    /// not take `w` (plain float types, rows not of whole 8-value stretches
    /// or too long to stage); the bit-exact dequantizer does those.
    ///
    /// # Safety
    /// `w` must hold its rows; `dst` room for the values.
    pub unsafe fn rows_to_f16(
        &self,
        w: &DeviceMatrix,
        first: usize,
        rows: usize,
        dst: u64,
    ) -> Result<bool> {
        let slot = stage_slot_units(w.row_bytes);
        let shared = slot * MATVEC_ROWS_PER_BLOCK as usize * 16;
        if !is_block_format(w.ty) || !Self::matvec_takes(w) || shared > MATVEC_MAX_STAGE_BYTES {
            return Ok(false);
        }
        let format = self.format(w.ty)?;
        let (row_bytes, cols, n_rows, stage_slot) = (
            w.row_bytes as u64,
            u32_of("cols", w.cols)?,
            u32_of("rows", rows)?,
            u32_of("stage slot", slot)?,
        );
        let start = w.ptr + (first * w.row_bytes) as u64;
        let mut config = grid(
            n_rows.div_ceil(MATVEC_ROWS_PER_BLOCK),
            1,
            MATVEC_ROWS_PER_BLOCK * 32,
        );
        config.shared_mem_bytes = shared as u32;
        let mut launch = self.launch(&format.rows_f16);
        launch
            .arg(&start)
            .arg(&row_bytes)
            .arg(&cols)
            .arg(&n_rows)
            .arg(&stage_slot)
            .arg(&dst);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(config) }
            .context(|| format!("launching rows_to_f16 for {}", w.ty))?;
        Ok(true)
    }

    /// `x[t] = table[tokens[t]] · scale` for `n` tokens (x: `n × table.cols` f32).
    ///
    /// # Safety
    /// `tokens` must hold `n` ids below `table.rows`, `x` room for the rows.
    pub unsafe fn embed(
        &self,
        table: &DeviceMatrix,
        tokens: u64,
        n: usize,
        scale: f32,
        x: u64,
    ) -> Result<()> {
        let format = self.format(table.ty)?;
        let (row_bytes, cols) = (table.row_bytes as u64, u32_of("cols", table.cols)?);
        let mut launch = self.launch(&format.embed);
        launch
            .arg(&table.ptr)
            .arg(&row_bytes)
            .arg(&cols)
            .arg(&tokens)
            .arg(&scale)
            .arg(&x);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(u32_of("tokens", n)?, 1, 128)) }
            .context(|| "launching embed".into())?;
        Ok(())
    }

    /// `out[i] = RMSNorm(x[rows[i]]) · w` for `n` rows of `dim` (rows = 0: row i).
    ///
    /// # Safety
    /// The addresses must hold those shapes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rms_norm(
        &self,
        x: u64,
        rows: u64,
        w: u64,
        eps: f32,
        dim: usize,
        n: usize,
        out: u64,
    ) -> Result<()> {
        let dim = u32_of("dim", dim)?;
        let mut launch = self.launch(&self.rms_norm);
        launch
            .arg(&x)
            .arg(&rows)
            .arg(&w)
            .arg(&eps)
            .arg(&dim)
            .arg(&out);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(u32_of("rows", n)?, 1, ROW_THREADS)) }
            .context(|| "launching rms_norm".into())?;
        Ok(())
    }

    /// `x[i] += RMSNorm(y[i]) · w` for `n` rows of `dim`.
    ///
    /// # Safety
    /// The addresses must hold those shapes.
    pub unsafe fn add_rms_norm(
        &self,
        x: u64,
        y: u64,
        w: u64,
        eps: f32,
        dim: usize,
        n: usize,
    ) -> Result<()> {
        let dim = u32_of("dim", dim)?;
        let mut launch = self.launch(&self.add_rms_norm);
        launch.arg(&x).arg(&y).arg(&w).arg(&eps).arg(&dim);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(u32_of("rows", n)?, 1, ROW_THREADS)) }
            .context(|| "launching add_rms_norm".into())?;
        Ok(())
    }

    /// `gate = act(gate) · up` over `n` values; `gelu` picks GELU (tanh) over SiLU.
    ///
    /// # Safety
    /// Both addresses must hold `n` f32.
    pub unsafe fn gated_activation(&self, gate: u64, up: u64, n: usize, gelu: bool) -> Result<()> {
        let kernel = if gelu {
            &self.gated_gelu_tanh
        } else {
            &self.gated_silu
        };
        let count = n as u64;
        let mut launch = self.launch(kernel);
        launch.arg(&gate).arg(&up).arg(&count);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(elementwise_blocks(n), 1, ELEMENTWISE_THREADS)) }
            .context(|| "launching the gated activation".into())?;
        Ok(())
    }

    /// `y = f16(x)` over `n` values.
    ///
    /// # Safety
    /// `x` must hold `n` f32, `y` room for `n` f16.
    pub unsafe fn f32_to_f16(&self, x: u64, y: u64, n: usize) -> Result<()> {
        let count = n as u64;
        let mut launch = self.launch(&self.f32_to_f16);
        launch.arg(&x).arg(&y).arg(&count);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(elementwise_blocks(n), 1, ELEMENTWISE_THREADS)) }
            .context(|| "launching f32_to_f16".into())?;
        Ok(())
    }

    /// Bias, QK-norm, RoPE and the KV-cache write of `n` tokens (see rope.cu).
    ///
    /// # Safety
    /// Every address must hold what rope.cu's `qkv_prepare` documents.
    pub unsafe fn qkv_prepare(&self, args: &QkvPrepare) -> Result<()> {
        let a = args;
        let (n_heads, n_kv_heads) = (
            u32_of("heads", a.n_heads)?,
            u32_of("kv heads", a.n_kv_heads)?,
        );
        let (head_dim, rope_dims) = (
            u32_of("head_dim", a.head_dim)?,
            u32_of("rope dims", a.rope_dims)?,
        );
        let neox = u32::from(a.neox);
        let mut launch = self.launch(&self.qkv_prepare);
        launch
            .arg(&a.q)
            .arg(&a.k)
            .arg(&a.v)
            .arg(&a.bq)
            .arg(&a.bk)
            .arg(&a.bv)
            .arg(&a.q_norm)
            .arg(&a.k_norm)
            .arg(&a.eps)
            .arg(&a.positions)
            .arg(&a.table_offsets)
            .arg(&a.block_tables)
            .arg(&a.k_cache)
            .arg(&a.v_cache)
            .arg(&n_heads)
            .arg(&n_kv_heads)
            .arg(&head_dim)
            .arg(&rope_dims)
            .arg(&a.theta_scale)
            .arg(&neox)
            .arg(&a.rope_factors)
            .arg(&a.freq_scale)
            .arg(&a.attn_factor);
        let config = grid(u32_of("tokens", a.n_tokens)?, n_heads + n_kv_heads, 32);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(config) }.context(|| "launching qkv_prepare".into())?;
        Ok(())
    }

    /// Attention of `n` tokens' queries over their sequences' caches (see attention.cu).
    ///
    /// # Safety
    /// Every address must hold what attention.cu documents.
    pub unsafe fn attention(&self, args: &Attention) -> Result<()> {
        let a = args;
        let (n_heads, n_kv_heads) = (
            u32_of("heads", a.n_heads)?,
            u32_of("kv heads", a.n_kv_heads)?,
        );
        let (head_dim, window) = (u32_of("head_dim", a.head_dim)?, u32_of("window", a.window)?);
        let mut launch = self.launch(&self.attention);
        launch
            .arg(&a.q)
            .arg(&a.k_cache)
            .arg(&a.v_cache)
            .arg(&a.positions)
            .arg(&a.table_offsets)
            .arg(&a.block_tables)
            .arg(&n_heads)
            .arg(&n_kv_heads)
            .arg(&head_dim)
            .arg(&window)
            .arg(&a.scale)
            .arg(&a.softcap)
            .arg(&a.out);
        let warps = a.warps.clamp(1, ATTENTION_MAX_WARPS);
        let config = grid(u32_of("tokens", a.n_tokens)?, n_heads, warps * 32);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(config) }.context(|| "launching attention".into())?;
        Ok(())
    }

    /// `out[r]` = the argmax key of `logits[r]` for `rows` rows of `vocab`
    /// f32 (see sample.cu; [`argmax_index`] reads the index from it).
    ///
    /// # Safety
    /// `logits` must hold the rows, `out` room for `rows` u64.
    pub unsafe fn argmax_rows(
        &self,
        logits: u64,
        vocab: usize,
        rows: usize,
        out: u64,
    ) -> Result<()> {
        // SAFETY: `out` holds rows u64 (as the caller vouches); the kernel takes the maximum from 0.
        unsafe { driver::memset_d8_async(out, 0, rows * 8, self.stream.cu_stream()) }
            .context(|| "clearing the argmax keys".into())?;
        let blocks = vocab.div_ceil(ARGMAX_THREADS as usize * 8).clamp(1, 1024) as u32;
        let vocab = u32_of("vocab", vocab)?;
        let mut launch = self.launch(&self.argmax_rows);
        launch.arg(&logits).arg(&vocab).arg(&out);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(blocks, u32_of("rows", rows)?, ARGMAX_THREADS)) }
            .context(|| "launching argmax_rows".into())?;
        Ok(())
    }

    /// As [`Kernels::argmax_rows`], each row over the tokens its mask in
    /// `masks` allows.
    ///
    /// # Safety
    /// `logits` must hold the rows, `masks.row_mask` `rows` u32 naming masks
    /// that `masks.masks` holds, `out` room for `rows` u64.
    pub unsafe fn argmax_rows_masked(
        &self,
        logits: u64,
        vocab: usize,
        rows: usize,
        masks: &TokenMasks,
        out: u64,
    ) -> Result<()> {
        let TokenMasks {
            row_mask,
            masks,
            words,
        } = *masks;
        // SAFETY: `out` holds rows u64 (as the caller vouches); the kernel takes the maximum from 0.
        unsafe { driver::memset_d8_async(out, 0, rows * 8, self.stream.cu_stream()) }
            .context(|| "clearing the argmax keys".into())?;
        let blocks = vocab.div_ceil(ARGMAX_THREADS as usize * 8).clamp(1, 1024) as u32;
        let vocab = u32_of("vocab", vocab)?;
        let words = u32_of("mask words", words)?;
        let mut launch = self.launch(&self.argmax_rows_masked);
        launch
            .arg(&logits)
            .arg(&vocab)
            .arg(&row_mask)
            .arg(&masks)
            .arg(&words)
            .arg(&out);
        // SAFETY: as the caller vouches.
        unsafe { launch.launch(grid(blocks, u32_of("rows", rows)?, ARGMAX_THREADS)) }
            .context(|| "launching argmax_rows_masked".into())?;
        Ok(())
    }
}

/// Token masks on the device for [`Kernels::argmax_rows_masked`].
#[derive(Clone, Copy, Debug)]
pub struct TokenMasks {
    /// Per row, the number of its mask, or `u32::MAX` for none (u32).
    pub row_mask: u64,
    /// The masks, `words` u32 each (bit `t % 32` of word `t / 32`: token `t` allowed).
    pub masks: u64,
    pub words: usize,
}

/// Threads per argmax block; each thread reads about 8 logits.
const ARGMAX_THREADS: u32 = 256;

/// The token index in an argmax key written by [`Kernels::argmax_rows`].
pub fn argmax_index(key: u64) -> u32 {
    if key == 0 {
        0
    } else {
        !(key as u32)
    }
}

/// The arguments of `qkv_prepare` (rope.cu); 0 stands for an absent bias or norm.
pub struct QkvPrepare {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub bq: u64,
    pub bk: u64,
    pub bv: u64,
    pub q_norm: u64,
    pub k_norm: u64,
    pub eps: f32,
    pub positions: u64,
    pub table_offsets: u64,
    pub block_tables: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_dims: usize,
    pub theta_scale: f32,
    pub neox: bool,
    /// Per-pair divisors of the angle, `[rope_dims / 2]` f32, or 0.
    pub rope_factors: u64,
    pub freq_scale: f32,
    pub attn_factor: f32,
}

/// The arguments of `attention` (attention.cu).
pub struct Attention {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub positions: u64,
    pub table_offsets: u64,
    pub block_tables: u64,
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// 0: full causal attention.
    pub window: usize,
    pub scale: f32,
    /// 0, or Gemma 2's attention logit soft-cap.
    pub softcap: f32,
    pub out: u64,
    /// Warps per (token, head) block, 1..=ATTENTION_MAX_WARPS: each takes
    /// every `warps`-th chunk of 32 keys.
    pub warps: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_q_splits_cover_every_chunk_once_within_the_partial_buffer() {
        for (rows, cols, n) in [
            (3_584usize, 18_944usize, 64usize),
            (512, 3_584, 16),
            (18_944, 3_584, 64),
            (896, 4_864, 3),
            (152_064, 3_584, 64),
            (64, 256, 1),
        ] {
            for partial_bytes in [0usize, 1 << 20, 64 << 20] {
                let (_, splits, per_split) = matmul_q_splits(rows, cols, n, 132, partial_bytes);
                let chunks = cols.div_ceil(MATMUL_Q_CHUNK);
                assert!(splits >= 1 && per_split >= 1);
                // Every split has a chunk, and together they cover them all.
                assert!((splits - 1) * per_split < chunks && splits * per_split >= chunks);
                if splits > 1 {
                    assert!(
                        splits * n * rows * 4 <= partial_bytes,
                        "{rows}×{cols}, {n} rows"
                    );
                }
            }
        }
        // Few row tiles over long rows are split; many row tiles are not.
        assert!(matmul_q_splits(3_584, 18_944, 64, 132, 64 << 20).1 > 1);
        assert_eq!(matmul_q_splits(152_064, 3_584, 64, 132, 64 << 20).1, 1);
    }
}
