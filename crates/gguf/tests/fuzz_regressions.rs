//! Inputs the fuzzer (`fuzz/`, target `parse`) once crashed, hung or
//! over-allocated on, kept in `tests/fuzz-regressions/`: each must now parse
//! or fail with an error, and a parsed file's tensors must lie inside it.
//!
//! Also holds the generator of the fuzzer's seed files (ignored; see
//! fuzz/README.md).

use std::path::Path;

use gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-regressions");
const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds");

#[test]
fn fuzz_regressions_are_handled() {
    let mut n = 0;
    for entry in std::fs::read_dir(REGRESSIONS).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let start = std::time::Instant::now();
        match GgufFile::from_bytes(bytes) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(f) => {
                for t in f.tensors() {
                    assert_eq!(
                        f.tensor_data(t).len() as u64,
                        t.n_bytes,
                        "{}",
                        path.display()
                    );
                }
                for (key, _) in f.metadata().iter() {
                    let _ = (f.metadata().get_int_array(key), f.metadata().get_f32(key));
                }
            }
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed.as_secs() < 5,
            "{}: took {elapsed:?}",
            path.display()
        );
        n += 1;
    }
    eprintln!("{n} fuzz regression inputs handled");
}

/// Writes the fuzzer's seed corpus: small valid files covering every value
/// type, nested arrays, tensor types and a custom alignment.
/// `cargo test -p gguf --test fuzz_regressions -- --ignored write_fuzz_seeds`
#[test]
#[ignore = "writes fuzz/seeds; run by hand"]
fn write_fuzz_seeds() {
    let seeds = Path::new(SEEDS);
    std::fs::create_dir_all(seeds).unwrap();
    let write = |name: &str, w: &GgufWriter| {
        let mut bytes = Vec::new();
        w.write(&mut bytes).unwrap();
        GgufFile::from_bytes(bytes.clone()).expect("a seed parses");
        std::fs::write(seeds.join(name), &bytes).unwrap();
        bytes
    };

    write("empty.gguf", &GgufWriter::new());

    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set("llama.context_length", Value::U64(4096));
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(vec!["<s>".into(), "Ġa".into(), "é".into()])),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vec![0.0, -1.0, -2.0])),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![3, 1, 1])),
    );
    w.add_tensor(
        "token_embd.weight",
        GgmlType::F16,
        &[4, 3],
        vec![0x3cu8; 24],
    )
    .unwrap();
    w.add_tensor(
        "blk.0.attn_q.weight",
        GgmlType::Q8_0,
        &[32, 2],
        vec![1u8; 68],
    )
    .unwrap();
    let llama = write("llama.gguf", &w);
    // The same file as GGUF v2, whose layout is v3's.
    let mut v2 = llama;
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(seeds.join("llama-v2.gguf"), v2).unwrap();

    let mut w = GgufWriter::new();
    for (key, value) in [
        ("u8", Value::U8(1)),
        ("i8", Value::I8(-1)),
        ("u16", Value::U16(2)),
        ("i16", Value::I16(-2)),
        ("u32", Value::U32(3)),
        ("i32", Value::I32(-3)),
        ("f32", Value::F32(0.5)),
        ("bool", Value::Bool(true)),
        ("str", Value::String("s".into())),
        ("u64", Value::U64(4)),
        ("i64", Value::I64(-4)),
        ("f64", Value::F64(0.25)),
        ("a_bool", Value::Array(Array::Bool(vec![true, false]))),
        ("a_u16", Value::Array(Array::U16(vec![1, 2]))),
        ("a_i64", Value::Array(Array::I64(vec![-1]))),
        ("a_f64", Value::Array(Array::F64(vec![1.0]))),
        ("a_u8", Value::Array(Array::U8(vec![7, 8, 9]))),
        (
            "nested",
            Value::Array(Array::Array(vec![
                Array::Array(vec![Array::U32(vec![1])]),
                Array::String(vec!["x".into()]),
                Array::I8(vec![]),
            ])),
        ),
    ] {
        w.set(key, value);
    }
    w.add_tensor("t.q4_k", GgmlType::Q4_K, &[256], vec![2u8; 144])
        .unwrap();
    w.add_tensor("t.i32", GgmlType::I32, &[1, 1, 1, 2], vec![3u8; 8])
        .unwrap();
    w.add_tensor("t.bf16", GgmlType::BF16, &[3], vec![4u8; 6])
        .unwrap();
    write("values.gguf", &w);

    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(64));
    w.add_tensor("a", GgmlType::I8, &[3], vec![5u8; 3]).unwrap();
    w.add_tensor("b", GgmlType::IQ4_NL, &[32], vec![6u8; 18])
        .unwrap();
    write("aligned.gguf", &w);
}
