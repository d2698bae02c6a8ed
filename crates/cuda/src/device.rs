//! One GPU: its context, streams, architecture and memory, and the loading of
//! kernel modules built for it.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::compile::{arch_for, compile, KernelCache, KernelModule};
use crate::error::{CudaError, DriverContext, Result};

/// How to open a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// The GPU's index, as the driver numbers them (`CUDA_VISIBLE_DEVICES` applies).
    pub index: usize,
    /// Where compiled kernels are cached; `None` compiles on every load.
    pub kernel_cache: Option<PathBuf>,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            index: 0,
            kernel_cache: KernelCache::default_dir(),
        }
    }
}

/// Free and total device memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: u64,
    pub total: u64,
}

/// An open GPU.
///
/// Streams are ordered explicitly: cudarc's per-buffer event tracking is
/// off (it would get in the way of CUDA graph capture), so work that crosses
/// streams synchronizes itself, as the weight upload does before returning.
pub struct CudaDevice {
    index: usize,
    name: String,
    compute_capability: (i32, i32),
    arch: String,
    context: Arc<CudaContext>,
    /// Where kernels run.
    stream: Arc<CudaStream>,
    /// Where host-to-device weight copies run, beside the compute stream.
    copy_stream: Arc<CudaStream>,
    cache: Option<KernelCache>,
}

/// Whether the CUDA driver library can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: loading libcuda runs its initialisers, which is what using it means anyway.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The number of GPUs the driver sees; an error without a driver.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    match cudarc::driver::result::init() {
        Ok(()) => {}
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
        Err(e) => return Err(CudaError::NoDevice(format!("cuInit failed: {e}"))),
    }
    let count = CudaContext::device_count().context(|| "counting devices".into())?;
    Ok(usize::try_from(count).unwrap_or(0))
}

impl CudaDevice {
    /// Opens GPU `options.index`: its primary context, a compute stream and a copy stream.
    pub fn open(options: &DeviceOptions) -> Result<Self> {
        let count = device_count()?;
        if count == 0 {
            return Err(CudaError::NoDevice(
                "the driver is loaded but reports 0 GPUs".into(),
            ));
        }
        let index = options.index;
        if index >= count {
            return Err(CudaError::DeviceIndex {
                requested: index,
                count,
            });
        }
        let context =
            CudaContext::new(index).context(|| format!("creating a context on GPU {index}"))?;
        // SAFETY: no CudaSlice exists yet in this context; from here on this
        // crate orders work across streams itself (see the type's doc).
        unsafe { context.disable_event_tracking() };
        let name = context
            .name()
            .context(|| format!("reading the name of GPU {index}"))?;
        let compute_capability = context
            .compute_capability()
            .context(|| format!("reading the compute capability of GPU {index}"))?;
        let stream = context
            .new_stream()
            .context(|| format!("creating the compute stream on GPU {index}"))?;
        let copy_stream = context
            .new_stream()
            .context(|| format!("creating the copy stream on GPU {index}"))?;
        Ok(Self {
            index,
            name,
            arch: arch_for(compute_capability.0, compute_capability.1),
            compute_capability,
            context,
            stream,
            copy_stream,
            cache: options.kernel_cache.clone().map(KernelCache::new),
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// NVRTC's `--gpu-arch` for this device, e.g. `sm_90a`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy_stream
    }

    /// Peak memory bandwidth, bytes a second, from the memory clock and the
    /// bus width (double data rate): 3.35e12 on an H100 SXM, 4.8e12 on an H200.
    pub fn peak_bandwidth(&self) -> Result<f64> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let read = |attribute| {
            self.context
                .attribute(attribute)
                .context(|| format!("reading the memory clock of GPU {}", self.index))
        };
        let clock_khz = read(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? as f64;
        let bus_bits = read(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)? as f64;
        Ok(2.0 * clock_khz * 1e3 * bus_bits / 8.0)
    }

    /// Free and total device memory (`cuMemGetInfo`).
    pub fn memory(&self) -> Result<MemoryInfo> {
        let (free, total) = self
            .context
            .mem_get_info()
            .context(|| format!("reading the memory of GPU {}", self.index))?;
        Ok(MemoryInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    /// Builds `module` for this device (through the cache) and loads it.
    pub fn load_module(&self, module: &KernelModule) -> Result<Arc<CudaModule>> {
        let cubin = match &self.cache {
            Some(cache) => cache.load_or_compile(module, &self.arch)?,
            None => compile(module, &self.arch)?.cubin,
        };
        self.context
            .load_module(Ptx::from_binary(cubin))
            .context(|| {
                format!(
                    "loading kernels/{}.cu ({}) on GPU {}",
                    module.name, self.arch, self.index
                )
            })
    }

    /// Waits for all work on both streams; reports any error a kernel raised.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .context(|| format!("waiting for the compute stream of GPU {}", self.index))?;
        self.copy_stream
            .synchronize()
            .context(|| format!("waiting for the copy stream of GPU {}", self.index))?;
        self.context
            .check_err()
            .context(|| format!("checking for deferred errors on GPU {}", self.index))
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("index", &self.index)
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}
