//! The CUDA backend: a GPU context, the kernels (CUDA C under `kernels/`,
//! built at run time by NVRTC for the device's own architecture and cached
//! on disk), weight upload, the forward pass ([`CudaModel`], an
//! `engine::backend::Backend`), and its self-test against the CPU backend.
//!
//! Nothing here needs CUDA at build time (docs/DESIGN.md, decision 1):
//! cudarc opens libcuda and libnvrtc when first used, so every machine
//! builds and tests this crate. What needs a library checks for it first
//! and fails with an error that says what is missing ([`CudaError`]),
//! instead of letting cudarc panic. NVRTC alone needs no GPU: the tests
//! compile every kernel on any machine (`scripts/setup-nvrtc.sh` fetches it).

mod blas;
mod compile;
mod cubin;
mod dequantize;
mod device;
mod error;
mod kernels;
mod kv;
mod memory;
mod model;
pub mod selftest;
mod toolkit;
mod upload;

pub use compile::{
    arch_for, compile, compile_options, Compiled, KernelCache, KernelModule, KernelResources,
    ALL_MODULES, ATTENTION, DEQUANTIZE, ELEMENTWISE, HEADERS, MATVEC, NORM, ROPE, SAMPLE,
    TEST_ARCHES,
};
pub use cubin::{cubin_kernels, CubinKernel};
pub use dequantize::{
    all_kernel_names, kernel_name, Dequantizer, HalfOutput, TYPES as DEQUANTIZE_TYPES,
};
pub use device::{device_count, driver_present, CudaDevice, DeviceOptions, MemoryInfo};
pub use error::{CudaError, Result};
pub use kernels::{DeviceMatrix, Kernels, MatvecOut, MATMUL_Q_MAX_ROWS, MATVEC_MAX_TOKENS};
pub use kv::{GpuCache, KvPages};
pub use memory::DeviceBuffer;
pub use model::{check_shapes, CudaModel, CudaOptions, LoadReport, WeightsMode};
pub use toolkit::{cublas, toolkit, Toolkit};
pub use upload::{upload_weights, DeviceTensor, DeviceWeights, UploadOptions, UploadReport};

/// cudarc, re-exported so that users name the same version's types.
pub use cudarc;
