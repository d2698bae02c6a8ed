//! Kernel sources, their NVRTC build into CUBINs, and the on-disk CUBIN cache.
//!
//! Every kernel is CUDA C in `crates/cuda/kernels/`, embedded in the binary.
//! NVRTC compiles a module for one GPU architecture straight to a CUBIN
//! (machine code, no PTX JIT at load), with `ptxas -v` so that the log
//! carries each kernel's registers, stack frame and spills. A CUBIN is
//! cached under a key made of everything that can change it: the sources
//! (headers included), the options, the architecture and NVRTC's version.

use std::ffi::{c_char, CString};
use std::fmt;
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys as nvrtc;
use sha2::{Digest, Sha256};

use crate::cubin::cubin_kernels;
use crate::error::{CudaError, Result};
use crate::toolkit::{toolkit, Toolkit};

/// Headers the kernels include by name (`#include "common.cuh"`), handed to
/// NVRTC from memory.
pub const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("formats.cuh", include_str!("../kernels/formats.cuh")),
    ("warp.cuh", include_str!("../kernels/warp.cuh")),
    ("activation.cuh", include_str!("../kernels/activation.cuh")),
];

/// One `kernels/<name>.cu` file and the NVRTC options it is built with.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    /// Options beyond the ones every module gets ([`compile_options`]).
    pub options: &'static [&'static str],
}

/// Whole-tensor dequantization to f16/bf16. Bit-exact with the CPU, so no
/// FMA contraction and IEEE denormals.
pub const DEQUANTIZE: KernelModule = KernelModule {
    name: "dequantize",
    source: include_str!("../kernels/dequantize.cu"),
    options: &[
        "--fmad=false",
        "--ftz=false",
        "--prec-div=true",
        "--prec-sqrt=true",
    ],
};

/// The forward pass's kernels: ordinary float arithmetic (FMA contraction
/// allowed), precise division, square root and transcendentals (no fast math).
const FORWARD_OPTIONS: &[&str] = &[];

/// Products straight from the GGUF blocks, and embedding rows.
pub const MATVEC: KernelModule = KernelModule {
    name: "matvec",
    source: include_str!("../kernels/matvec.cu"),
    options: FORWARD_OPTIONS,
};

/// RMSNorm of activation rows.
pub const NORM: KernelModule = KernelModule {
    name: "norm",
    source: include_str!("../kernels/norm.cu"),
    options: FORWARD_OPTIONS,
};

/// Gated activations and f32 -> f16.
pub const ELEMENTWISE: KernelModule = KernelModule {
    name: "elementwise",
    source: include_str!("../kernels/elementwise.cu"),
    options: FORWARD_OPTIONS,
};

/// Bias, QK-norm, RoPE and the KV-cache write.
pub const ROPE: KernelModule = KernelModule {
    name: "rope",
    source: include_str!("../kernels/rope.cu"),
    options: FORWARD_OPTIONS,
};

/// Attention over the paged f16 KV cache.
pub const ATTENTION: KernelModule = KernelModule {
    name: "attention",
    source: include_str!("../kernels/attention.cu"),
    options: FORWARD_OPTIONS,
};

/// Argmax over logits rows.
pub const SAMPLE: KernelModule = KernelModule {
    name: "sample",
    source: include_str!("../kernels/sample.cu"),
    options: FORWARD_OPTIONS,
};

/// Every kernel module; the NVRTC test compiles each for every architecture.
pub const ALL_MODULES: &[KernelModule] = &[
    DEQUANTIZE,
    MATVEC,
    NORM,
    ELEMENTWISE,
    ROPE,
    ATTENTION,
    SAMPLE,
];

/// The architectures CI compiles every module for: Ampere and Hopper.
pub const TEST_ARCHES: &[&str] = &["sm_80", "sm_90a"];

/// NVRTC's `--gpu-arch` for a device of compute capability `major.minor`:
/// the architecture-specific variant (`sm_90a`) from Hopper on, so that
/// wgmma and setmaxnreg are available; the CUBIN runs on that exact chip.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major >= 9 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

/// All options for `module` on `arch` (the include path last).
pub fn compile_options(module: &KernelModule, arch: &str, include_dir: &Path) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--generate-line-info".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    options.extend(module.options.iter().map(|o| o.to_string()));
    options.push(format!("--include-path={}", include_dir.display()));
    options
}

/// A compiled module.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log: warnings and ptxas's resource report.
    pub log: String,
}

impl Compiled {
    /// Each kernel's resources, sorted by name: registers and stack frame
    /// from the CUBIN, spills from ptxas's report when NVRTC passed it on.
    pub fn resources(&self) -> Vec<KernelResources> {
        let reported = KernelResources::parse(&self.log);
        let Some(kernels) = cubin_kernels(&self.cubin) else {
            return reported;
        };
        kernels
            .into_iter()
            .map(|kernel| {
                let report = reported.iter().find(|r| r.name == kernel.name);
                KernelResources {
                    registers: kernel.registers,
                    stack_bytes: kernel.frame_bytes,
                    spill_store_bytes: report.and_then(|r| r.spill_store_bytes),
                    spill_load_bytes: report.and_then(|r| r.spill_load_bytes),
                    name: kernel.name,
                }
            })
            .collect()
    }
}

/// Compiles `module` for `arch` with NVRTC (no cache).
pub fn compile(module: &KernelModule, arch: &str) -> Result<Compiled> {
    let toolkit = toolkit()?;
    let options = compile_options(module, arch, &toolkit.include_dir);
    let nvrtc_error = |context: &str| {
        let context = format!("{context} kernels/{}.cu for {arch}", module.name);
        move |e: cudarc::nvrtc::result::NvrtcError| CudaError::Nvrtc {
            context,
            message: e.to_string(),
        }
    };
    let c_string = |what: &str, text: &str| {
        CString::new(text).map_err(|_| CudaError::Invalid {
            what: what.to_string(),
            reason: "contains a NUL byte".into(),
        })
    };

    let source = c_string(module.name, module.source)?;
    let name = c_string(module.name, &format!("{}.cu", module.name))?;
    let header_sources = HEADERS
        .iter()
        .map(|(n, s)| c_string(n, s))
        .collect::<Result<Vec<_>>>()?;
    let header_names = HEADERS
        .iter()
        .map(|(n, _)| c_string(n, n))
        .collect::<Result<Vec<_>>>()?;
    let header_source_ptrs: Vec<*const c_char> =
        header_sources.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let c_options = options
        .iter()
        .map(|o| c_string("NVRTC option", o))
        .collect::<Result<Vec<_>>>()?;
    let option_ptrs: Vec<*const c_char> = c_options.iter().map(|s| s.as_ptr()).collect();

    let mut program = Program(std::ptr::null_mut());
    // SAFETY: every pointer is to a NUL-terminated string that outlives the
    // program (they are dropped after `program`, declared before it); the
    // two header arrays have HEADERS.len() entries each.
    unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut program.0,
            source.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as i32,
            header_source_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(nvrtc_error("creating the program for"))?;

    // SAFETY: `program` is valid; `option_ptrs` holds option_ptrs.len() C strings.
    let compiled = unsafe {
        nvrtc::nvrtcCompileProgram(program.0, option_ptrs.len() as i32, option_ptrs.as_ptr())
    };
    let log = program.log().map_err(nvrtc_error("reading the log of"))?;
    if compiled.result().is_err() {
        return Err(CudaError::Compile {
            module: module.name.to_string(),
            arch: arch.to_string(),
            log,
        });
    }

    let mut size = 0usize;
    // SAFETY: `program` compiled successfully; `size` is valid for writes.
    unsafe { nvrtc::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(nvrtc_error("getting the CUBIN size of"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
    unsafe { nvrtc::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(nvrtc_error("getting the CUBIN of"))?;
    if cubin.is_empty() {
        return Err(CudaError::Nvrtc {
            context: format!("compiling kernels/{}.cu for {arch}", module.name),
            message: "NVRTC produced no CUBIN (is the architecture a real sm_XX one?)".into(),
        });
    }
    Ok(Compiled { cubin, log })
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtc::nvrtcProgram);

impl Program {
    fn log(&self) -> std::result::Result<String, cudarc::nvrtc::result::NvrtcError> {
        let mut size = 0usize;
        // SAFETY: the program is valid; `size` is valid for writes.
        unsafe { nvrtc::nvrtcGetProgramLogSize(self.0, &mut size) }.result()?;
        let mut log = vec![0u8; size.max(1)];
        // SAFETY: `log` has the `size` bytes NVRTC asked for (NUL included).
        unsafe { nvrtc::nvrtcGetProgramLog(self.0, log.as_mut_ptr().cast()) }.result()?;
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        Ok(String::from_utf8_lossy(&log[..end]).into_owned())
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by nvrtcCreateProgram and destroyed only here.
            // A failure to free cannot be acted on in drop.
            let _ = unsafe { nvrtc::nvrtcDestroyProgram(&mut self.0) };
        }
    }
}

/// One kernel's resource use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    /// Per-thread stack frame (local memory, spills included).
    pub stack_bytes: u32,
    /// Known only from ptxas's report.
    pub spill_store_bytes: Option<u32>,
    pub spill_load_bytes: Option<u32>,
}

impl KernelResources {
    /// Reads ptxas's `-v` report:
    /// ```text
    /// ptxas info    : Compiling entry function 'k' for 'sm_90a'
    /// ptxas info    : Function properties for k
    ///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    /// ptxas info    : Used 16 registers, used 0 barriers, 372 bytes cmem[0]
    /// ```
    pub fn parse(log: &str) -> Vec<KernelResources> {
        fn number_before(text: &str, unit: &str) -> Option<u32> {
            let end = text.find(unit)?;
            text[..end].split_whitespace().last()?.parse().ok()
        }
        let mut kernels: Vec<KernelResources> = Vec::new();
        for line in log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                let name = rest.split('\'').next().unwrap_or_default();
                kernels.push(KernelResources {
                    name: name.to_string(),
                    ..Default::default()
                });
            } else if let Some(kernel) = kernels.last_mut() {
                if line.contains("bytes stack frame") {
                    kernel.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                    kernel.spill_store_bytes = number_before(line, "bytes spill stores");
                    kernel.spill_load_bytes = number_before(line, "bytes spill loads");
                } else if line.contains("Used ") && line.contains(" registers") {
                    let used = line.split("Used ").nth(1).unwrap_or_default();
                    kernel.registers = number_before(used, " registers").unwrap_or(0);
                }
            }
        }
        kernels
    }
}

impl fmt::Display for KernelResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = |b: Option<u32>| b.map_or("?".to_string(), |b| b.to_string());
        write!(
            f,
            "{:<28} {:>4} registers {:>5} B stack {:>5} B spill stores {:>5} B spill loads",
            self.name,
            self.registers,
            self.stack_bytes,
            bytes(self.spill_store_bytes),
            bytes(self.spill_load_bytes)
        )
    }
}

/// CUBINs on disk, one file per key.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `~/.cache/worker-orcd/kernels`, or `None` without a home directory.
    pub fn default_dir() -> Option<PathBuf> {
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
        Some(Path::new(&home).join(".cache/worker-orcd/kernels"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sha256 of everything that decides the CUBIN.
    pub fn key(module: &KernelModule, arch: &str, toolkit: &Toolkit) -> String {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        field(module.name.as_bytes());
        field(module.source.as_bytes());
        for (name, source) in HEADERS {
            field(name.as_bytes());
            field(source.as_bytes());
        }
        // The include path is left out: the same headers at another place give the same CUBIN.
        for option in compile_options(module, arch, Path::new("")) {
            field(option.as_bytes());
        }
        field(arch.as_bytes());
        field(
            format!(
                "nvrtc {}.{}",
                toolkit.nvrtc_version.0, toolkit.nvrtc_version.1
            )
            .as_bytes(),
        );
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The cached CUBIN of `module` for `arch`, compiled and stored first if absent.
    pub fn load_or_compile(&self, module: &KernelModule, arch: &str) -> Result<Vec<u8>> {
        let toolkit = toolkit()?;
        let path = self
            .dir
            .join(format!("{}.cubin", Self::key(module, arch, toolkit)));
        match std::fs::read(&path) {
            Ok(cubin) if !cubin.is_empty() => return Ok(cubin),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CudaError::Cache { path, source }),
        }
        let compiled = compile(module, arch)?;
        let cache_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CudaError::Cache { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(cache_error(&self.dir))?;
        // Write then rename, so that a concurrent reader never sees half a file.
        let partial = self
            .dir
            .join(format!(".{}.{}.partial", module.name, std::process::id()));
        std::fs::write(&partial, &compiled.cubin).map_err(cache_error(&partial))?;
        std::fs::rename(&partial, &path).map_err(cache_error(&path))?;
        Ok(compiled.cubin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 6), "sm_86");
        assert_eq!(arch_for(8, 0), "sm_80");
    }

    #[test]
    fn parses_ptxas_report() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'dequantize_q4_k_f16' for 'sm_90a'
ptxas info    : Function properties for dequantize_q4_k_f16
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 372 bytes cmem[0]
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Used 7 registers, used 0 barriers, 372 bytes cmem[0]
";
        let kernels = KernelResources::parse(log);
        assert_eq!(
            kernels,
            vec![
                KernelResources {
                    name: "dequantize_q4_k_f16".into(),
                    registers: 30,
                    stack_bytes: 8,
                    spill_store_bytes: Some(4),
                    spill_load_bytes: Some(12),
                },
                KernelResources {
                    name: "other".into(),
                    registers: 7,
                    ..Default::default()
                },
            ]
        );
    }
}
