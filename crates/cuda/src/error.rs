use std::path::PathBuf;

use cudarc::driver::DriverError;
use gguf::GgmlType;

/// Everything the CUDA backend can fail with. Each variant says what was
/// being done, so that a user can act on the message alone.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda.so could not be loaded (is this a machine with an NVIDIA GPU and its driver?)")]
    NoDriver,
    #[error("no CUDA device: the driver sees none ({0})")]
    NoDevice(String),
    #[error("GPU {requested} does not exist: the driver sees {count} device(s), 0..{count}")]
    DeviceIndex { requested: usize, count: usize },
    #[error("CUDA driver call failed while {context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: DriverError,
    },
    #[error(
        "NVRTC (libnvrtc.so.13) not found; searched the library path and {searched}. \
         Install the CUDA 13 toolkit (set CUDA_HOME) or run scripts/setup-nvrtc.sh for the PyPI wheels"
    )]
    NvrtcMissing { searched: String },
    #[error(
        "CUDA headers (cuda_fp16.h) not found; searched {searched}. \
         Set CUDA_HOME to the CUDA toolkit or run scripts/setup-nvrtc.sh"
    )]
    HeadersMissing { searched: String },
    #[error("NVRTC failed while {context}: {message}")]
    Nvrtc { context: String, message: String },
    #[error("compiling kernels/{module}.cu for {arch} failed:\n{log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not enough GPU memory on GPU {device} ({name}): need {need_mib:.1} MiB \
         ({weights_mib:.1} MiB of weights + {kv_mib:.1} MiB of KV cache) but only \
         {free_mib:.1} MiB of {total_mib:.1} MiB is free"
    )]
    OutOfMemory {
        device: usize,
        name: String,
        need_mib: f64,
        weights_mib: f64,
        kv_mib: f64,
        free_mib: f64,
        total_mib: f64,
    },
    #[error("cuBLAS call failed while {context}: {source}")]
    Blas {
        context: String,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    #[error("loading the model: {0}")]
    Model(#[from] engine::EngineError),
    #[error("no GPU kernel dequantizes {0}")]
    UnsupportedType(GgmlType),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Attaches "while {context}" to a driver result.
pub(crate) trait DriverContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, DriverError> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| CudaError::Driver {
            context: context(),
            source,
        })
    }
}
