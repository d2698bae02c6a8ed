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

/// The CUDA block structs (kernels/common.cuh) lay out every field where
/// the CPU's `#[repr(C)]` structs do. NVRTC has no `offsetof`, so the check
/// is built from what C++17 can evaluate at compile time: the struct's size,
/// each field's size (from Rust's `offset_of!` differences; the fields are
/// byte arrays, so there is no padding), and their order, through a
/// `constexpr` instance initialized in Rust's field order whose fields must
/// each hold their own marker.
#[test]
fn cuda_block_structs_match_the_cpu_layouts() {
    require_nvrtc();
    macro_rules! layout {
        ($cuda:literal, $rust:ty, [$($field:ident),+]) => {{
            let fields: Vec<(&str, usize)> =
                vec![$((stringify!($field), std::mem::offset_of!($rust, $field))),+];
            let size = std::mem::size_of::<$rust>();
            let mut lines = vec![format!(
                "static_assert(sizeof({}) == {}, \"{} size\");",
                $cuda, size, $cuda
            )];
            let markers: Vec<String> = (1..=fields.len()).map(|m| format!("{{{m}}}")).collect();
            lines.push(format!(
                "constexpr {} {}_ordered{{{}}};",
                $cuda,
                $cuda,
                markers.join(", ")
            ));
            for (i, (field, offset)) in fields.iter().enumerate() {
                let end = fields.get(i + 1).map_or(size, |f| f.1);
                // bsums is a 2-D array; every other field a 1-D one.
                let first = if *field == "bsums" { "[0][0]" } else { "[0]" };
                lines.push(format!(
                    "static_assert(sizeof({cuda}::{field}) == {bytes}, \"{cuda}.{field} size\");\n\
                     static_assert({cuda}_ordered.{field}{first} == {marker}, \"{cuda}.{field} is field {marker} (at byte {offset})\");",
                    cuda = $cuda,
                    bytes = end - offset,
                    marker = i + 1,
                ));
            }
            lines
        }};
    }
    let checks = [
        layout!("block_q4_0", quant::BlockQ4_0, [d, qs]),
        layout!("block_q4_1", quant::BlockQ4_1, [d, m, qs]),
        layout!("block_q5_0", quant::BlockQ5_0, [d, qh, qs]),
        layout!("block_q5_1", quant::BlockQ5_1, [d, m, qh, qs]),
        layout!("block_q8_0", quant::BlockQ8_0, [d, qs]),
        layout!("block_q8_1", quant::BlockQ8_1, [d, s, qs]),
        layout!("block_q2_k", quant::BlockQ2K, [scales, qs, d, dmin]),
        layout!("block_q3_k", quant::BlockQ3K, [hmask, qs, scales, d]),
        layout!("block_q4_k", quant::BlockQ4K, [d, dmin, scales, qs]),
        layout!("block_q5_k", quant::BlockQ5K, [d, dmin, scales, qh, qs]),
        layout!("block_q6_k", quant::BlockQ6K, [ql, qh, scales, d]),
        layout!("block_q8_k", quant::BlockQ8K, [d, qs, bsums]),
    ];
    let source = format!(
        "#include \"common.cuh\"\n{}\nextern \"C\" __global__ void layouts_checked() {{}}\n",
        checks.concat().join("\n")
    );
    let module = cuda::KernelModule {
        name: "block_layouts",
        source: Box::leak(source.into_boxed_str()),
        options: &[],
    };
    compile(&module, TEST_ARCHES[0]).unwrap_or_else(|e| panic!("{e}"));
}
