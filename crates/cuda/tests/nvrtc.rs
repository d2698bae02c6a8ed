//! Every kernel module compiles with NVRTC for Ampere (sm_80) and Hopper
//! (sm_90a), on any machine: NVRTC needs no GPU. The NVRTC library and the
//! CUDA headers come from the PyPI wheels that scripts/setup-nvrtc.sh
//! unpacks into target/nvrtc (scripts/test.sh runs it), or from a CUDA 13
//! toolkit ($CUDA_HOME, /usr/local/cuda).

use cuda::{
    all_kernel_names, compile, toolkit, KernelCache, KernelResources, ALL_MODULES, DEQUANTIZE,
    TEST_ARCHES,
};

fn require_nvrtc() -> &'static cuda::Toolkit {
    toolkit().unwrap_or_else(|e| {
        panic!("{e}\nThe kernel tests need NVRTC: run scripts/setup-nvrtc.sh (scripts/test.sh does) or install the CUDA 13 toolkit")
    })
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    let toolkit = require_nvrtc();
    println!(
        "NVRTC {}.{} from {}, headers from {}",
        toolkit.nvrtc_version.0,
        toolkit.nvrtc_version.1,
        toolkit
            .nvrtc_library
            .as_ref()
            .map_or("the loader's search path".into(), |p| p
                .display()
                .to_string()),
        toolkit.include_dir.display()
    );
    for module in ALL_MODULES {
        for arch in TEST_ARCHES {
            let compiled = compile(module, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                compiled.cubin.starts_with(b"\x7fELF"),
                "kernels/{}.cu for {arch}: not an ELF CUBIN",
                module.name
            );
            let resources = compiled.resources();
            assert!(
                !resources.is_empty(),
                "kernels/{}.cu for {arch}: no kernels in the CUBIN",
                module.name
            );
            // ptxas's own report, when NVRTC passes it on, must agree with what the CUBIN says.
            let reported = KernelResources::parse(&compiled.log);
            for kernel in &reported {
                let from_cubin = resources
                    .iter()
                    .find(|k| k.name == kernel.name)
                    .expect("ptxas names a kernel the CUBIN lacks");
                assert_eq!(
                    (from_cubin.registers, from_cubin.stack_bytes),
                    (kernel.registers, kernel.stack_bytes),
                    "{}: registers and stack from the CUBIN vs ptxas",
                    kernel.name
                );
            }
            println!(
                "kernels/{}.cu, {arch}: {} bytes of CUBIN, {} kernels (ptxas report {})",
                module.name,
                compiled.cubin.len(),
                resources.len(),
                if reported.is_empty() {
                    "absent"
                } else {
                    "present"
                }
            );
            for kernel in &resources {
                println!("  {kernel}");
                // No local memory: nothing spilled, no array demoted to the stack.
                assert_eq!(
                    kernel.stack_bytes, 0,
                    "{} uses {} bytes of stack on {arch}",
                    kernel.name, kernel.stack_bytes
                );
            }
        }
    }
}

#[test]
fn dequantize_module_defines_every_launcher_kernel() {
    require_nvrtc();
    let compiled = compile(&DEQUANTIZE, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
    let mut defined: Vec<String> = compiled.resources().into_iter().map(|k| k.name).collect();
    let mut expected = all_kernel_names();
    defined.sort();
    expected.sort();
    assert_eq!(defined, expected);
}

#[test]
fn kernel_cache_compiles_once_per_arch() {
    let toolkit = require_nvrtc();
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path().join("kernels"));
    let first = cache.load_or_compile(&DEQUANTIZE, "sm_80").unwrap();
    let path = dir.path().join("kernels").join(format!(
        "{}.cubin",
        KernelCache::key(&DEQUANTIZE, "sm_80", toolkit)
    ));
    assert_eq!(std::fs::read(&path).unwrap(), first);
    // A second load reads the file: plant a marker to prove it.
    std::fs::write(&path, b"cached").unwrap();
    assert_eq!(
        cache.load_or_compile(&DEQUANTIZE, "sm_80").unwrap(),
        b"cached"
    );
    assert_ne!(
        KernelCache::key(&DEQUANTIZE, "sm_80", toolkit),
        KernelCache::key(&DEQUANTIZE, "sm_90a", toolkit)
    );
}

/// Fills a kernel cache with every module built for Hopper (sm_90a), for a
/// GPU machine that should not spend its time in NVRTC: copy the folder to
/// `~/.cache/worker-orcd/kernels` there (the key covers sources, options,
/// architecture and NVRTC version, so a stale file is never used).
/// `WORKER_ORCD_KERNEL_CACHE_OUT` names the folder.
#[test]
#[ignore = "writes a kernel cache for another machine"]
fn fill_hopper_kernel_cache() {
    require_nvrtc();
    let dir = std::env::var_os("WORKER_ORCD_KERNEL_CACHE_OUT")
        .expect("set WORKER_ORCD_KERNEL_CACHE_OUT to the folder to fill");
    let cache = KernelCache::new(std::path::PathBuf::from(dir));
    for module in ALL_MODULES {
        cache
            .load_or_compile(module, "sm_90a")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    println!(
        "{} modules for sm_90a in {}",
        ALL_MODULES.len(),
        cache.dir().display()
    );
}
