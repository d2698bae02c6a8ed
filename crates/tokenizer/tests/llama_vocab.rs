//! llama.cpp's own tokenizer test vectors (`tests/test-tokenizer-0`): for each
//! `ggml-vocab-NAME.gguf`, the texts in `.inp` must tokenize to the ids in
//! `.out` (no BOS/EOS, special tokens not parsed). The files come from the
//! llama-cpp-python sdist via `scripts/fetch-vocab-tests.sh`.

use std::path::PathBuf;

use tokenizer::Tokenizer;

/// Every vocabulary of a supported type that has test vectors.
const VOCABS: &[&str] = &[
    "qwen2",
    "qwen35",
    "llama-bpe",
    "gpt-2",
    "llama-spm",
    "phi-3",
    "starcoder",
    "refact",
    "command-r",
    "mpt",
    "falcon",
    "deepseek-coder",
    "deepseek-llm",
    "gemma-4",
];

fn vocab_dir() -> PathBuf {
    let dir = match std::env::var_os("WORKER_ORCD_VOCAB_TESTS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/vocab-tests"),
    };
    assert!(
        dir.join("ggml-vocab-qwen2.gguf.inp").exists(),
        "llama.cpp's vocab test files are missing from {}: run scripts/fetch-vocab-tests.sh \
         (or set WORKER_ORCD_VOCAB_TESTS to where they are)",
        dir.display()
    );
    dir
}

/// The test cases of one vocabulary, parsed as llama.cpp's `read_tests` does.
fn read_cases(dir: &std::path::Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(i) => {
                texts.push(rest[..i].to_string());
                rest = &rest[i + sep.len()..];
            }
            None => {
                texts.push(rest.to_string());
                rest = "";
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{name}: .inp and .out have different numbers of cases"
    );
    texts.into_iter().zip(ids).collect()
}

#[test]
fn llama_cpp_vocab_test_vectors() {
    let dir = vocab_dir();
    let mut report = Vec::new();
    let mut failed = 0;
    for name in VOCABS {
        let file = gguf::GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let tok = Tokenizer::from_gguf(file.metadata()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases = read_cases(&dir, name);
        let mut bad = 0;
        for (text, expected) in &cases {
            let got = tok.encode(text, false, false);
            if &got != expected {
                bad += 1;
                if bad <= 3 {
                    report.push(format!(
                        "{name}: {text:?}\n  llama.cpp: {expected:?}\n  ours:      {got:?}"
                    ));
                }
            }
        }
        report.push(format!(
            "{name}: {}/{} cases match",
            cases.len() - bad,
            cases.len()
        ));
        failed += bad;
    }
    let report = report.join("\n");
    println!("{report}");
    assert_eq!(failed, 0, "{report}");
}

#[test]
fn unsupported_vocab_types_are_errors() {
    let dir = vocab_dir();
    for name in ["bert-bge", "nomic-bert-moe"] {
        let file = gguf::GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let err = Tokenizer::from_gguf(file.metadata())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported tokenizer model"), "{name}: {err}");
    }
}

/// Vocabularies of a supported type that ship without test vectors still
/// load, and text through them survives a round trip.
#[test]
fn vocabs_without_test_vectors_load() {
    let dir = vocab_dir();
    for name in ["aquila", "gpt-neox", "baichuan"] {
        let file = gguf::GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let tok = Tokenizer::from_gguf(file.metadata()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = "Hello world, 1234 ünïcode 🦙\n\tdone";
        let ids = tok.encode(text, false, false);
        assert!(!ids.is_empty(), "{name}");
        assert_eq!(tok.decode(&ids, false).trim_start(), text, "{name}");
    }
}
