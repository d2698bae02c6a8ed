//! Writer → reader round trips of every value type and tensor layout.

use gguf::{Array, GgmlType, GgufFile, GgufWriter, Metadata, Value};

fn all_values() -> Metadata {
    let mut m = Metadata::new();
    m.set("u8", Value::U8(200));
    m.set("i8", Value::I8(-100));
    m.set("u16", Value::U16(60000));
    m.set("i16", Value::I16(-30000));
    m.set("u32", Value::U32(4_000_000_000));
    m.set("i32", Value::I32(-2_000_000_000));
    m.set("f32", Value::F32(1.5e-5));
    m.set("bool", Value::Bool(true));
    m.set("string", Value::String("héllo\n{{ x }}".into()));
    m.set("u64", Value::U64(u64::MAX));
    m.set("i64", Value::I64(i64::MIN));
    m.set("f64", Value::F64(-2.25));
    m.set("a_u8", Value::Array(Array::U8(vec![1, 2, 3])));
    m.set("a_i8", Value::Array(Array::I8(vec![-1, 2])));
    m.set("a_u16", Value::Array(Array::U16(vec![7])));
    m.set("a_i16", Value::Array(Array::I16(vec![-7])));
    m.set("a_u32", Value::Array(Array::U32(vec![1, 2])));
    m.set("a_i32", Value::Array(Array::I32(vec![-1, 0, 1])));
    m.set("a_f32", Value::Array(Array::F32(vec![0.25, -8.0])));
    m.set("a_bool", Value::Array(Array::Bool(vec![true, false])));
    m.set(
        "a_str",
        Value::Array(Array::String(vec!["".into(), "Ġthe".into()])),
    );
    m.set("a_u64", Value::Array(Array::U64(vec![u64::MAX])));
    m.set("a_i64", Value::Array(Array::I64(vec![i64::MIN])));
    m.set("a_f64", Value::Array(Array::F64(vec![1e300])));
    m.set("a_empty", Value::Array(Array::F32(vec![])));
    m.set(
        "a_nested",
        Value::Array(Array::Array(vec![
            Array::String(vec!["x".into()]),
            Array::Array(vec![Array::U8(vec![9])]),
        ])),
    );
    m
}

#[test]
fn metadata_and_tensors_round_trip() {
    let mut w = GgufWriter::with_metadata(all_values());
    let f32_data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.add_tensor("f32", GgmlType::F32, &[3, 2], f32_data.clone())
        .unwrap();
    let q4k: Vec<u8> = (0..144 * 2).map(|i| i as u8).collect();
    w.add_tensor("q4k", GgmlType::Q4_K, &[256, 2], q4k.clone())
        .unwrap();
    w.add_tensor("odd", GgmlType::I8, &[5], vec![1, 2, 3, 4, 5])
        .unwrap();
    let mut bytes = Vec::new();
    w.write(&mut bytes).unwrap();

    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata(), &all_values());
    assert_eq!(f.tensors().len(), 3);
    let t = f.tensor("q4k").unwrap();
    assert_eq!(
        (t.ty, t.dims.clone(), t.n_bytes),
        (GgmlType::Q4_K, vec![256, 2], 288)
    );
    assert_eq!(f.tensor_data(t), &q4k[..]);
    assert_eq!(f.tensor_bytes("f32").unwrap(), &f32_data[..]);
    assert_eq!(f.tensor_bytes("odd").unwrap(), &[1, 2, 3, 4, 5]);
    for t in f.tensors() {
        assert_eq!(
            (f.data_offset() + t.offset) % 32,
            0,
            "{} is aligned",
            t.name
        );
    }
    assert!(f
        .tensor_bytes("missing")
        .unwrap_err()
        .to_string()
        .contains("missing"));
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(256));
    w.add_tensor("a", GgmlType::F16, &[3], vec![0u8; 6])
        .unwrap();
    w.add_tensor("b", GgmlType::F16, &[3], vec![1u8; 6])
        .unwrap();
    let mut bytes = Vec::new();
    w.write(&mut bytes).unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.alignment(), 256);
    assert_eq!(f.data_offset() % 256, 0);
    assert_eq!(f.tensor("b").unwrap().offset, 256);
    assert_eq!(f.tensor_bytes("b").unwrap(), &[1u8; 6]);

    // What the reader refuses, the writer refuses too (a copied hostile
    // file would otherwise pad every tensor to a terabyte).
    for alignment in [1u64 << 40, 3] {
        let mut w = GgufWriter::new();
        w.set("general.alignment", Value::U64(alignment));
        w.add_tensor("a", GgmlType::F16, &[3], vec![0u8; 6])
            .unwrap();
        let e = w.write(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("up to 2^30"), "{e}");
    }
}

#[test]
fn writer_rejects_inconsistent_tensors() {
    let mut w = GgufWriter::new();
    let e = w
        .add_tensor("x", GgmlType::Q4_0, &[32, 2], vec![0u8; 35])
        .unwrap_err();
    assert!(e.to_string().contains("needs 36 bytes, got 35"), "{e}");
    let e = w
        .add_tensor("x", GgmlType::Q4_0, &[31], vec![0u8; 18])
        .unwrap_err();
    assert!(e.to_string().contains("whole number"), "{e}");
    w.add_tensor("x", GgmlType::F32, &[1], vec![0u8; 4])
        .unwrap();
    let e = w
        .add_tensor("x", GgmlType::F32, &[1], vec![0u8; 4])
        .unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn typed_getters_coerce_integers_and_name_keys() {
    let m = all_values();
    assert_eq!(m.get_u64("u8").unwrap(), 200);
    assert_eq!(m.get_u32("u16").unwrap(), 60000);
    assert!(m.get_u32("i8").is_err(), "negative is not a u32");
    assert_eq!(m.get_f32("f64").unwrap(), -2.25);
    assert_eq!(m.get_string_array("a_str").unwrap()[1], "Ġthe");
    assert_eq!(m.get_int_array("a_i32").unwrap(), vec![-1, 0, 1]);
    let e = m.get_str("u8").unwrap_err().to_string();
    assert_eq!(e, "metadata key u8: expected string, found u8");
    let e = m.get_str("nope").unwrap_err().to_string();
    assert_eq!(e, "metadata key nope is missing");
}

#[test]
fn open_maps_a_file_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("qwen2".into()));
    w.set("qwen2.block_count", Value::U32(24));
    w.add_tensor("t", GgmlType::F32, &[2], vec![0u8; 8])
        .unwrap();
    w.write_to_path(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.metadata().arch_u32("block_count").unwrap(), 24);
    assert_eq!(f.path(), Some(path.as_path()));

    let e = GgufFile::open(dir.path().join("absent.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.gguf"), "{e}");
    std::fs::write(dir.path().join("empty.gguf"), b"").unwrap();
    assert!(GgufFile::open(dir.path().join("empty.gguf")).is_err());
}
