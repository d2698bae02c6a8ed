//! The reader on malformed and hostile files: every one is an error that
//! names what is wrong, never a panic or an allocation the file can't justify.

use gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value};

fn sample_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set("general.flag", Value::Bool(true));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(vec!["<s>".into(), "a".into(), "é".into()])),
    );
    w.set(
        "nested",
        Value::Array(Array::Array(vec![
            Array::I32(vec![1, -2]),
            Array::F64(vec![0.5]),
        ])),
    );
    w.add_tensor("a", GgmlType::F32, &[4, 2], vec![0u8; 32])
        .unwrap();
    w.add_tensor("b", GgmlType::Q8_0, &[32], vec![1u8; 34])
        .unwrap();
    let mut out = Vec::new();
    w.write(&mut out).unwrap();
    out
}

fn parse_err(bytes: Vec<u8>) -> GgufError {
    GgufFile::from_bytes(bytes).expect_err("malformed file was accepted")
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample_file();
    GgufFile::from_bytes(full.clone()).expect("the intact file parses");
    // The last tensor's data ends before the final padding, so cut only up to there.
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let b = f.tensor("b").unwrap();
    let data_end = (f.data_offset() + b.offset + b.n_bytes) as usize;
    for len in 0..data_end {
        let err = parse_err(full[..len].to_vec());
        let msg = err.to_string();
        assert!(!msg.is_empty());
    }
}

#[test]
fn every_single_byte_corruption_is_handled() {
    // Flipping any byte must yield either a file or an error, never a panic.
    let full = sample_file();
    for i in 0..full.len() {
        for v in [0x00u8, 0xff, 0x80, 0x7f] {
            let mut bytes = full.clone();
            bytes[i] = v;
            if let Ok(f) = GgufFile::from_bytes(bytes) {
                for t in f.tensors() {
                    assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
                }
            }
        }
    }
}

#[test]
fn bad_magic_and_versions() {
    let mut b = sample_file();
    b[0] = b'X';
    assert!(matches!(parse_err(b), GgufError::BadMagic { .. }));

    for (version, needle) in [
        (1u32, "32-bit counts"),
        (7, "version 7"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = sample_file();
        b[4..8].copy_from_slice(&version.to_le_bytes());
        let msg = parse_err(b).to_string();
        assert!(msg.contains(needle), "{msg}");
    }
}

/// Hand-built header: magic, version 3, tensor count, kv count.
fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

#[test]
fn huge_counts_are_rejected_before_allocating() {
    let msg = parse_err(header(u64::MAX, 0)).to_string();
    assert!(
        msg.contains("tensor count") && msg.contains("cannot fit"),
        "{msg}"
    );
    let msg = parse_err(header(0, 1 << 60)).to_string();
    assert!(msg.contains("metadata count"), "{msg}");

    // An array claiming 2^62 strings.
    let mut b = header(0, 1);
    string(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    let msg = parse_err(b).to_string();
    assert!(
        msg.contains("metadata value k") && msg.contains("cannot fit"),
        "{msg}"
    );

    // A string claiming u64::MAX bytes.
    let mut b = header(0, 1);
    b.extend(u64::MAX.to_le_bytes());
    b.extend([0u8; 64]);
    let msg = parse_err(b).to_string();
    assert!(msg.contains("metadata key #0"), "{msg}");
}

#[test]
fn deep_array_nesting_is_rejected() {
    let mut b = header(0, 1);
    string(&mut b, "deep");
    b.extend(9u32.to_le_bytes());
    for _ in 0..64 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    let msg = parse_err(b).to_string();
    assert!(msg.contains("nested deeper"), "{msg}");
}

#[test]
fn invalid_values_name_the_key() {
    let mut b = header(0, 1);
    string(&mut b, "flag");
    b.extend(7u32.to_le_bytes());
    b.push(2);
    let msg = parse_err(b).to_string();
    assert!(msg.contains("flag") && msg.contains("bool"), "{msg}");

    let mut b = header(0, 1);
    string(&mut b, "t");
    b.extend(13u32.to_le_bytes());
    let msg = parse_err(b).to_string();
    assert!(msg.contains("unknown value type 13"), "{msg}");

    let mut b = header(0, 1);
    string(&mut b, "s");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "");
    let n = b.len();
    b[n - 8..].copy_from_slice(&2u64.to_le_bytes());
    b.extend([0xff, 0xfe]);
    let msg = parse_err(b).to_string();
    assert!(msg.contains("UTF-8"), "{msg}");

    let mut b = header(0, 2);
    for _ in 0..2 {
        string(&mut b, "dup");
        b.extend(4u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
    }
    assert!(parse_err(b).to_string().contains("duplicate key"));

    let mut b = header(0, 1);
    string(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(24u32.to_le_bytes());
    assert!(parse_err(b).to_string().contains("power of two"));

    // The error gives the value's own offset and the value as a number.
    let mut b = header(0, 1);
    string(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    let value_at = b.len();
    b.extend(3u32.to_le_bytes());
    let msg = parse_err(b).to_string();
    assert_eq!(
        msg,
        format!("metadata value general.alignment at offset {value_at}: is 3; it must be a power of two up to 2^30")
    );
}

#[test]
fn overlapping_tensors_are_refused() {
    // Two index entries whose data share bytes: b starts inside a.
    let mut b = header(2, 0);
    for (name, offset) in [("a", 0u64), ("b", 32)] {
        string(&mut b, name);
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes()); // 32 f32 values = 128 bytes
        b.extend(0u32.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(32) + 160, 0);
    let msg = parse_err(b).to_string();
    assert!(
        msg.contains("tensor b") && msg.contains("overlaps tensor a's data [0, 128)"),
        "{msg}"
    );
}

#[test]
fn file_strings_in_errors_are_escaped_and_bounded() {
    // A 300 kB key of NUL and escape bytes, then a duplicate of it.
    let key: String = "\0\x1b[2J".repeat(100_000);
    let mut b = header(0, 2);
    for _ in 0..2 {
        string(&mut b, &key);
        b.extend(4u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
    }
    let msg = parse_err(b).to_string();
    assert!(msg.len() < 1000, "{} bytes", msg.len());
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    assert!(msg.contains("…") && msg.contains("duplicate key"), "{msg}");
}

/// A file with one tensor-index entry and `data_len` bytes of data.
fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut b = header(1, 0);
    string(&mut b, "w");
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(type_id.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + data_len, 0);
    b
}

#[test]
fn tensor_index_is_validated() {
    assert!(GgufFile::from_bytes(one_tensor(&[32, 2], 8, 0, 68)).is_ok());

    let cases: [(&[u64], u32, u64, usize, &str); 8] = [
        (&[32, 2], 99, 0, 68, "unknown ggml type id 99"),
        (&[32, 2], 8, 0, 67, "past the end"),
        (&[32, 2], 8, 64, 68, "past the end"),
        (&[32, 2], 8, 3, 68, "not a multiple of the alignment"),
        (&[33, 2], 8, 0, 68, "block size"),
        (&[1 << 40, 1 << 40], 0, 0, 0, "overflow"),
        (&[0, 2], 0, 0, 0, "zero"),
        (&[1, 1, 1, 1, 1], 0, 0, 4, "dimensions"),
    ];
    for (dims, ty, offset, len, needle) in cases {
        let msg = parse_err(one_tensor(dims, ty, offset, len)).to_string();
        assert!(
            msg.contains("tensor w") && msg.contains(needle),
            "{dims:?}: {msg}"
        );
    }
    // Offsets near u64::MAX must not wrap around.
    let msg = parse_err(one_tensor(&[1], 0, u64::MAX - 31, 4)).to_string();
    assert!(msg.contains("tensor w"), "{msg}");
}

#[test]
fn empty_and_tiny_files() {
    assert!(matches!(parse_err(vec![]), GgufError::Truncated { .. }));
    assert!(matches!(
        parse_err(b"GGU".to_vec()),
        GgufError::Truncated { .. }
    ));
    let f = GgufFile::from_bytes(header(0, 0)).expect("a file with nothing in it is valid");
    assert!(f.tensors().is_empty());
}

#[test]
fn many_keys_parse_in_linear_time() {
    // Duplicate keys are an error, and checking for them must not compare
    // every key with every other: 300k keys took minutes when it did.
    let n = 300_000u64;
    let mut b = header(0, n);
    for i in 0..n {
        string(&mut b, &format!("k{i}"));
        b.extend(0u32.to_le_bytes());
        b.push(1);
    }
    let start = std::time::Instant::now();
    let f = GgufFile::from_bytes(b).unwrap();
    assert_eq!(f.metadata().len(), n as usize);
    let elapsed = start.elapsed();
    assert!(elapsed.as_secs() < 10, "parsing {n} keys took {elapsed:?}");

    let mut b = header(0, 3);
    for key in ["a", "b", "a"] {
        string(&mut b, key);
        b.extend(0u32.to_le_bytes());
        b.push(1);
    }
    let msg = parse_err(b).to_string();
    assert!(
        msg.contains("metadata key a") && msg.contains("duplicate"),
        "{msg}"
    );
}
