//! This crate's quantizers against llama.cpp's on the same f32 weights.
//!
//! `tests/fixtures/llama_quant_ref.gguf` (made by `scripts/ref/kquant_ref.py`
//! with llama.cpp through llama-cpp-python 0.3.36, `pure` quantization
//! without an importance matrix) holds four 256×128 weight matrices of
//! different value distributions as `src.NAME` (f32) and llama.cpp's blocks
//! of them as `TYPE.NAME` for Q2_K…Q6_K and the 32-value formats. Since
//! dequantization is bit-exact with the reference (tests/reference.rs,
//! tests/real_models.rs), llama.cpp's blocks can be dequantized here and
//! the two quantizers compared on round-trip error and on the bytes.

use gguf::{GgufFile, TensorInfo};
use quant::GgmlType;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/llama_quant_ref.gguf"
);

const TENSORS: [&str; 4] = [
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.1.attn_k.weight",
    "blk.1.attn_v.weight",
];

const K_QUANTS: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

const LEGACY: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Our round-trip error may exceed llama.cpp's by this factor at most.
const RMSE_TOLERANCE: f64 = 1.0001;

fn fixture() -> GgufFile {
    GgufFile::open(FIXTURE)
        .unwrap_or_else(|e| panic!("{FIXTURE}: {e} (regenerate with scripts/ref/kquant_ref.py)"))
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> &'a TensorInfo {
    file.tensor(name)
        .unwrap_or_else(|| panic!("{FIXTURE} has no tensor {name}"))
}

fn source_values(file: &GgufFile, name: &str) -> Vec<f32> {
    let info = tensor(file, &format!("src.{name}"));
    assert_eq!(info.ty, GgmlType::F32, "src.{name}");
    quant::dequantize_to_vec(GgmlType::F32, file.tensor_data(info)).expect("f32 source")
}

fn rmse(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    (sum / a.len() as f64).sqrt()
}

/// One type on one tensor: both quantizers' errors and how many blocks agree.
struct Comparison {
    ty: GgmlType,
    name: &'static str,
    ours_rmse: f64,
    llama_rmse: f64,
    identical_blocks: usize,
    n_blocks: usize,
    first_different_block: Option<usize>,
}

fn compare(file: &GgufFile, ty: GgmlType, name: &'static str) -> Comparison {
    let source = source_values(file, name);
    let info = tensor(file, &format!("{}.{name}", ty.name()));
    assert_eq!(info.ty, ty, "{}.{name}", ty.name());
    let llama_blocks = file.tensor_data(info);
    let ours_blocks =
        quant::quantize(ty, &source).unwrap_or_else(|e| panic!("quantize {name} to {ty}: {e}"));
    assert_eq!(
        ours_blocks.len(),
        llama_blocks.len(),
        "{ty} {name}: block bytes"
    );

    let llama_values =
        quant::dequantize_to_vec(ty, llama_blocks).expect("dequantize llama.cpp's blocks");
    let ours_values = quant::dequantize_to_vec(ty, &ours_blocks).expect("dequantize our blocks");
    let pairs = || {
        ours_blocks
            .chunks_exact(ty.type_size())
            .zip(llama_blocks.chunks_exact(ty.type_size()))
    };
    Comparison {
        ty,
        name,
        ours_rmse: rmse(&source, &ours_values),
        llama_rmse: rmse(&source, &llama_values),
        identical_blocks: pairs().filter(|(a, b)| a == b).count(),
        n_blocks: llama_blocks.len() / ty.type_size(),
        first_different_block: pairs().position(|(a, b)| a != b),
    }
}

fn report(comparisons: &[Comparison]) {
    println!(
        "{:<5} {:<20} {:>12} {:>12} {:>9} {:>10}",
        "type", "tensor", "ours RMSE", "llama RMSE", "ratio", "identical"
    );
    for c in comparisons {
        println!(
            "{:<5} {:<20} {:>12.5e} {:>12.5e} {:>9.6} {:>5}/{:<4}",
            c.ty.name(),
            c.name,
            c.ours_rmse,
            c.llama_rmse,
            if c.llama_rmse > 0.0 {
                c.ours_rmse / c.llama_rmse
            } else {
                1.0
            },
            c.identical_blocks,
            c.n_blocks
        );
    }
}

fn check_types(types: &[GgmlType]) -> Vec<Comparison> {
    let file = fixture();
    let comparisons: Vec<Comparison> = types
        .iter()
        .flat_map(|&ty| TENSORS.iter().map(move |&name| (ty, name)))
        .map(|(ty, name)| compare(&file, ty, name))
        .collect();
    report(&comparisons);
    for c in &comparisons {
        assert!(
            c.ours_rmse <= c.llama_rmse * RMSE_TOLERANCE,
            "{} {}: our round-trip RMSE {:e} is worse than llama.cpp's {:e}",
            c.ty,
            c.name,
            c.ours_rmse,
            c.llama_rmse
        );
    }
    comparisons
}

fn assert_all_blocks_identical(comparisons: &[Comparison]) {
    for c in comparisons {
        if let Some(block) = c.first_different_block {
            panic!(
                "{} {}: {} of {} blocks differ from llama.cpp's; the first is block {block} (values {}..{})",
                c.ty,
                c.name,
                c.n_blocks - c.identical_blocks,
                c.n_blocks,
                block * c.ty.block_size(),
                (block + 1) * c.ty.block_size()
            );
        }
    }
}

#[test]
fn k_quants_match_llama_cpp() {
    let comparisons = check_types(&K_QUANTS);
    assert_all_blocks_identical(&comparisons);
}

#[test]
fn legacy_quants_match_llama_cpp() {
    let comparisons = check_types(&LEGACY);
    assert_all_blocks_identical(&comparisons);
}

#[test]
fn fixture_records_its_source() {
    let file = fixture();
    let version = file
        .metadata()
        .get_str("reference.llama_cpp_python_version")
        .expect("version key");
    assert_eq!(version, "0.3.36");
    for name in TENSORS {
        assert_eq!(
            tensor(&file, &format!("src.{name}")).dims,
            [256, 128],
            "src.{name}"
        );
    }
}
