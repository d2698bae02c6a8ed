//! Interop with the Python `gguf` package (gguf-py 0.19.0, the reference
//! reader and writer that llama.cpp's converters use), both ways:
//!
//! - files written by `gguf.GGUFWriter` read back through [`GgufFile`] with the
//!   same keys, values, tensor names, types, shapes and bytes;
//! - files written by [`GgufWriter`] read back by `gguf.GGUFReader` with the
//!   same contents and the same data layout.
//!
//! The Python side is `tests/gguf_interop.py`; it prints a JSON description of
//! what it wrote or read (the format is described at its top) which is
//! compared here with a description built from our own values. The Python
//! environment comes from `scripts/setup-python.sh`; without it these tests
//! fail, they never pass silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gguf::{Array, GgmlType, GgufFile, GgufWriter, Metadata, Value};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gguf_interop.py");

fn python() -> PathBuf {
    let path = match std::env::var_os("WORKER_ORCD_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(WORKSPACE).join("target/pyenv/bin/python"),
    };
    assert!(
        path.exists(),
        "the Python reference interpreter {} does not exist: run scripts/setup-python.sh \
         (or point WORKER_ORCD_PYTHON at a Python with gguf==0.19.0 and numpy)",
        path.display()
    );
    path
}

/// Runs `gguf_interop.py` with `args` and parses the JSON it prints.
fn run_script(args: &[&str]) -> Json {
    let python = python();
    let out = Command::new(&python)
        .arg(SCRIPT)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gguf_interop.py {args:?} failed ({}):\n{stderr}\n\
         (if `gguf` or `numpy` is missing, run scripts/setup-python.sh)",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("the script prints UTF-8");
    json::parse(&stdout)
        .unwrap_or_else(|e| panic!("gguf_interop.py {args:?} printed bad JSON: {e}"))
}

// ---------------------------------------------------------------------------
// Descriptions in the script's JSON format, built from our own types.

fn tagged(ty: &str, field: &str, value: Json) -> Json {
    Json::Obj(BTreeMap::from([
        ("type".to_string(), Json::Str(ty.to_string())),
        (field.to_string(), value),
    ]))
}

fn describe_value(value: &Value) -> Json {
    let ty = value.value_type().name();
    match value {
        Value::U8(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::I8(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::U16(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::I16(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::U32(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::I32(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::U64(x) => tagged(ty, "value", Json::Int((*x).into())),
        Value::I64(x) => tagged(ty, "value", Json::Int((*x).into())),
        // Floats as bit patterns, so that NaN and -0.0 compare exactly.
        Value::F32(x) => tagged(ty, "bits", Json::Int(x.to_bits().into())),
        Value::F64(x) => tagged(ty, "bits", Json::Int(x.to_bits().into())),
        Value::Bool(x) => tagged(ty, "value", Json::Bool(*x)),
        Value::String(s) => tagged(ty, "value", Json::Str(s.clone())),
        Value::Array(a) => describe_array(a),
    }
}

fn describe_array(array: &Array) -> Json {
    fn each<T: Copy>(v: &[T], f: impl Fn(T) -> Value) -> Vec<Json> {
        v.iter().map(|&x| describe_value(&f(x))).collect()
    }
    let items = match array {
        Array::U8(v) => each(v, Value::U8),
        Array::I8(v) => each(v, Value::I8),
        Array::U16(v) => each(v, Value::U16),
        Array::I16(v) => each(v, Value::I16),
        Array::U32(v) => each(v, Value::U32),
        Array::I32(v) => each(v, Value::I32),
        Array::F32(v) => each(v, Value::F32),
        Array::Bool(v) => each(v, Value::Bool),
        Array::U64(v) => each(v, Value::U64),
        Array::I64(v) => each(v, Value::I64),
        Array::F64(v) => each(v, Value::F64),
        Array::String(v) => v
            .iter()
            .map(|s| describe_value(&Value::String(s.clone())))
            .collect(),
        Array::Array(v) => v.iter().map(describe_array).collect(),
    };
    Json::Obj(BTreeMap::from([
        ("type".to_string(), Json::Str("array".to_string())),
        (
            "elem".to_string(),
            Json::Str(array.element_type().name().to_string()),
        ),
        ("items".to_string(), Json::Arr(items)),
    ]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One tensor as both sides describe it; `offset` (from the start of the
/// data section) is `None` where the side that wrote the file does not say.
#[derive(Debug, PartialEq)]
struct TensorDesc {
    name: String,
    ty: String,
    type_id: u32,
    dims: Vec<u64>,
    n_bytes: u64,
    offset: Option<u64>,
    data: String,
}

/// A whole file as both sides describe it.
#[derive(Debug)]
struct FileDesc {
    version: u32,
    alignment: u64,
    data_offset: Option<u64>,
    metadata: Vec<(String, Json)>,
    tensors: Vec<TensorDesc>,
}

impl FileDesc {
    /// From the script's JSON.
    fn from_json(j: &Json) -> FileDesc {
        let metadata = j["metadata"]
            .arr()
            .iter()
            .map(|kv| (kv["key"].str().to_string(), kv["value"].clone()))
            .collect();
        let tensors = j["tensors"]
            .arr()
            .iter()
            .map(|t| TensorDesc {
                name: t["name"].str().to_string(),
                ty: t["type"].str().to_string(),
                type_id: t["type_id"].int() as u32,
                dims: t["dims"].arr().iter().map(|d| d.int() as u64).collect(),
                n_bytes: t["n_bytes"].int() as u64,
                offset: t["offset"].opt_int().map(|o| o as u64),
                data: t["data"].str().to_string(),
            })
            .collect();
        FileDesc {
            version: j["version"].int() as u32,
            alignment: j["alignment"].int() as u64,
            data_offset: j["data_offset"].opt_int().map(|o| o as u64),
            metadata,
            tensors,
        }
    }

    /// From a file our reader parsed.
    fn from_file(f: &GgufFile) -> FileDesc {
        FileDesc {
            version: f.version(),
            alignment: f.alignment(),
            data_offset: Some(f.data_offset()),
            metadata: f
                .metadata()
                .iter()
                .map(|(k, v)| (k.to_string(), describe_value(v)))
                .collect(),
            tensors: f
                .tensors()
                .iter()
                .map(|t| TensorDesc {
                    name: t.name.clone(),
                    ty: t.ty.name().to_string(),
                    type_id: t.ty.id(),
                    dims: t.dims.clone(),
                    n_bytes: t.n_bytes,
                    offset: Some(t.offset),
                    data: hex(f.tensor_data(t)),
                })
                .collect(),
        }
    }

    /// From what we handed our writer (independent of our reader).
    fn from_written(metadata: &Metadata, tensors: &[TestTensor], alignment: u64) -> FileDesc {
        FileDesc {
            version: 3,
            alignment,
            data_offset: None,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), describe_value(v)))
                .collect(),
            tensors: tensors
                .iter()
                .map(|t| TensorDesc {
                    name: t.name.clone(),
                    ty: t.ty.name().to_string(),
                    type_id: t.ty.id(),
                    dims: t.dims.clone(),
                    n_bytes: t.data.len() as u64,
                    offset: None,
                    data: hex(&t.data),
                })
                .collect(),
        }
    }
}

/// Asserts that two descriptions of one file agree; an offset that one side
/// leaves unknown is not compared.
fn assert_same(expected: &FileDesc, actual: &FileDesc, what: &str) {
    assert_eq!(expected.version, actual.version, "{what}: GGUF version");
    assert_eq!(expected.alignment, actual.alignment, "{what}: alignment");
    if let (Some(e), Some(a)) = (expected.data_offset, actual.data_offset) {
        assert_eq!(e, a, "{what}: data section offset");
    }
    let keys = |d: &FileDesc| {
        d.metadata
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(expected),
        keys(actual),
        "{what}: metadata keys in file order"
    );
    for ((key, e), (_, a)) in expected.metadata.iter().zip(&actual.metadata) {
        assert_eq!(e, a, "{what}: metadata value {key}");
    }
    let names = |d: &FileDesc| d.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(expected),
        names(actual),
        "{what}: tensor names in file order"
    );
    for (e, a) in expected.tensors.iter().zip(&actual.tensors) {
        let what = format!("{what}: tensor {}", e.name);
        assert_eq!((&e.ty, e.type_id), (&a.ty, a.type_id), "{what}: type");
        assert_eq!(e.dims, a.dims, "{what}: dimensions (ggml order)");
        assert_eq!(e.n_bytes, a.n_bytes, "{what}: byte size");
        if let (Some(eo), Some(ao)) = (e.offset, a.offset) {
            assert_eq!(eo, ao, "{what}: offset in the data section");
        }
        assert!(
            e.data == a.data,
            "{what}: data differs\n expected {}\n   actual {}",
            e.data,
            a.data
        );
    }
}

// ---------------------------------------------------------------------------
// gguf.GGUFWriter -> GgufFile

fn python_writes_we_read(case: &str) -> GgufFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{case}.gguf"));
    let path_str = path.to_str().unwrap();
    let written = FileDesc::from_json(&run_script(&["write", case, path_str]));
    // GGUFReader's view of the layout, to compare offsets with ours.
    let python_read = FileDesc::from_json(&run_script(&["read", path_str]));

    let f = GgufFile::open(&path)
        .unwrap_or_else(|e| panic!("{case}: our reader rejects gguf-py's file: {e}"));
    let ours = FileDesc::from_file(&f);
    assert_same(
        &written,
        &ours,
        &format!("{case} (what gguf-py wrote vs what we read)"),
    );
    assert_same(
        &python_read,
        &ours,
        &format!("{case} (GGUFReader vs our reader)"),
    );
    for t in f.tensors() {
        assert_eq!(
            (f.data_offset() + t.offset) % f.alignment(),
            0,
            "{case}: tensor {} is aligned",
            t.name
        );
    }
    assert_eq!(
        f.data_offset()
            + f.tensors()
                .iter()
                .map(|t| t.n_bytes.next_multiple_of(f.alignment()))
                .sum::<u64>(),
        f.file_len(),
        "{case}: file ends after the last tensor's padding"
    );
    f
}

#[test]
fn python_written_file_with_every_value_type_reads_back() {
    let f = python_writes_we_read("all_types");
    // A few spot checks through the typed getters, on top of the full comparison.
    let m = f.metadata();
    assert_eq!(m.architecture().unwrap(), "interop");
    assert_eq!(m.get_u64("v.u64").unwrap(), u64::MAX);
    assert_eq!(m.get_i64("v.i64").unwrap(), i64::MIN);
    assert!(m.get_f32("v.f32_nan").unwrap().is_nan());
    assert_eq!(m.get_str("v.string_empty").unwrap(), "");
    let tokens = m.get_string_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(
        (tokens.len(), tokens[3].as_str(), tokens[6].as_str()),
        (1009, "Ġthe", "🦀")
    );
    assert_eq!(m.get_f32_array("tokenizer.ggml.scores").unwrap()[2], -2.0);
    assert_eq!(
        m.get_array("a.nested_i32").unwrap(),
        &Array::Array(vec![
            Array::I32(vec![1, 2]),
            Array::I32(vec![3]),
            Array::I32(vec![-4, 5, 6])
        ])
    );
    let q4k = f.tensor("t.q4_k").unwrap();
    assert_eq!(
        (q4k.ty, q4k.dims.as_slice(), q4k.n_bytes),
        (GgmlType::Q4_K, &[512, 2][..], 4 * 144)
    );
    let f32 = f.tensor("t.f32").unwrap();
    assert_eq!(
        (f32.dims.as_slice(), f32.n_rows()),
        (&[5, 3][..], 3),
        "numpy (3, 5) is ggml 5×3"
    );
}

#[test]
fn python_written_file_with_custom_alignment_reads_back() {
    let f = python_writes_we_read("aligned");
    assert_eq!(f.alignment(), 128);
    let offsets: Vec<u64> = f.tensors().iter().map(|t| t.offset).collect();
    assert_eq!(
        offsets,
        [0, 128, 256, 384],
        "each odd-sized tensor is padded to 128"
    );
}

#[test]
fn python_written_file_without_tensors_reads_back() {
    let f = python_writes_we_read("no_tensors");
    assert!(f.tensors().is_empty());
    assert_eq!(
        f.metadata().get_str("general.name").unwrap(),
        "metadata only"
    );
}

// ---------------------------------------------------------------------------
// GgufWriter -> gguf.GGUFReader

struct TestTensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Vec<u8>,
}

/// Deterministic filler bytes (a 64-bit LCG), different for each seed.
fn filler(seed: u64, n: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

fn test_tensor(name: &str, ty: GgmlType, dims: &[u64]) -> TestTensor {
    let n: u64 = dims.iter().product();
    let n_bytes = ty.row_bytes(n).expect("test shapes are whole blocks") as usize;
    TestTensor {
        name: name.to_string(),
        ty,
        dims: dims.to_vec(),
        data: filler(name.len() as u64 * 31 + n, n_bytes),
    }
}

fn every_value_type() -> Metadata {
    let mut m = Metadata::new();
    m.set("general.architecture", Value::String("interop".into()));
    m.set("v.u8", Value::U8(255));
    m.set("v.i8", Value::I8(i8::MIN));
    m.set("v.u16", Value::U16(u16::MAX));
    m.set("v.i16", Value::I16(i16::MIN));
    m.set("v.u32", Value::U32(u32::MAX));
    m.set("v.i32", Value::I32(i32::MIN));
    m.set("v.f32", Value::F32(1.5e-5));
    m.set("v.f32_nan", Value::F32(f32::from_bits(0x7fc0_0001)));
    m.set("v.f32_neg_zero", Value::F32(-0.0));
    m.set("v.bool", Value::Bool(true));
    m.set(
        "v.string",
        Value::String("héllo\n\t{{ bos_token }} 日本語 🦀 \"q\" \\".into()),
    );
    m.set("v.string_empty", Value::String(String::new()));
    m.set("v.u64", Value::U64(u64::MAX));
    m.set("v.i64", Value::I64(i64::MIN));
    m.set("v.f64", Value::F64(f64::MIN_POSITIVE / 3.0));
    m.set("a.u8", Value::Array(Array::U8(vec![0, 1, 255])));
    m.set("a.i8", Value::Array(Array::I8(vec![i8::MIN, 0, i8::MAX])));
    m.set("a.u16", Value::Array(Array::U16(vec![0, u16::MAX])));
    m.set("a.i16", Value::Array(Array::I16(vec![i16::MIN, i16::MAX])));
    m.set("a.u32", Value::Array(Array::U32(vec![0, u32::MAX])));
    m.set(
        "a.i32",
        Value::Array(Array::I32(vec![i32::MIN, -1, i32::MAX])),
    );
    m.set(
        "a.f32",
        Value::Array(Array::F32(vec![0.25, -8.0, f32::INFINITY, f32::NAN])),
    );
    m.set("a.bool", Value::Array(Array::Bool(vec![true, false, true])));
    m.set("a.u64", Value::Array(Array::U64(vec![0, u64::MAX])));
    m.set("a.i64", Value::Array(Array::I64(vec![i64::MIN, i64::MAX])));
    m.set(
        "a.f64",
        Value::Array(Array::F64(vec![1e300, -0.0, f64::NEG_INFINITY])),
    );
    let mut tokens: Vec<String> = ["<s>", "</s>", "", "Ġthe", "é", "日本", "🦀", "\n"]
        .map(String::from)
        .into();
    tokens.extend((0..1000).map(|i| format!("tok{i}")));
    m.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32((0..tokens.len()).map(|i| -(i as f32)).collect())),
    );
    m.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    m.set("a.empty_f32", Value::Array(Array::F32(vec![])));
    m.set("a.empty_string", Value::Array(Array::String(vec![])));
    m.set(
        "a.nested",
        Value::Array(Array::Array(vec![
            Array::I32(vec![1, 2]),
            Array::String(vec!["x".into(), "yz".into()]),
            Array::F64(vec![]),
            Array::Array(vec![Array::Bool(vec![true]), Array::U64(vec![7, 8])]),
        ])),
    );
    m.set("a.nested_empty", Value::Array(Array::Array(vec![])));
    m
}

/// Writes `metadata` and `tensors` with our writer, has gguf.GGUFReader read
/// the file and compares what it found with what we wrote.
fn we_write_python_reads(what: &str, metadata: Metadata, tensors: &[TestTensor]) {
    let mut w = GgufWriter::with_metadata(metadata.clone());
    for t in tensors {
        w.add_tensor(&t.name, t.ty, &t.dims, t.data.as_slice())
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    w.write_to_path(&path).unwrap();

    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(32);
    let expected = FileDesc::from_written(&metadata, tensors, alignment);
    let python_read = FileDesc::from_json(&run_script(&["read", path.to_str().unwrap()]));
    assert_same(
        &expected,
        &python_read,
        &format!("{what} (what we wrote vs what GGUFReader read)"),
    );
    // And the layout GGUFReader found (data section, tensor offsets) is ours.
    let ours = FileDesc::from_file(&GgufFile::open(&path).unwrap());
    assert_same(
        &ours,
        &python_read,
        &format!("{what} (our reader vs GGUFReader)"),
    );
}

#[test]
fn our_file_with_every_value_type_reads_in_python() {
    let tensors = [
        test_tensor("t.f32", GgmlType::F32, &[5, 3]),
        test_tensor("t.f16", GgmlType::F16, &[7]),
        test_tensor("t.bf16", GgmlType::BF16, &[4, 2]),
        test_tensor("t.f64", GgmlType::F64, &[3, 2, 2]),
        test_tensor("t.i8", GgmlType::I8, &[3, 4]),
        test_tensor("t.i16", GgmlType::I16, &[5]),
        test_tensor("t.i32", GgmlType::I32, &[3, 2]),
        test_tensor("t.i64", GgmlType::I64, &[3, 2, 1, 1]),
        test_tensor("t.q4_0", GgmlType::Q4_0, &[96, 2]),
        test_tensor("t.q8_0", GgmlType::Q8_0, &[32, 3]),
        test_tensor("t.q4_k", GgmlType::Q4_K, &[512, 2]),
        test_tensor("t.q5_k", GgmlType::Q5_K, &[256, 3, 2]),
        test_tensor("t.q6_k", GgmlType::Q6_K, &[256, 1, 1, 2]),
        test_tensor("t.iq4_nl", GgmlType::IQ4_NL, &[64, 2]),
        test_tensor("t.iq2_xxs", GgmlType::IQ2_XXS, &[256]),
        test_tensor("t.tq2_0", GgmlType::TQ2_0, &[256]),
        test_tensor("t.mxfp4", GgmlType::MXFP4, &[64, 4]),
        test_tensor("t.nvfp4", GgmlType::NVFP4, &[128, 2]),
        test_tensor("t.q1_0", GgmlType::Q1_0, &[128]),
    ];
    we_write_python_reads("every value type", every_value_type(), &tensors);
}

#[test]
fn our_file_with_custom_alignment_reads_in_python() {
    let mut m = Metadata::new();
    // GGUFReader only accepts general.alignment as u32, as llama.cpp writes it.
    m.set("general.alignment", Value::U32(64));
    m.set("general.name", Value::String("aligned".into()));
    let tensors = [
        test_tensor("odd.a", GgmlType::I8, &[3]),
        test_tensor("odd.b", GgmlType::F16, &[5]),
        test_tensor("odd.q", GgmlType::Q8_0, &[32]),
        test_tensor("odd.c", GgmlType::F32, &[1, 1]),
    ];
    we_write_python_reads("custom alignment", m, &tensors);
}

#[test]
fn our_empty_file_reads_in_python() {
    we_write_python_reads("no metadata, no tensors", Metadata::new(), &[]);
}

// ---------------------------------------------------------------------------
// A JSON reader for the script's output: enough of RFC 8259 for what
// json.dump prints (integers only, since floats travel as bit patterns).

#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl Json {
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            other => panic!("expected a JSON array, found {other:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a JSON string, found {other:?}"),
        }
    }
    fn int(&self) -> i128 {
        self.opt_int()
            .unwrap_or_else(|| panic!("expected a JSON integer, found {self:?}"))
    }
    fn opt_int(&self) -> Option<i128> {
        match self {
            Json::Int(i) => Some(*i),
            Json::Null => None,
            other => panic!("expected a JSON integer or null, found {other:?}"),
        }
    }
}

impl std::ops::Index<&str> for Json {
    type Output = Json;
    fn index(&self, key: &str) -> &Json {
        match self {
            Json::Obj(m) => m
                .get(key)
                .unwrap_or_else(|| panic!("JSON object has no {key:?}: {self:?}")),
            other => panic!("expected a JSON object with {key:?}, found {other:?}"),
        }
    }
}

mod json {
    use super::Json;
    use std::collections::BTreeMap;

    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        let value = p.value()?;
        p.ws();
        if p.pos != p.s.len() {
            return Err(format!("trailing characters at byte {}", p.pos));
        }
        Ok(value)
    }

    struct Parser<'a> {
        s: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn err<T>(&self, what: &str) -> Result<T, String> {
            Err(format!("{what} at byte {}", self.pos))
        }
        fn ws(&mut self) {
            while self
                .s
                .get(self.pos)
                .is_some_and(|b| b.is_ascii_whitespace())
            {
                self.pos += 1;
            }
        }
        fn eat(&mut self, b: u8) -> bool {
            self.ws();
            let hit = self.s.get(self.pos) == Some(&b);
            self.pos += usize::from(hit);
            hit
        }
        fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
            if self.s[self.pos..].starts_with(word.as_bytes()) {
                self.pos += word.len();
                Ok(value)
            } else {
                self.err("unknown literal")
            }
        }
        fn value(&mut self) -> Result<Json, String> {
            self.ws();
            match self.s.get(self.pos) {
                None => self.err("unexpected end"),
                Some(b'n') => self.literal("null", Json::Null),
                Some(b't') => self.literal("true", Json::Bool(true)),
                Some(b'f') => self.literal("false", Json::Bool(false)),
                Some(b'"') => Ok(Json::Str(self.string()?)),
                Some(b'[') => {
                    self.pos += 1;
                    let mut items = Vec::new();
                    if !self.eat(b']') {
                        loop {
                            items.push(self.value()?);
                            if self.eat(b']') {
                                break;
                            }
                            if !self.eat(b',') {
                                return self.err("expected , or ]");
                            }
                        }
                    }
                    Ok(Json::Arr(items))
                }
                Some(b'{') => {
                    self.pos += 1;
                    let mut map = BTreeMap::new();
                    if !self.eat(b'}') {
                        loop {
                            self.ws();
                            let key = self.string()?;
                            if !self.eat(b':') {
                                return self.err("expected :");
                            }
                            map.insert(key, self.value()?);
                            if self.eat(b'}') {
                                break;
                            }
                            if !self.eat(b',') {
                                return self.err("expected , or }");
                            }
                        }
                    }
                    Ok(Json::Obj(map))
                }
                Some(_) => {
                    let start = self.pos;
                    self.pos += usize::from(self.s[self.pos] == b'-');
                    while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
                        self.pos += 1;
                    }
                    let digits = std::str::from_utf8(&self.s[start..self.pos]).unwrap();
                    match digits.parse::<i128>() {
                        Ok(n) => Ok(Json::Int(n)),
                        Err(_) => self.err("expected an integer"),
                    }
                }
            }
        }
        fn hex4(&mut self) -> Result<u32, String> {
            let digits = self
                .s
                .get(self.pos..self.pos + 4)
                .and_then(|d| std::str::from_utf8(d).ok());
            match digits.and_then(|d| u32::from_str_radix(d, 16).ok()) {
                Some(v) => {
                    self.pos += 4;
                    Ok(v)
                }
                None => self.err("bad \\u escape"),
            }
        }
        fn string(&mut self) -> Result<String, String> {
            if self.s.get(self.pos) != Some(&b'"') {
                return self.err("expected a string");
            }
            self.pos += 1;
            let mut out = Vec::new();
            loop {
                let Some(&b) = self.s.get(self.pos) else {
                    return self.err("unterminated string");
                };
                self.pos += 1;
                match b {
                    b'"' => break,
                    b'\\' => {
                        let Some(&e) = self.s.get(self.pos) else {
                            return self.err("unterminated escape");
                        };
                        self.pos += 1;
                        let c = match e {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let mut code = self.hex4()?;
                                if (0xd800..0xdc00).contains(&code)
                                    && self.s[self.pos..].starts_with(b"\\u")
                                {
                                    self.pos += 2;
                                    let low = self.hex4()?;
                                    if !(0xdc00..0xe000).contains(&low) {
                                        return self.err("bad surrogate pair");
                                    }
                                    code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
                                }
                                match char::from_u32(code) {
                                    Some(c) => c,
                                    None => return self.err("lone surrogate"),
                                }
                            }
                            _ => return self.err("unknown escape"),
                        };
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    _ => out.push(b),
                }
            }
            String::from_utf8(out).or_else(|_| self.err("string is not UTF-8"))
        }
    }

    #[test]
    fn parses_what_python_prints() {
        let j = parse(r#" {"a": [1, -2, 18446744073709551615], "b": "\u00e9\ud83e\udd80\n\"", "c": null, "d": true} "#)
            .unwrap();
        assert_eq!(j["a"].arr()[2], Json::Int(u64::MAX.into()));
        assert_eq!(j["b"].str(), "é🦀\n\"");
        assert_eq!(j["c"], Json::Null);
        assert!(parse("[1,]").is_err());
        assert!(parse("1.5").is_err());
    }
}
