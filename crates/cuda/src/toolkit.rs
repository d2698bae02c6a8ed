//! Finding NVRTC and the CUDA headers at run time.
//!
//! cudarc opens `libnvrtc` by file name only (so through the dynamic
//! loader's search path) and panics when that fails. Here the library is
//! looked for in the usual toolkit places as well, and, when found there, is
//! loaded by its full path first: the loader then hands that same library to
//! cudarc, because a library already loaded answers to its soname. NVRTC 13
//! also needs the directory of `cuda_fp16.h` passed as an include path.
//!
//! Places searched, in order (each a root with `lib64`/`lib` and `include`):
//! `$WORKER_ORCD_NVRTC/nvidia/cu13` (the PyPI wheels unpacked by
//! `scripts/setup-nvrtc.sh`), `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`,
//! `/usr/local/cuda-13*`, `/opt/cuda`, and this checkout's
//! `target/nvrtc/nvidia/cu13`. If none holds the library, the loader's own
//! search path (`LD_LIBRARY_PATH`, ldconfig) is tried.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{CudaError, Result};

/// File names of NVRTC 13, most specific first.
const NVRTC_NAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so"];
/// The header every kernel needs; its directory is the include path.
const MARKER_HEADER: &str = "cuda_fp16.h";

/// Where NVRTC and the CUDA headers were found.
#[derive(Clone, Debug)]
pub struct Toolkit {
    /// The NVRTC library in use (`None` when the loader found it and its path
    /// could not be read back).
    pub nvrtc_library: Option<PathBuf>,
    /// The directory holding `cuda_fp16.h`, passed to NVRTC as `--include-path`.
    pub include_dir: PathBuf,
    /// NVRTC's own version, e.g. (13, 0).
    pub nvrtc_version: (i32, i32),
}

/// Why [`toolkit`] failed; kept (cloneable) so every caller gets the same answer.
#[derive(Clone, Debug)]
enum Missing {
    Nvrtc { searched: String },
    Headers { searched: String },
    Version(String),
}

impl From<Missing> for CudaError {
    fn from(missing: Missing) -> Self {
        match missing {
            Missing::Nvrtc { searched } => CudaError::NvrtcMissing { searched },
            Missing::Headers { searched } => CudaError::HeadersMissing { searched },
            Missing::Version(message) => CudaError::Nvrtc {
                context: "asking NVRTC for its version".into(),
                message,
            },
        }
    }
}

/// Finds and loads cuBLAS (with cuBLASLt, which it needs) once per process,
/// from the same places as NVRTC, so that cudarc's load by file name finds
/// it; `Err` names the places searched. A toolkit's `lib64` is often not on
/// the loader's path, which is why this looks there first.
pub fn cublas() -> Result<()> {
    static CUBLAS: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CUBLAS
        .get_or_init(|| {
            let roots = roots();
            for root in &roots {
                for dir in lib_dirs(root) {
                    let (lt, blas) = (dir.join("libcublasLt.so.13"), dir.join("libcublas.so.13"));
                    if lt.is_file() && blas.is_file() && keep_loaded(&lt) && keep_loaded(&blas) {
                        return Ok(());
                    }
                }
            }
            // SAFETY: loading cuBLAS runs its initialisers, which is what using it means anyway.
            if unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Ok(());
            }
            Err(roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "))
        })
        .clone()
        .map_err(|searched| CudaError::Invalid {
            what: "cuBLAS (libcublas.so.13)".into(),
            reason: format!(
                "not found; searched the library path and {searched}. Install the CUDA 13 toolkit (set CUDA_HOME)"
            ),
        })
}

/// Finds and loads NVRTC once per process; later calls return the same result.
pub fn toolkit() -> Result<&'static Toolkit> {
    static TOOLKIT: OnceLock<std::result::Result<Toolkit, Missing>> = OnceLock::new();
    TOOLKIT
        .get_or_init(locate)
        .as_ref()
        .map_err(|missing| missing.clone().into())
}

/// The toolkit roots to search, in order.
fn roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(wheels) = std::env::var_os("WORKER_ORCD_NVRTC") {
        roots.push(Path::new(&wheels).join("nvidia/cu13"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = std::env::var_os(var) {
            roots.push(PathBuf::from(dir));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    if let Ok(entries) = std::fs::read_dir("/usr/local") {
        let mut versioned: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("cuda-13"))
            .map(|e| e.path())
            .collect();
        versioned.sort();
        roots.extend(versioned.into_iter().rev());
    }
    roots.push(PathBuf::from("/opt/cuda"));
    // The wheels unpacked into this checkout by scripts/setup-nvrtc.sh.
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nvrtc/nvidia/cu13"));
    roots
}

fn lib_dirs(root: &Path) -> [PathBuf; 3] {
    [
        root.join("lib64"),
        root.join("lib"),
        root.join("targets/x86_64-linux/lib"),
    ]
}

fn include_dirs(root: &Path) -> [PathBuf; 2] {
    [
        root.join("include"),
        root.join("targets/x86_64-linux/include"),
    ]
}

fn locate() -> std::result::Result<Toolkit, Missing> {
    let roots = roots();
    let searched = roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");

    let mut nvrtc_library = None;
    'search: for root in &roots {
        for dir in lib_dirs(root) {
            for name in NVRTC_NAMES {
                let path = dir.join(name);
                if path.is_file() && preload(&path) {
                    nvrtc_library = Some(path.canonicalize().unwrap_or(path));
                    break 'search;
                }
            }
        }
    }
    if nvrtc_library.is_none() {
        // SAFETY: loading NVRTC runs its initialisers, which is what using it means anyway.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Missing::Nvrtc { searched });
        }
        nvrtc_library = loaded_library_path("libnvrtc.so");
    }

    // Headers next to the library first (a toolkit's lib64/../include, the
    // wheel's lib/../include), then every root.
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(lib) = &nvrtc_library {
        if let Some(root) = lib.parent().and_then(Path::parent) {
            candidates.extend(include_dirs(root));
        }
    }
    candidates.extend(roots.iter().flat_map(|r| include_dirs(r)));
    let Some(include_dir) = candidates
        .iter()
        .find(|dir| dir.join(MARKER_HEADER).is_file())
    else {
        let searched = candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Missing::Headers { searched });
    };

    let mut major: c_int = 0;
    let mut minor: c_int = 0;
    // SAFETY: NVRTC is loaded (checked above); both pointers are valid for writes.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Missing::Version(e.to_string()))?;
    let include_dir = include_dir
        .canonicalize()
        .unwrap_or_else(|_| include_dir.clone());
    Ok(Toolkit {
        nvrtc_library,
        include_dir,
        nvrtc_version: (major, minor),
    })
}

/// Loads NVRTC from `path` for the rest of the process, so that cudarc's
/// load by file name finds it; its builtins library beside it first, since
/// NVRTC too opens that by file name. Returns whether NVRTC loaded.
fn preload(path: &Path) -> bool {
    let Some(dir) = path.parent() else {
        return false;
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("libnvrtc-builtins.so") {
                keep_loaded(&entry.path());
            }
        }
    }
    keep_loaded(path)
}

fn keep_loaded(path: &Path) -> bool {
    // SAFETY: NVRTC's initialisers have no preconditions.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            // Never unloaded: cudarc keeps function pointers into it for the
            // life of the process.
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// The file a loaded library whose name starts with `stem` came from, read
/// from `/proc/self/maps` (Linux).
fn loaded_library_path(stem: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(stem))
        })
}
