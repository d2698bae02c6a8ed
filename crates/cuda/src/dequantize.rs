//! Launchers for `kernels/dequantize.cu`: a tensor's raw GGUF blocks on the
//! device to f16 or bf16, bit-exact with `quant::dequantize_f16` (and with
//! `quant::dequantize` rounded to bf16).
//!
//! Measured on an H200: all 290 tensors of a Qwen2.5-0.5B Q4_K_M file
//! (494M values) to f16 in 1.42 ms, one launch per tensor, 969 GB/s of
//! blocks read plus f16 written: simple byte loads, far from the card's
//! 4.8 TB/s, and fine for a load-time conversion.

use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use gguf::GgmlType;
use half::{bf16, f16};

use crate::compile::DEQUANTIZE;
use crate::device::CudaDevice;
use crate::error::{CudaError, DriverContext, Result};

/// The types the kernels dequantize (and the mat-vec kernels multiply):
/// the quant crate's one list of formats, so a format added there is
/// missing here only until its kernels exist (the NVRTC test names it).
pub const TYPES: [GgmlType; quant::SUPPORTED_TYPES.len()] = quant::SUPPORTED_TYPES;

/// The kernel-name stem of `ty` (`dequantize_<stem>_f16`, `matvec_<stem>_1`):
/// its ggml name in lower case.
pub fn stem(ty: GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

/// The half-precision output types.
pub trait HalfOutput: DeviceRepr {
    /// Kernel-name suffix.
    const SUFFIX: &'static str;
}

impl HalfOutput for f16 {
    const SUFFIX: &'static str = "f16";
}

impl HalfOutput for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Name of the kernel that dequantizes `ty` to `Out`, e.g. `dequantize_q4_k_f16`.
pub fn kernel_name<Out: HalfOutput>(ty: GgmlType) -> Option<String> {
    TYPES
        .contains(&ty)
        .then(|| format!("dequantize_{}_{}", stem(ty), Out::SUFFIX))
}

/// Every kernel the module defines.
pub fn all_kernel_names() -> Vec<String> {
    TYPES
        .iter()
        .flat_map(|&ty| [kernel_name::<f16>(ty), kernel_name::<bf16>(ty)])
        .flatten()
        .collect()
}

const THREADS_PER_BLOCK: u32 = 256;
const VALUES_PER_THREAD: u64 = 8;
/// Enough blocks to fill any current GPU several times over; the kernels
/// loop over the rest (grid-stride).
const MAX_BLOCKS: u64 = 65_536;

/// The loaded dequantization kernels of one device.
pub struct Dequantizer {
    /// Indexed like [`TYPES`].
    to_f16: Vec<CudaFunction>,
    to_bf16: Vec<CudaFunction>,
}

impl Dequantizer {
    /// Builds (or takes from the cache) and loads `kernels/dequantize.cu`.
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let module = device.load_module(&DEQUANTIZE)?;
        let load = |name: String| {
            module
                .load_function(&name)
                .context(|| format!("finding kernel {name} in kernels/dequantize.cu"))
        };
        let to_f16 = TYPES
            .iter()
            .map(|&ty| load(kernel_name::<f16>(ty).expect("listed")))
            .collect::<Result<_>>()?;
        let to_bf16 = TYPES
            .iter()
            .map(|&ty| load(kernel_name::<bf16>(ty).expect("listed")))
            .collect::<Result<_>>()?;
        Ok(Self { to_f16, to_bf16 })
    }

    /// Dequantizes `src` (whole blocks of `ty`) into `dst` (exactly as many
    /// values) on `stream`, as f16.
    pub fn dequantize_f16(
        &self,
        stream: &CudaStream,
        ty: GgmlType,
        src: &CudaView<'_, u8>,
        dst: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        self.launch(stream, &self.to_f16, ty, src, dst)
    }

    /// As [`Self::dequantize_f16`], to bf16.
    pub fn dequantize_bf16(
        &self,
        stream: &CudaStream,
        ty: GgmlType,
        src: &CudaView<'_, u8>,
        dst: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        self.launch(stream, &self.to_bf16, ty, src, dst)
    }

    /// Dequantizes `n_values` values of `ty` at device address `src` to f16
    /// at device address `dst`, on `stream` (the forward pass's weight
    /// scratch, addressed by raw pointer).
    ///
    /// # Safety
    /// `src` must hold `n_values / ty.block_size()` whole blocks and `dst`
    /// room for `n_values` f16 values, both until the work on `stream` is done.
    pub unsafe fn dequantize_f16_raw(
        &self,
        stream: &CudaStream,
        ty: GgmlType,
        src: u64,
        n_values: u64,
        dst: u64,
    ) -> Result<()> {
        let index = TYPES
            .iter()
            .position(|&t| t == ty)
            .ok_or(CudaError::UnsupportedType(ty))?;
        if !n_values.is_multiple_of(ty.block_size() as u64) {
            return Err(CudaError::Invalid {
                what: format!("dequantizing {ty}"),
                reason: format!("{n_values} values are not whole blocks"),
            });
        }
        if n_values == 0 {
            return Ok(());
        }
        let blocks = n_values
            .div_ceil(VALUES_PER_THREAD)
            .div_ceil(u64::from(THREADS_PER_BLOCK))
            .min(MAX_BLOCKS) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = &self.to_f16[index];
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&src).arg(&dst).arg(&n_values);
        // SAFETY: the caller vouches for both ranges (see above).
        unsafe { launch.launch(config) }
            .context(|| format!("launching {}", kernel_name::<f16>(ty).unwrap_or_default()))?;
        Ok(())
    }

    fn launch<Out: HalfOutput>(
        &self,
        stream: &CudaStream,
        kernels: &[CudaFunction],
        ty: GgmlType,
        src: &CudaView<'_, u8>,
        dst: &mut CudaViewMut<'_, Out>,
    ) -> Result<()> {
        let index = TYPES
            .iter()
            .position(|&t| t == ty)
            .ok_or(CudaError::UnsupportedType(ty))?;
        let (type_size, block_size) = (ty.type_size(), ty.block_size());
        if src.len() % type_size != 0 {
            return Err(CudaError::Invalid {
                what: format!("dequantizing {ty}"),
                reason: format!(
                    "{} bytes is not a whole number of {type_size}-byte blocks",
                    src.len()
                ),
            });
        }
        let n_values = (src.len() / type_size * block_size) as u64;
        if dst.len() as u64 != n_values {
            return Err(CudaError::Invalid {
                what: format!("dequantizing {ty}"),
                reason: format!(
                    "{} bytes hold {n_values} values, but the output has room for {}",
                    src.len(),
                    dst.len()
                ),
            });
        }
        if n_values == 0 {
            return Ok(());
        }
        let threads = n_values.div_ceil(VALUES_PER_THREAD);
        let blocks = threads
            .div_ceil(u64::from(THREADS_PER_BLOCK))
            .min(MAX_BLOCKS) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = &kernels[index];
        let mut launch = stream.launch_builder(kernel);
        launch.arg(src).arg(dst).arg(&n_values);
        // SAFETY: the kernel's parameters are (const u8 *src, u16 *dst, u64
        // n_values); `src` holds n_values / block_size whole blocks and `dst`
        // exactly n_values 2-byte values (both checked above).
        unsafe { launch.launch(config) }
            .context(|| format!("launching {}", kernel_name::<Out>(ty).unwrap_or_default()))?;
        Ok(())
    }
}
