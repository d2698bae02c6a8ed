//! Parse arbitrary bytes as a GGUF file; when they parse, touch every part of
//! the result the way a loader would. Any panic, out-of-bounds read, hang or
//! allocation the input cannot justify is a bug in the reader.

#![no_main]

use gguf::{Array, GgufFile, Metadata, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = match GgufFile::from_bytes(data.to_vec()) {
        Ok(file) => file,
        Err(e) => {
            // Error messages are built from file contents: format them too.
            std::hint::black_box(e.to_string());
            return;
        }
    };
    let mut checksum = 0u64;
    for t in file.tensors() {
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes, "tensor {}", t.name);
        checksum = bytes
            .iter()
            .fold(checksum, |acc, &b| acc.rotate_left(5) ^ u64::from(b));
        assert_eq!(file.tensor(&t.name), Some(t));
        assert_eq!(file.tensor_bytes(&t.name).unwrap().len(), bytes.len());
        let n = t.n_elements();
        assert_eq!(n, t.row_len() * t.n_rows());
        assert!(t.ty.row_bytes(n).is_some());
        assert_eq!((file.data_offset() + t.offset) % file.alignment(), 0);
        assert!(file.data_offset() + t.offset + t.n_bytes <= file.file_len());
        std::hint::black_box(t.shape_string());
    }
    std::hint::black_box(file.tensor_bytes_total());
    std::hint::black_box(format!("{file:?} {}", file.version()));

    let m = file.metadata();
    for (key, value) in m.iter() {
        checksum ^= touch_value(value);
        touch_getters(m, key);
        // By address: a NaN value is not equal to itself.
        assert!(m.get(key).is_some_and(|found| std::ptr::eq(found, value)));
    }
    for suffix in ["block_count", "context_length", "rope.freq_base"] {
        std::hint::black_box((m.arch_u32(suffix).ok(), m.arch_f32(suffix).ok()));
    }
    std::hint::black_box(checksum);
});

/// Every typed getter on `key`: each either succeeds or names the key.
fn touch_getters(m: &Metadata, key: &str) {
    fn check<T>(key: &str, r: gguf::Result<T>) {
        if let Err(e) = r {
            let msg = e.to_string();
            assert!(msg.contains(key), "error {msg:?} does not name the key");
        }
    }
    check(key, m.get_str(key));
    check(key, m.get_u64(key));
    check(key, m.get_u32(key));
    check(key, m.get_i64(key));
    check(key, m.get_f32(key));
    check(key, m.get_bool(key));
    check(key, m.get_array(key));
    check(key, m.get_string_array(key));
    check(key, m.get_f32_array(key));
    check(key, m.get_int_array(key));
}

fn touch_value(v: &Value) -> u64 {
    std::hint::black_box((v.as_u64(), v.as_i64(), v.as_f64(), v.as_bool(), v.as_str()));
    std::hint::black_box(v.type_description());
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => touch_array(a),
        _ => v.as_u64().unwrap_or(1),
    }
}

fn touch_array(a: &Array) -> u64 {
    std::hint::black_box((a.element_type(), a.is_empty()));
    match a {
        Array::String(v) => v.iter().map(|s| s.len() as u64).sum(),
        Array::Array(v) => v.iter().map(touch_array).fold(0, u64::wrapping_add),
        _ => a.len() as u64,
    }
}
