//! Every tensor of the two real test models, dequantized by this crate, is
//! bit-exact with gguf-py's `gguf.quants.dequantize`.
//!
//! Comparing the f32 values themselves would pipe a gigabyte through Python,
//! so both sides hash them instead: `tests/dequant_hashes.py` prints the
//! sha256 of gguf-py's little-endian f32 output per tensor, and this test
//! computes the same digest from [`quant::dequantize`]. Python runs while
//! Rust hashes. On a mismatch the offending tensor alone is dequantized by
//! gguf-py again to name the first differing value.
//!
//! The models come from `scripts/fetch-models.sh` (`$WORKER_ORCD_MODELS`,
//! default `~/.cache/worker-orcd/models`); a missing model or Python fails
//! the test with the script to run.

#[allow(dead_code)] // this test uses `python` and `dequantize` only
mod gguf_py;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use gguf::{GgufFile, TensorInfo};
use half::f16;
use quant::GgmlType;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dequant_hashes.py");

const SMOLLM: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

fn model_path(file: &str) -> PathBuf {
    let dir = match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/models"),
    };
    let path = dir.join(file);
    assert!(
        path.exists(),
        "test model {} is missing: run scripts/fetch-models.sh (or set WORKER_ORCD_MODELS to the folder holding it)",
        path.display()
    );
    path
}

/// One line of `dequant_hashes.py`: type name, value count and digest.
struct Expected {
    ty: String,
    n_values: u64,
    sha256: String,
}

/// Starts `dequant_hashes.py` on `model`; its output is read by [`reference_hashes`].
fn spawn_reference(model: &Path) -> std::process::Child {
    let python = gguf_py::python();
    assert!(
        python.exists(),
        "no Python at {} for the gguf-py reference: run scripts/setup-python.sh \
         (or set WORKER_ORCD_PYTHON to a Python with gguf==0.19.0 and numpy)",
        python.display()
    );
    Command::new(&python)
        .arg(SCRIPT)
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()))
}

fn reference_hashes(child: std::process::Child) -> HashMap<String, Expected> {
    let output = child
        .wait_with_output()
        .expect("wait for dequant_hashes.py");
    assert!(
        output.status.success(),
        "dequant_hashes.py failed ({}); if gguf or numpy is missing run scripts/setup-python.sh:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("dequant_hashes.py prints ASCII");
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [name, ty, n_values, sha256] = fields[..] else {
                panic!("unexpected line from dequant_hashes.py: {line:?}");
            };
            let expected = Expected {
                ty: ty.to_string(),
                n_values: n_values.parse().expect("value count"),
                sha256: sha256.to_string(),
            };
            (name.to_string(), expected)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dequantize(file: &GgufFile, tensor: &TensorInfo) -> Vec<f32> {
    let mut values = vec![0f32; tensor.n_elements() as usize];
    quant::dequantize(tensor.ty, file.tensor_data(tensor), &mut values)
        .unwrap_or_else(|e| panic!("tensor {}: {e}", tensor.name));
    values
}

/// sha256 of `values` as little-endian f32, as `dequant_hashes.py` hashes them.
fn sha256_le(values: &[f32]) -> String {
    let mut hasher = Sha256::new();
    // bulk hashing in chunks keeps the byte buffer small
    let mut bytes = Vec::with_capacity(4 << 16);
    for chunk in values.chunks(1 << 16) {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        hasher.update(&bytes);
    }
    hex(&hasher.finalize())
}

/// Explains a hash mismatch of `tensor` by comparing values with gguf-py.
fn describe_mismatch(file: &GgufFile, tensor: &TensorInfo, ours: &[f32]) -> String {
    let reference = gguf_py::dequantize(tensor.ty, file.tensor_data(tensor));
    if reference.len() != ours.len() {
        return format!(
            "gguf-py gives {} values, ours {}",
            reference.len(),
            ours.len()
        );
    }
    let differ = ours
        .iter()
        .zip(&reference)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    match ours.iter().zip(&reference).position(|(a, b)| a.to_bits() != b.to_bits()) {
        Some(i) => format!(
            "{differ} of {} values differ; first at value {i} (block {}): ours {} ({:#010x}), gguf-py {} ({:#010x})",
            ours.len(),
            i / tensor.ty.block_size(),
            ours[i],
            ours[i].to_bits(),
            reference[i],
            reference[i].to_bits()
        ),
        None => "the values agree when compared directly: the hashing differs".to_string(),
    }
}

fn check_model_against_gguf_py(file_name: &str) {
    let path = model_path(file_name);
    let start = Instant::now();
    let python = spawn_reference(&path);
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for tensor in file.tensors() {
        assert!(
            quant::can_dequantize(tensor.ty),
            "{file_name}: tensor {} has type {}, which quant cannot dequantize",
            tensor.name,
            tensor.ty
        );
    }
    // Tensors in parallel; `quant::dequantize` also splits large ones.
    let ours: Vec<String> = file
        .tensors()
        .par_iter()
        .map(|tensor| sha256_le(&dequantize(&file, tensor)))
        .collect();
    let rust_time = start.elapsed();
    let expected = reference_hashes(python);
    println!(
        "{file_name}: {} tensors, Rust dequantize+hash {:.1} s, gguf-py done after {:.1} s",
        file.tensors().len(),
        rust_time.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );

    assert_eq!(
        expected.len(),
        file.tensors().len(),
        "{file_name}: gguf-py lists {} tensors, we read {}",
        expected.len(),
        file.tensors().len()
    );
    let mut type_counts: HashMap<GgmlType, usize> = HashMap::new();
    for (tensor, our_hash) in file.tensors().iter().zip(&ours) {
        let reference = expected
            .get(&tensor.name)
            .unwrap_or_else(|| panic!("{file_name}: gguf-py does not list tensor {}", tensor.name));
        assert_eq!(
            reference.ty,
            tensor.ty.name(),
            "{file_name}: type of {}",
            tensor.name
        );
        assert_eq!(
            reference.n_values,
            tensor.n_elements(),
            "{file_name}: size of {}",
            tensor.name
        );
        if *our_hash != reference.sha256 {
            let ours = dequantize(&file, tensor);
            panic!(
                "{file_name}: tensor {} ({}, {}) dequantizes differently from gguf-py: {}",
                tensor.name,
                tensor.ty,
                tensor.shape_string(),
                describe_mismatch(&file, tensor, &ours)
            );
        }
        *type_counts.entry(tensor.ty).or_default() += 1;
    }
    let mut counts: Vec<String> = type_counts
        .iter()
        .map(|(ty, n)| format!("{ty} ×{n}"))
        .collect();
    counts.sort();
    println!("{file_name}: all tensors bit-exact ({})", counts.join(", "));
}

#[test]
fn smollm2_dequantizes_like_gguf_py() {
    check_model_against_gguf_py(SMOLLM);
}

#[test]
fn gemma3_dequantizes_like_gguf_py() {
    check_model_against_gguf_py(GEMMA);
}

/// `dequantize_f16` is the f32 result rounded to nearest-even f16, on one
/// tensor of every type in the file (the largest of each, which for the
/// embedding also covers values near f16's range limits).
fn check_f16_matches_rounded_f32(file_name: &str) {
    let path = model_path(file_name);
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut largest: HashMap<GgmlType, &TensorInfo> = HashMap::new();
    for tensor in file.tensors() {
        let entry = largest.entry(tensor.ty).or_insert(tensor);
        if tensor.n_elements() > entry.n_elements() {
            *entry = tensor;
        }
    }
    let mut checked: Vec<&TensorInfo> = largest.into_values().collect();
    checked.sort_by(|a, b| a.name.cmp(&b.name));
    for tensor in checked {
        let f32_values = dequantize(&file, tensor);
        let mut f16_values = vec![f16::ZERO; f32_values.len()];
        quant::dequantize_f16(tensor.ty, file.tensor_data(tensor), &mut f16_values)
            .unwrap_or_else(|e| panic!("tensor {}: {e}", tensor.name));
        if let Some(i) = f32_values
            .iter()
            .zip(&f16_values)
            .position(|(a, b)| f16::from_f32(*a).to_bits() != b.to_bits())
        {
            panic!(
                "{file_name}: tensor {} ({}): dequantize_f16 value {i} is {} ({:#06x}), the f32 result {} rounds to {:#06x}",
                tensor.name,
                tensor.ty,
                f16_values[i],
                f16_values[i].to_bits(),
                f32_values[i],
                f16::from_f32(f32_values[i]).to_bits()
            );
        }
        println!(
            "{file_name}: {} ({}, {} values): f16 ok",
            tensor.name,
            tensor.ty,
            f32_values.len()
        );
    }
}

#[test]
fn smollm2_dequantize_f16_is_rounded_f32() {
    check_f16_matches_rounded_f32(SMOLLM);
}

#[test]
fn gemma3_dequantize_f16_is_rounded_f32() {
    check_f16_matches_rounded_f32(GEMMA);
}
