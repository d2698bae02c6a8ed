//! How a file becomes a `ModelSpec`: the architecture's row, the tensors
//! present and the metadata; what is refused by name; and the sliding
//! window's mask. (Each architecture's numbers are compared with llama.cpp
//! in vs_llama_cpp.rs.)

use std::path::PathBuf;
use std::sync::Arc;

use engine::convert::FileType;
use engine::cpu::{CpuModel, Logits};
use engine::spec::{Arch, ModelSpec};
use engine::synth::{synthesize, Preset, SynthOptions};
use gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};

fn tokenizer_source() -> GgufFile {
    let dir = match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/models"),
    };
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    GgufFile::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-models.sh", path.display()))
}

/// The preset's Q8_0 file, its metadata changed by `edit` and tensors added by `extra`.
fn preset_file(
    preset: &str,
    edit: impl FnOnce(&mut gguf::Metadata),
    extra: &[(&str, Vec<u64>)],
) -> GgufFile {
    let source = tokenizer_source();
    let base = synthesize(&SynthOptions {
        preset: Preset::by_name(preset).unwrap(),
        file_type: FileType::Q8_0,
        seed: 3,
        tokenizer_from: &source,
    })
    .unwrap();
    let mut bytes = Vec::new();
    base.write(&mut bytes).unwrap();
    let original = GgufFile::from_bytes(bytes).unwrap();
    let mut metadata = original.metadata().clone();
    edit(&mut metadata);
    let mut out = GgufWriter::with_metadata(metadata);
    for t in original.tensors() {
        out.add_tensor(
            t.name.clone(),
            t.ty,
            &t.dims,
            original.tensor_data(t).to_vec(),
        )
        .unwrap();
    }
    for (name, dims) in extra {
        let n: u64 = dims.iter().product();
        out.add_tensor(
            name.to_string(),
            GgmlType::F32,
            dims,
            vec![0u8; 4 * n as usize],
        )
        .unwrap();
    }
    let mut bytes = Vec::new();
    out.write(&mut bytes).unwrap();
    GgufFile::from_bytes(bytes).unwrap()
}

fn spec(preset: &str) -> ModelSpec {
    ModelSpec::from_gguf(&preset_file(preset, |_| {}, &[])).unwrap()
}

fn spec_err(file: &GgufFile) -> String {
    match ModelSpec::from_gguf(file) {
        Ok(_) => panic!("a file with an unimplemented feature was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_architecture_takes_its_features_from_its_row_and_its_tensors() {
    let qwen3 = spec("tiny-qwen3");
    assert_eq!(qwen3.arch, Arch::Qwen3);
    assert!(qwen3.qk_norm && !qwen3.qkv_bias && !qwen3.post_norms && !qwen3.tied_output);
    assert_eq!(qwen3.head_dim, 96);

    let qwen2 = spec("tiny-qwen2");
    assert!(qwen2.qkv_bias && !qwen2.qk_norm && qwen2.tied_output);

    let llama3 = spec("tiny-llama3");
    assert_eq!(llama3.rope_factors.as_deref(), Some("rope_freqs.weight"));

    let gemma2 = spec("tiny-gemma2");
    assert!(gemma2.post_norms && !gemma2.qk_norm);
    // The preset's caps (its attention cap is lowered to bend its scores)...
    assert_eq!(
        (gemma2.attn_softcap, gemma2.final_softcap),
        (Some(2.0), Some(30.0))
    );
    // ...and Gemma 2's own, 50 and 30, where the file gives none (as llama.cpp).
    let uncapped = preset_file(
        "tiny-gemma2",
        |m| {
            m.remove("gemma2.attn_logit_softcapping");
            m.remove("gemma2.final_logit_softcapping");
        },
        &[],
    );
    let defaults = ModelSpec::from_gguf(&uncapped).unwrap();
    assert_eq!(
        (defaults.attn_softcap, defaults.final_softcap),
        (Some(50.0), Some(30.0))
    );
    assert_eq!(gemma2.embedding_scale, Some((256f32).sqrt()));
    // Period 2: layers 0 and 2 slide, 1 and 3 are global.
    let sliding: Vec<bool> = gemma2.layers.iter().map(|l| l.sliding).collect();
    assert_eq!(sliding, [true, false, true, false]);
    assert_eq!(gemma2.window(0), Some(24));
    assert_eq!(gemma2.window(1), None);

    let smollm3 = spec("tiny-smollm3");
    let rotated: Vec<bool> = smollm3.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rotated, [true, true, true, false]);

    let mistral = spec("tiny-mistral");
    assert!(mistral.layers.iter().all(|l| l.sliding));
    assert_eq!(mistral.sliding_window, Some(24));

    // Gemma 3: every sixth layer global, the others on the local base.
    let gemma3 = ModelSpec::from_gguf(&preset_file("gemma3-270m", |_| {}, &[])).unwrap();
    let global: Vec<usize> = (0..gemma3.n_layers)
        .filter(|&i| !gemma3.is_sliding(i))
        .collect();
    assert_eq!(global, [5, 11, 17]);
    assert_eq!(gemma3.rope_theta_for(0), 10_000.0);
    assert_eq!(gemma3.rope_theta_for(5), 1_000_000.0);
}

#[test]
fn phi3_takes_the_long_rope_factors_once_the_context_passes_the_original() {
    let file = preset_file("tiny-phi3", |_| {}, &[]);
    let short = ModelSpec::from_gguf_for_context(&file, Some(128)).unwrap();
    let long = ModelSpec::from_gguf_for_context(&file, Some(129)).unwrap();
    assert_eq!(
        short.rope_factors.as_deref(),
        Some("rope_factors_short.weight")
    );
    assert_eq!(
        long.rope_factors.as_deref(),
        Some("rope_factors_long.weight")
    );
    assert_eq!(short.rope_dims, 48);
    // sqrt(1 + ln(131072 / 128) / ln(128)), as llama.cpp's converter writes it.
    assert!((short.rope_attn_factor - 1.558_387_4).abs() < 1e-5);
    // A window in a phi3 file is ignored, as llama.cpp ignores it.
    let windowed = preset_file(
        "tiny-phi3",
        |m| m.set("phi3.attention.sliding_window", Value::U32(16)),
        &[],
    );
    assert!(ModelSpec::from_gguf(&windowed)
        .unwrap()
        .sliding_window
        .is_none());
}

#[test]
fn the_window_pattern_and_linear_scaling_come_from_the_metadata() {
    let flags = vec![false, true, true, false];
    let file = preset_file(
        "tiny-gemma2",
        |m| {
            m.set(
                "gemma2.attention.sliding_window_pattern",
                Value::Array(Array::Bool(flags.clone())),
            )
        },
        &[],
    );
    let spec = ModelSpec::from_gguf(&file).unwrap();
    assert_eq!(
        spec.layers.iter().map(|l| l.sliding).collect::<Vec<_>>(),
        flags
    );

    let scaled = preset_file(
        "tiny-llama",
        |m| {
            m.set("llama.rope.scaling.type", Value::String("linear".into()));
            m.set("llama.rope.scaling.factor", Value::F32(4.0));
        },
        &[],
    );
    let spec = ModelSpec::from_gguf(&scaled).unwrap();
    assert!(spec.layers.iter().all(|l| l.rope_freq_scale == 0.25));
}

#[test]
fn what_the_engine_does_not_implement_is_refused_by_name() {
    let yarn = preset_file(
        "tiny-qwen3",
        |m| m.set("qwen3.rope.scaling.type", Value::String("yarn".into())),
        &[],
    );
    assert!(spec_err(&yarn).contains("RoPE scaling \"yarn\" is not implemented"));

    let llama3_without_factors = preset_file(
        "tiny-llama",
        |m| m.set("llama.rope.scaling.type", Value::String("llama3".into())),
        &[],
    );
    assert!(spec_err(&llama3_without_factors).contains("no RoPE frequency factors"));

    let moe = preset_file(
        "tiny-qwen3",
        |_| {},
        &[("blk.0.ffn_gate_inp.weight", vec![256, 8])],
    );
    let message = spec_err(&moe);
    assert!(
        message.contains("blk.0.ffn_gate_inp.weight") && message.contains("does not implement"),
        "{message}"
    );

    let experts = preset_file(
        "tiny-llama",
        |m| m.set("llama.expert_count", Value::U32(8)),
        &[],
    );
    assert!(spec_err(&experts).contains("mixture-of-experts"));

    let malformed = preset_file(
        "tiny-gemma2",
        |m| {
            m.set(
                "gemma2.attn_logit_softcapping",
                Value::String("fifty".into()),
            )
        },
        &[],
    );
    assert!(spec_err(&malformed).contains("attn_logit_softcapping"));
}

/// A sliding-window layer sees exactly the window's last positions: the
/// logits of a sequence longer than the window depend on the tokens inside
/// it and on none before it (with every layer sliding, as Mistral's do, the
/// oldest token a position's output can depend on is window × layers back).
#[test]
fn a_sliding_window_hides_what_lies_before_it() {
    let file = Arc::new(preset_file(
        "tiny-mistral",
        |m| m.set("llama.attention.sliding_window", Value::U32(4)),
        &[],
    ));
    let model = CpuModel::load(file).unwrap();
    let spec = model.spec().clone();
    let reach = 3 * (4 - 1); // layers × (window - 1) positions back
    let tail: Vec<u32> = (0..reach as u32 + 1).map(|i| 100 + i).collect();
    let run = |prefix: &[u32]| {
        let tokens: Vec<u32> = prefix.iter().chain(&tail).copied().collect();
        let mut cache = model.new_cache(64);
        model.forward(&mut cache, &tokens, Logits::Last).unwrap()
    };
    let a = run(&[5, 6, 7, 8, 9]);
    let b = run(&[900, 901, 902, 903, 904]);
    assert_eq!(a, b, "tokens outside the window changed the logits");
    // One token less of tail: the changed prefix is now inside the reach.
    let tokens_a: Vec<u32> = [5, 6, 7, 8, 9].iter().chain(&tail[1..]).copied().collect();
    let tokens_b: Vec<u32> = [900, 901, 902, 903, 904]
        .iter()
        .chain(&tail[1..])
        .copied()
        .collect();
    let mut ca = model.new_cache(64);
    let mut cb = model.new_cache(64);
    assert_ne!(
        model.forward(&mut ca, &tokens_a, Logits::Last).unwrap(),
        model.forward(&mut cb, &tokens_b, Logits::Last).unwrap(),
        "the window hid a token inside it"
    );
    assert!(spec.layers.iter().all(|l| l.sliding));
}
