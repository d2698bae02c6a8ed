//! The traced reference forward pass (`cuda::reference`), which the GPU
//! self-test uses to find where a difference starts, gives the CPU backend's
//! logits: on the real SmolLM2 (llama) and Gemma 3 files and a synthetic
//! tiny Qwen2. Needs no GPU; reads the models scripts/fetch-models.sh fetches.

use std::path::PathBuf;
use std::sync::Arc;

use cuda::selftest::rel_l2;
use engine::convert::FileType;
use engine::cpu::{CpuModel, Logits};
use engine::synth::{synthesize, Preset, SynthOptions};
use engine::weights::ModelWeights;
use gguf::GgufFile;

fn model(name: &str) -> PathBuf {
    let dir = std::env::var_os("WORKER_ORCD_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/worker-orcd/models")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    path
}

fn check(file: GgufFile, what: &str) {
    let file = Arc::new(file);
    let cpu = CpuModel::load(file.clone()).unwrap();
    let spec = cpu.spec().clone();
    let weights = ModelWeights::load(&file, &spec).unwrap();
    let tokens: Vec<u32> = (0..9)
        .map(|i| ((i * 7919 + 13) % spec.vocab_size) as u32)
        .collect();
    let (logits, trace) = cuda::reference::forward_traced(&file, &spec, &weights, &tokens).unwrap();
    let mut cache = cpu.new_cache(64);
    let want = cpu.forward(&mut cache, &tokens, Logits::Last).unwrap();
    let rel = rel_l2(&logits, &want);
    println!(
        "{what}: reference vs CPU backend logits rel-L2 {rel:.2e}, {} trace entries",
        trace.len()
    );
    assert!(
        rel < 1e-4,
        "{what}: reference logits differ from the CPU backend's by {rel:.2e}"
    );
    assert_eq!(trace.len(), 10 + spec.n_layers, "{what}: trace entries");
    let out = &trace.last().unwrap().1;
    assert_eq!(out.len(), tokens.len() * spec.n_embd);
}

#[test]
fn reference_matches_cpu_backend_on_llama_gemma3_and_qwen2() {
    let smollm = GgufFile::open(model("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let tiny_qwen = synthesize(&SynthOptions {
        preset: Preset::by_name("tiny-qwen2").unwrap(),
        file_type: FileType::Q4_K_M,
        seed: 3,
        tokenizer_from: &smollm,
    })
    .unwrap();
    let mut bytes = Vec::new();
    tiny_qwen.write(&mut bytes).unwrap();
    check(GgufFile::from_bytes(bytes).unwrap(), "tiny-qwen2 Q4_K_M");
    check(smollm, "SmolLM2-135M Q4_1");
    check(
        GgufFile::open(model("gemma-3-270m-q4_k_m.gguf")).unwrap(),
        "Gemma 3 270M Q4_K_M",
    );
}
