//! `plan_types` chooses the same ggml type for every tensor as llama.cpp.
//!
//! `tests/fixtures/llama_mix_PRESET.json` (made by `scripts/ref/mix_ref.py`:
//! llama.cpp's `llama_model_quantize` through llama-cpp-python 0.3.36 on an
//! all-F32 `worker-orcd synth` model of the preset, or for `tiny-phi3` a
//! fused-QKV model written by the script) lists every tensor with its dims
//! and the type llama.cpp gave it under each file type. The real
//! Gemma 3 file from `scripts/fetch-models.sh`, a Q4_K_M made by llama.cpp,
//! is a second witness.

use std::path::PathBuf;

use engine::convert::{plan_types, FileType, TensorDesc};
use engine::synth::Preset;
use gguf::{GgmlType, GgufFile};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// One fixture: the source tensors and llama.cpp's type for each under each mix.
struct LlamaMixes {
    preset: String,
    mixes: Vec<String>,
    /// (name, dims, one type per entry of `mixes`)
    tensors: Vec<(String, Vec<u64>, Vec<GgmlType>)>,
}

fn load(preset: &str) -> LlamaMixes {
    let path = format!("{FIXTURES}/llama_mix_{preset}.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    };
    let mixes = strings(&json["mixes"]);
    let tensors = json["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|row| {
            let name = row[0].as_str().expect("name").to_string();
            let dims = row[1]
                .as_array()
                .expect("dims")
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .collect();
            let types = strings(&row[2])
                .iter()
                .map(|t| {
                    GgmlType::from_name(t).unwrap_or_else(|| panic!("{path}: unknown type {t}"))
                })
                .collect::<Vec<_>>();
            assert_eq!(types.len(), mixes.len(), "{path}: {name}");
            (name, dims, types)
        })
        .collect();
    LlamaMixes {
        preset: json["preset"].as_str().expect("preset").to_string(),
        mixes,
        tensors,
    }
}

/// Differences between `plan_types` and llama.cpp for every mix of a fixture,
/// as lines naming tensor, mix and both types.
fn differences(fixture: &LlamaMixes) -> Vec<String> {
    let descs: Vec<TensorDesc> = fixture
        .tensors
        .iter()
        .map(|(name, dims, _)| TensorDesc {
            name,
            dims,
            ty: GgmlType::F32,
        })
        .collect();
    let mut out = Vec::new();
    for (m, mix) in fixture.mixes.iter().enumerate() {
        let file_type =
            FileType::from_name(mix).unwrap_or_else(|| panic!("unknown file type {mix}"));
        assert_eq!(
            file_type.name(),
            mix,
            "fixture mix names are exact FileType names"
        );
        let planned = plan_types(file_type, &descs);
        for ((name, dims, llama), ours) in fixture.tensors.iter().zip(&planned) {
            if llama[m] != *ours {
                out.push(format!(
                    "{} {mix}: {name} {dims:?}: llama.cpp {}, plan_types {ours}",
                    fixture.preset, llama[m]
                ));
            }
        }
    }
    out
}

/// The fixture describes the preset as it is now (else it must be regenerated).
fn check_fixture_is_preset(fixture: &LlamaMixes) {
    let preset = &fixture.preset;
    let spec = Preset::by_name(preset).unwrap_or_else(|| panic!("no preset {preset}"));
    // tiny presets take the vocabulary of the tokenizer they were made with
    let vocab = spec.vocab_size.unwrap_or_else(|| {
        let embd = fixture
            .tensors
            .iter()
            .find(|t| t.0 == "token_embd.weight")
            .expect("token_embd.weight");
        embd.1[1]
    });
    let mut ours: Vec<(String, Vec<u64>)> = spec.tensor_shapes(vocab);
    let mut theirs: Vec<(String, Vec<u64>)> = fixture
        .tensors
        .iter()
        .map(|(n, d, _)| (n.clone(), d.clone()))
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(
        ours, theirs,
        "{preset}: the fixture's tensors are not the preset's; rerun scripts/ref/mix_ref.py"
    );
}

fn check_mixes(fixture: &LlamaMixes) {
    let diffs = differences(fixture);
    assert!(
        diffs.is_empty(),
        "{} of {} tensor types differ from llama.cpp's:\n{}",
        diffs.len(),
        fixture.tensors.len() * fixture.mixes.len(),
        diffs.join("\n")
    );
    println!(
        "{}: {} tensors × {} mixes ({}) all as llama.cpp",
        fixture.preset,
        fixture.tensors.len(),
        fixture.mixes.len(),
        fixture.mixes.join(", ")
    );
}

fn check_preset(preset: &str) {
    let fixture = load(preset);
    check_fixture_is_preset(&fixture);
    check_mixes(&fixture);
}

#[test]
fn qwen25_05b_mixes_match_llama_cpp() {
    check_preset("qwen2.5-0.5b");
}

#[test]
fn gemma3_270m_mixes_match_llama_cpp() {
    check_preset("gemma3-270m");
}

#[test]
fn smollm2_135m_mixes_match_llama_cpp() {
    check_preset("smollm2-135m");
}

/// The only real-size preset whose rows are all whole K-quant super-blocks
/// (1536 = 6×256), so the `_M`/`_S` bumps show as K-quant types, not as
/// their 32-value fallbacks.
#[test]
fn qwen25_15b_mixes_match_llama_cpp() {
    check_preset("qwen2.5-1.5b");
}

/// Untied embeddings: a separate `output.weight`, 256-wide rows.
#[test]
fn tiny_llama_mixes_match_llama_cpp() {
    check_preset("tiny-llama");
}

#[test]
fn tiny_qwen2_mixes_match_llama_cpp() {
    check_preset("tiny-qwen2");
}

/// A fused `attn_qkv` (phi3; no synth preset, the script writes it with
/// gguf-py): llama.cpp gives it the attn_v rules.
#[test]
fn tiny_phi3_fused_qkv_mixes_match_llama_cpp() {
    check_mixes(&load("tiny-phi3"));
}

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

#[test]
fn real_gemma3_q4_k_m_file_has_planned_types() {
    let path = model_path("gemma-3-270m-q4_k_m.gguf");
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let descs: Vec<TensorDesc> = file
        .tensors()
        .iter()
        .map(|t| TensorDesc {
            name: &t.name,
            dims: &t.dims,
            ty: t.ty,
        })
        .collect();
    let planned = plan_types(FileType::Q4_K_M, &descs);
    let diffs: Vec<String> = file
        .tensors()
        .iter()
        .zip(&planned)
        .filter(|(t, planned)| t.ty != **planned)
        .map(|(t, planned)| {
            format!(
                "{} {}: file {}, plan_types {planned}",
                t.name,
                t.shape_string(),
                t.ty
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} tensors of {} differ from plan_types(Q4_K_M):\n{}",
        diffs.len(),
        planned.len(),
        path.display(),
        diffs.join("\n")
    );
}
