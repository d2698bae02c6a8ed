//! Inputs the load-path fuzzer (crates/engine/fuzz) found to crash, hang or
//! exhaust memory, each run through the same path as the fuzz target: GGUF
//! parse, spec, tokenizer, chat template, CPU model load, one forward step.
//! Errors are expected; a panic, an abort or a hang is a regression.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::cpu::{CpuModel, Logits};
use engine::spec::ModelSpec;
use gguf::GgufFile;
use tokenizer::{ChatTemplate, Message, Tokenizer};

/// The load path; every error is formatted (messages quote file contents).
fn run(bytes: &[u8]) -> Vec<String> {
    let mut errors = Vec::new();
    let file = match GgufFile::from_bytes(bytes.to_vec()) {
        Ok(file) => Arc::new(file),
        Err(e) => return vec![e.to_string()],
    };
    if let Err(e) = ModelSpec::from_gguf(&file) {
        errors.push(e.to_string());
    }
    let mut ids = vec![0];
    match Tokenizer::from_gguf(file.metadata()) {
        Ok(tokenizer) => {
            ids = tokenizer.encode("Hello world! 123 héllo\n", true, false);
            match ChatTemplate::from_gguf(file.metadata()) {
                Ok(template) => {
                    if let Err(e) = template.render(&[Message::new("user", "Hi there!")], true) {
                        errors.push(e.to_string());
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    match CpuModel::load(file) {
        Ok(model) => {
            let tokens: Vec<u32> = ids.into_iter().take(2).collect();
            let mut cache = model.new_cache(model.spec().context_length.min(4096));
            if let Err(e) = model.forward(&mut cache, &tokens, Logits::Last) {
                errors.push(e.to_string());
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    errors
}

#[test]
fn fuzz_regressions_load_without_crashing() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for path in files {
        let start = Instant::now();
        let errors = run(&std::fs::read(&path).unwrap());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name}: {:?}",
            start.elapsed()
        );
        assert!(
            !errors.is_empty(),
            "{name} is a broken model: it must be refused somewhere"
        );
        for e in &errors {
            assert!(
                e.len() < 2000 && !e.chars().any(char::is_control),
                "{name}: {e:?}"
            );
        }
    }
}
