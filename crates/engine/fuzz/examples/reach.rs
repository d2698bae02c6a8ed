//! How deep a corpus gets: runs every file of the given folders (or files)
//! through `engine_fuzz::run` and counts the inputs reaching each stage.
//!
//! ```sh
//! cd crates/engine/fuzz && cargo run --release --example reach -- corpus/load seeds
//! ```
//!
//! With `REACH_MUTATE=N` in the environment, each file is replaced by N
//! structural mutations of it (`engine_fuzz::mutate::structured`), to see
//! how deep the mutator's output gets.
//!
//! No sanitizers here: a crashing input stops it (reproduce those with the
//! fuzz target instead).

use std::path::PathBuf;

fn main() {
    engine_fuzz::init_single_thread();
    let mut files: Vec<PathBuf> = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let path = PathBuf::from(arg);
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                files.push(entry.unwrap().path());
            }
        } else {
            files.push(path);
        }
    }
    files.sort();
    let mutants: u32 = std::env::var("REACH_MUTATE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if mutants == 0 {
            inputs.push(data);
        } else {
            for seed in 0..mutants {
                if let Some(m) = engine_fuzz::mutate::structured(&data, 1 << 20, seed * 2) {
                    inputs.push(m);
                }
            }
        }
    }
    println!("{} inputs", inputs.len());
    let mut counts = [0usize; 8];
    let names = [
        "parsed", "spec", "tokenizer", "template", "rendered", "loaded", "forward", "all",
    ];
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    for data in &inputs {
        let r = engine_fuzz::run(data);
        for (i, reached) in [
            r.parsed, r.spec, r.tokenizer, r.template, r.rendered, r.loaded, r.forward, true,
        ]
        .into_iter()
        .enumerate()
        {
            counts[i] += reached as usize;
        }
        for e in r.errors {
            // The stage and the start of the message, to group similar errors.
            let key: String = e.chars().take(60).collect();
            *errors.entry(key).or_default() += 1;
        }
    }
    for (name, n) in names.iter().zip(counts) {
        println!("{name:>10}: {n}");
    }
    let mut errors: Vec<_> = errors.into_iter().collect();
    errors.sort_by(|a, b| b.1.cmp(&a.1));
    println!("most frequent errors:");
    for (e, n) in errors.iter().take(25) {
        println!("{n:>6}  {e}");
    }
}
