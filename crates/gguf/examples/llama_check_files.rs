//! Writes, with [`GgufWriter`], the files that `scripts/ref/check_llama_reads.py`
//! has llama.cpp read, each with a JSON description of what was written (the
//! format of `tests/gguf_interop.py`):
//!
//! - `values.gguf`: every metadata value type and one tensor of every
//!   [`GgmlType`], so that llama.cpp's tensor-size table is checked against ours;
//! - `aligned.gguf`: `general.alignment` 64 and odd-sized tensors;
//! - `nested.gguf`: an array of arrays, which gguf-py writes and llama.cpp refuses;
//! - `tiny-llama.gguf` (no description): a two-layer llama with no vocabulary
//!   that llama.cpp can load and run.
//!
//! `cargo run -p gguf --example llama_check_files -- OUT_DIR`

use std::fmt::Write as _;
use std::path::Path;

use gguf::{Array, GgmlType, GgufWriter, Metadata, Value};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, out_dir] = args.as_slice() else {
        eprintln!("usage: llama_check_files OUT_DIR");
        std::process::exit(2);
    };
    let out_dir = Path::new(out_dir);
    std::fs::create_dir_all(out_dir).expect("create the output folder");

    let every_type: Vec<Tensor> = GgmlType::ALL
        .iter()
        .enumerate()
        .map(|(i, &ty)| {
            // Two rows of two blocks: every type has a row of whole blocks.
            let row = 2 * ty.block_size() as u64;
            tensor(
                &format!("t.{}", ty.name().to_lowercase()),
                ty,
                &[row, 2],
                i as u64,
            )
        })
        .collect();
    write_described(out_dir, "values", every_value_type(), &every_type);

    let mut aligned = Metadata::new();
    aligned.set("general.alignment", Value::U32(64));
    let odd = [
        tensor("odd.a", GgmlType::I8, &[3], 1),
        tensor("odd.b", GgmlType::F16, &[5], 2),
        tensor("odd.q", GgmlType::Q8_0, &[32], 3),
    ];
    write_described(out_dir, "aligned", aligned, &odd);

    let mut nested = Metadata::new();
    nested.set(
        "a.nested",
        Value::Array(Array::Array(vec![
            Array::I32(vec![1, 2]),
            Array::I32(vec![3]),
        ])),
    );
    write_described(out_dir, "nested", nested, &[]);

    tiny_llama()
        .write_to_path(out_dir.join("tiny-llama.gguf"))
        .expect("write tiny-llama.gguf");
}

struct Tensor {
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

fn tensor(name: &str, ty: GgmlType, dims: &[u64], seed: u64) -> Tensor {
    let n_bytes = ty.row_bytes(dims.iter().product()).expect("whole blocks") as usize;
    Tensor {
        name: name.to_string(),
        ty,
        dims: dims.to_vec(),
        data: filler(seed, n_bytes),
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
    m.set("v.f32_nan", Value::F32(f32::NAN));
    m.set("v.bool", Value::Bool(true));
    m.set(
        "v.string",
        Value::String("héllo\n{{ bos_token }} 日本語 🦀".into()),
    );
    m.set("v.string_empty", Value::String(String::new()));
    m.set("v.u64", Value::U64(u64::MAX));
    m.set("v.i64", Value::I64(i64::MIN));
    m.set("v.f64", Value::F64(-0.0));
    m.set("a.u8", Value::Array(Array::U8(vec![0, 255])));
    m.set("a.i8", Value::Array(Array::I8(vec![i8::MIN, i8::MAX])));
    m.set("a.u16", Value::Array(Array::U16(vec![0, u16::MAX])));
    m.set("a.i16", Value::Array(Array::I16(vec![i16::MIN, i16::MAX])));
    m.set("a.u32", Value::Array(Array::U32(vec![0, u32::MAX])));
    m.set("a.i32", Value::Array(Array::I32(vec![i32::MIN, i32::MAX])));
    m.set("a.f32", Value::Array(Array::F32(vec![0.25, f32::INFINITY])));
    m.set("a.bool", Value::Array(Array::Bool(vec![true, false])));
    m.set("a.u64", Value::Array(Array::U64(vec![0, u64::MAX])));
    m.set("a.i64", Value::Array(Array::I64(vec![i64::MIN, i64::MAX])));
    m.set(
        "a.f64",
        Value::Array(Array::F64(vec![1e300, f64::NEG_INFINITY])),
    );
    m.set("a.empty_i32", Value::Array(Array::I32(vec![])));
    let mut tokens: Vec<String> = ["<s>", "", "Ġthe", "é", "🦀", "\n"]
        .map(String::from)
        .into();
    tokens.extend((0..500).map(|i| format!("tok{i}")));
    m.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    m
}

fn write_described(out_dir: &Path, name: &str, metadata: Metadata, tensors: &[Tensor]) {
    let mut w = GgufWriter::with_metadata(metadata.clone());
    for t in tensors {
        w.add_tensor(&t.name, t.ty, &t.dims, t.data.as_slice())
            .expect("valid tensor");
    }
    w.write_to_path(out_dir.join(format!("{name}.gguf")))
        .expect("write the file");
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(32);
    std::fs::write(
        out_dir.join(format!("{name}.json")),
        describe(&metadata, tensors, alignment),
    )
    .expect("write the description");
}

// ---------------------------------------------------------------------------
// A two-layer llama with no vocabulary: n_embd 256, 4 heads of 64, 2 KV
// heads, n_ff 512, 64 token ids. Norms are F32 ones, token_embd Q8_0,
// attn_q Q4_K, output Q6_K, the rest F32 in [-0.1, 0.1): small enough that
// every logit is finite.

const N_EMBD: u64 = 256;
const N_HEAD: u64 = 4;
const N_HEAD_KV: u64 = 2;
const HEAD_DIM: u64 = N_EMBD / N_HEAD;
const N_FF: u64 = 512;
const N_VOCAB: u64 = 64;
const N_LAYER: u32 = 2;

/// f16 2^-7, the scale put in every quantized block so that values stay small.
const SMALL_F16: [u8; 2] = 0x2000u16.to_le_bytes();

fn small_f32(seed: u64, n: u64) -> Vec<u8> {
    filler(seed, n as usize * 4)
        .chunks(4)
        .flat_map(|b| {
            ((u32::from_le_bytes(b.try_into().unwrap()) as f32 / u32::MAX as f32 - 0.5) * 0.2)
                .to_le_bytes()
        })
        .collect()
}

/// Random quantized blocks with each block's f16 scale fields (at `scale_at`) set to 2^-7.
fn small_blocks(ty: GgmlType, seed: u64, dims: &[u64], scale_at: &[usize]) -> Vec<u8> {
    let n_bytes = ty.row_bytes(dims.iter().product()).unwrap() as usize;
    let mut data = filler(seed, n_bytes);
    for block in data.chunks_mut(ty.type_size()) {
        for &at in scale_at {
            block[at..at + 2].copy_from_slice(&SMALL_F16);
        }
    }
    data
}

fn tiny_llama() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set(
        "general.name",
        Value::String("worker-orcd tiny llama".into()),
    );
    w.set("llama.context_length", Value::U32(256));
    w.set("llama.embedding_length", Value::U32(N_EMBD as u32));
    w.set("llama.feed_forward_length", Value::U32(N_FF as u32));
    w.set("llama.block_count", Value::U32(N_LAYER));
    w.set("llama.attention.head_count", Value::U32(N_HEAD as u32));
    w.set(
        "llama.attention.head_count_kv",
        Value::U32(N_HEAD_KV as u32),
    );
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.set("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32));
    w.set("llama.vocab_size", Value::U32(N_VOCAB as u32));
    w.set("tokenizer.ggml.model", Value::String("no_vocab".into()));

    let mut seed = 0;
    let mut add = |w: &mut GgufWriter<'static>, name: &str, ty: GgmlType, dims: &[u64]| {
        seed += 1;
        let data = match ty {
            GgmlType::F32 if name.ends_with("norm.weight") => {
                1f32.to_le_bytes().repeat(dims[0] as usize)
            }
            GgmlType::F32 => small_f32(seed, dims.iter().product()),
            GgmlType::Q8_0 => small_blocks(ty, seed, dims, &[0]),
            GgmlType::Q4_K => small_blocks(ty, seed, dims, &[0, 2]),
            GgmlType::Q6_K => small_blocks(ty, seed, dims, &[208]),
            _ => unreachable!("no {ty} in the tiny llama"),
        };
        w.add_tensor(name, ty, dims, data)
            .expect("valid tiny-llama tensor");
    };
    add(
        &mut w,
        "token_embd.weight",
        GgmlType::Q8_0,
        &[N_EMBD, N_VOCAB],
    );
    for layer in 0..N_LAYER {
        let blk = |s: &str| format!("blk.{layer}.{s}.weight");
        add(&mut w, &blk("attn_norm"), GgmlType::F32, &[N_EMBD]);
        add(
            &mut w,
            &blk("attn_q"),
            GgmlType::Q4_K,
            &[N_EMBD, N_HEAD * HEAD_DIM],
        );
        add(
            &mut w,
            &blk("attn_k"),
            GgmlType::F32,
            &[N_EMBD, N_HEAD_KV * HEAD_DIM],
        );
        add(
            &mut w,
            &blk("attn_v"),
            GgmlType::F32,
            &[N_EMBD, N_HEAD_KV * HEAD_DIM],
        );
        add(
            &mut w,
            &blk("attn_output"),
            GgmlType::F32,
            &[N_HEAD * HEAD_DIM, N_EMBD],
        );
        add(&mut w, &blk("ffn_norm"), GgmlType::F32, &[N_EMBD]);
        add(&mut w, &blk("ffn_gate"), GgmlType::F32, &[N_EMBD, N_FF]);
        add(&mut w, &blk("ffn_up"), GgmlType::F32, &[N_EMBD, N_FF]);
        add(&mut w, &blk("ffn_down"), GgmlType::F32, &[N_FF, N_EMBD]);
    }
    add(&mut w, "output_norm.weight", GgmlType::F32, &[N_EMBD]);
    add(&mut w, "output.weight", GgmlType::Q6_K, &[N_EMBD, N_VOCAB]);
    w
}

// ---------------------------------------------------------------------------
// The description, in tests/gguf_interop.py's JSON format.

fn describe(metadata: &Metadata, tensors: &[Tensor], alignment: u64) -> String {
    let mut out = format!(
        "{{\"version\": 3, \"alignment\": {alignment}, \"data_offset\": null, \"metadata\": ["
    );
    for (i, (key, value)) in metadata.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        write!(
            out,
            "{sep}{{\"key\": {}, \"value\": {}}}",
            json_string(key),
            describe_value(value)
        )
        .unwrap();
    }
    out.push_str("], \"tensors\": [");
    for (i, t) in tensors.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let dims: Vec<String> = t.dims.iter().map(u64::to_string).collect();
        let data: String = t.data.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            out,
            "{sep}{{\"name\": {}, \"type\": \"{}\", \"type_id\": {}, \"dims\": [{}], \"n_bytes\": {}, \"offset\": null, \"data\": \"{data}\"}}",
            json_string(&t.name),
            t.ty.name(),
            t.ty.id(),
            dims.join(", "),
            t.data.len()
        )
        .unwrap();
    }
    out.push_str("]}\n");
    out
}

fn describe_value(value: &Value) -> String {
    let ty = value.value_type().name();
    match value {
        Value::F32(x) => format!("{{\"type\": \"{ty}\", \"bits\": {}}}", x.to_bits()),
        Value::F64(x) => format!("{{\"type\": \"{ty}\", \"bits\": {}}}", x.to_bits()),
        Value::Bool(b) => format!("{{\"type\": \"{ty}\", \"value\": {b}}}"),
        Value::String(s) => format!("{{\"type\": \"{ty}\", \"value\": {}}}", json_string(s)),
        Value::Array(a) => describe_array(a),
        v => match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => format!("{{\"type\": \"{ty}\", \"value\": {i}}}"),
            (None, Some(u)) => format!("{{\"type\": \"{ty}\", \"value\": {u}}}"),
            (None, None) => unreachable!("every other value is an integer"),
        },
    }
}

fn describe_array(array: &Array) -> String {
    fn each<T: Copy>(v: &[T], f: impl Fn(T) -> Value) -> Vec<String> {
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
    format!(
        "{{\"type\": \"array\", \"elem\": \"{}\", \"items\": [{}]}}",
        array.element_type().name(),
        items.join(", ")
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => write!(out, "\\u{:04x}", u32::from(c)).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
