//! Tokenizing a prompt of about 2,000 tokens (English prose, code, numbers,
//! CJK, a chat turn with special tokens) with the two test models'
//! vocabularies, plus building each tokenizer from its metadata.
//!
//! Needs the models (`scripts/fetch-models.sh`; `WORKER_ORCD_MODELS`).
//! Run with `cargo bench -p tokenizer --bench encode` (`-- --quick` for a short run).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokenizer::Tokenizer;

const MODELS: [(&str, &str); 2] = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
];

fn models_dir() -> PathBuf {
    match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/models"),
    }
}

/// A mixed prompt of roughly `repeats * 130` tokens.
fn prompt(repeats: usize) -> String {
    let unit = "<|im_start|>user\nThe quick brown fox jumps over the lazy dog; it's 12:45 and 3.14159 ≈ π.\n\
        fn main() {\n    let xs: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{xs:?}\");\n}\n\
        東京は日本の首都です。 Ünïcödé àccents, emoji 🦙🚀, and    runs of   spaces.\t\tTabs too.<|im_end|>\n";
    unit.repeat(repeats)
}

fn encode(c: &mut Criterion) {
    let text = prompt(16);
    let mut group = c.benchmark_group("encode");
    for (name, file) in MODELS {
        let path = models_dir().join(file);
        let gguf = gguf::GgufFile::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models.sh)", path.display()));
        let tok = Tokenizer::from_gguf(gguf.metadata()).expect("tokenizer");
        let n_tokens = tok.encode(&text, true, true).len();
        eprintln!(
            "{name}: the prompt is {} bytes, {n_tokens} tokens",
            text.len()
        );
        group.throughput(Throughput::Elements(n_tokens as u64));
        group.bench_function(format!("{name}/prompt_{n_tokens}_tokens"), |b| {
            b.iter(|| tok.encode(std::hint::black_box(&text), true, true))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("from_gguf");
    group.sample_size(10);
    for (name, file) in MODELS {
        let gguf = gguf::GgufFile::open(models_dir().join(file))
            .expect("model (run scripts/fetch-models.sh)");
        group.bench_function(name, |b| {
            b.iter(|| Tokenizer::from_gguf(gguf.metadata()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
