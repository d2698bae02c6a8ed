//! cuBLAS for the products that run as GEMMs: every product in `--weights
//! f16` mode, and prefill batches in the default mode (weights dequantized to
//! an f16 scratch first). f16 operands, f32 accumulation and output.

use std::ffi::{c_int, c_void};

use cudarc::cublas::{result as blas, sys, CudaBlas};

use crate::device::CudaDevice;
use crate::error::{CudaError, Result};
use crate::memory::DeviceBuffer;

pub struct Blas {
    blas: CudaBlas,
    /// cuBLAS's workspace, ours so that its size is known and counted.
    _workspace: DeviceBuffer,
}

impl Blas {
    pub fn new(device: &CudaDevice, workspace_bytes: usize) -> Result<Self> {
        crate::toolkit::cublas()?;
        let blas = CudaBlas::new(device.stream().clone()).map_err(|source| CudaError::Blas {
            context: "creating a cuBLAS handle".into(),
            source,
        })?;
        let workspace = DeviceBuffer::new(device, workspace_bytes, "the cuBLAS workspace")?;
        // SAFETY: the handle is valid; the workspace outlives it (dropped after `blas`).
        unsafe {
            sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr() as *mut c_void,
                workspace.bytes(),
            )
        }
        .result()
        .map_err(|source| CudaError::Blas {
            context: "setting the cuBLAS workspace".into(),
            source,
        })?;
        Ok(Self {
            blas,
            _workspace: workspace,
        })
    }

    /// `y[t][r] (+)= Σ_c w[r][c] · x[t][c]` for `t < n`, `r < rows`:
    /// `w` is `rows × cols` f16 (row-major, as GGUF stores a matrix), `x`
    /// is `n × cols` f16, `y` is `n` rows of `ldy` f32 (the product fills
    /// the first `rows` of each). `accumulate` adds to `y` instead of
    /// overwriting it.
    ///
    /// # Safety
    /// The three addresses must hold those shapes until the stream's work is done.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_f16(
        &self,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        let alpha: f32 = 1.0;
        let beta: f32 = if accumulate { 1.0 } else { 0.0 };
        let int = |v: usize| c_int::try_from(v).expect("matrix dimensions fit in an int");
        // Column-major view: C (rows × n, ldc = ldy) = Wᵀ(stored cols × rows) · X (cols × n).
        // SAFETY: the caller vouches for the buffers; the scalars live across the call.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                int(rows),
                int(n),
                int(cols),
                (&alpha as *const f32).cast(),
                w as *const c_void,
                sys::cudaDataType::CUDA_R_16F,
                int(cols),
                x as *const c_void,
                sys::cudaDataType::CUDA_R_16F,
                int(cols),
                (&beta as *const f32).cast(),
                y as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                int(ldy),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|source| CudaError::Blas {
            context: format!("multiplying {rows}×{cols} f16 weights by {n} rows"),
            source,
        })
    }
}
