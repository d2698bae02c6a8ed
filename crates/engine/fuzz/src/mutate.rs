//! A structure-aware mutation of a GGUF file: parse it, change one thing a
//! model file can say (a metadata value, key or type; a tensor's name, type,
//! shape or bytes), and write it back as a valid GGUF file.
//!
//! Byte-level mutations rarely get past the reader's length-prefixed strings
//! and checked offsets in a useful way (renaming `blk.1` to `blk.4000000000`
//! or growing a chat template means rewriting every offset after it); this
//! lets the fuzzer make such changes in one step. The fuzz target uses it for
//! half of its mutations and libFuzzer's own byte-level ones for the rest.

use gguf::{Array, GgmlType, GgufFile, GgufWriter, Metadata, Value};

/// SplitMix64, seeded by libFuzzer.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x853C_49E6_748F_EA9B)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Integers that sit on boundaries the code checks or sizes things by.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    15,
    16,
    17,
    31,
    32,
    33,
    64,
    127,
    128,
    255,
    256,
    257,
    4096,
    32_768,
    65_535,
    65_536,
    1 << 20,
    1 << 24,
    1 << 31,
    (1 << 31) - 1,
    u32::MAX as u64 - 1,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

const FLOATS: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-30,
    1e-6,
    1e30,
    f32::MAX,
    f32::MIN_POSITIVE,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    10_000.0,
];

/// Strings the loaders compare against.
const NAMES: &[&str] = &[
    "llama", "qwen2", "gemma3", "gemma4", "gpt2", "bert", "", "default", "gpt-2", "llama3",
    "llama-bpe", "qwen2", "qwen35", "smollm", "starcoder", "deepseek-llm", "deepseek-coder",
    "falcon", "command-r", "phi-2", "stablelm2", "phi-3 mini",
];

/// Special-token texts the tokenizer and templates recognise.
const TOKEN_TEXTS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|return|>",
    "<|call|>",
    "<|end|>",
    "<|calls|>",
    "<|flush|>",
    "<|tool_response>",
    "</s>",
    "<s>",
    "<unk>",
    "<0x0A>",
    "<0xZZ>",
    "<0x>",
    "\u{2581}",
    "\u{2581}\u{2581}",
    "\u{0120}",
    "\u{010A}",
    "",
    " ",
    "a b",
    "unused",
    "<|channel|>",
    "<|plamo:eos|>",
];

/// Template fragments (loops, recursion, filters, errors).
const TEMPLATE_SNIPPETS: &[&str] = &[
    "{{ bos_token }}",
    "{{ eos_token }}",
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{{ m.content | trim }}{% endfor %}",
    "{% if add_generation_prompt %}assistant:{% endif %}",
    "{{ raise_exception('x') }}",
    "{{ messages | tojson }}",
    "{{ messages[0]['content'][::-1] }}",
    "{% set ns = namespace(x=0) %}{% for i in range(10) %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}",
    "{% for i in range(1000) %}{{ i }}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(100) }}",
    "{{ 'x' * 1000 }}",
    "{{ messages[0].content.split(' ') }}",
    "{{ (messages | length) / 0 }}",
    "{{ tools }}",
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- endif -%}",
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{% endfor %}",
    "{{ '<|im_start|>' }}",
    "{{ x.y.z }}",
    "{{ 1 // 0 }}",
    "{% include 'other' %}",
    "{% extends 'x' %}",
    "{{",
    "{%",
    "}}",
];

const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::I8,
    GgmlType::I32,
    GgmlType::MXFP4,
];

/// Metadata keys worth adding (with the architecture prefix where `{}`).
const KEYS: &[&str] = &[
    "{}.block_count",
    "{}.context_length",
    "{}.embedding_length",
    "{}.feed_forward_length",
    "{}.attention.head_count",
    "{}.attention.head_count_kv",
    "{}.attention.key_length",
    "{}.attention.value_length",
    "{}.attention.sliding_window",
    "{}.rope.dimension_count",
    "{}.rope.freq_base",
    "{}.attention.layer_norm_rms_epsilon",
    "{}.vocab_size",
    "general.architecture",
    "general.alignment",
    "general.name",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.mask_token_id",
    "tokenizer.ggml.fim_pre_token_id",
    "tokenizer.ggml.prefix_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
];

/// A tensor being rewritten.
struct Tensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Vec<u8>,
}

fn interesting_int(rng: &mut Rng, current: u64) -> u64 {
    match rng.below(4) {
        0 => current.wrapping_add(1),
        1 => current.wrapping_sub(1),
        2 => current.wrapping_mul(*rng.pick(&[2, 3, 16, 256, 1 << 20])),
        _ => *rng.pick(INTERESTING),
    }
}

fn random_value(rng: &mut Rng) -> Value {
    let n = *rng.pick(INTERESTING);
    match rng.below(11) {
        0 => Value::U8(n as u8),
        1 => Value::I32(n as i32),
        2 => Value::U32(n as u32),
        3 => Value::U64(n),
        4 => Value::I64(n as i64),
        5 => Value::F32(*rng.pick(FLOATS)),
        6 => Value::F64(*rng.pick(FLOATS) as f64),
        7 => Value::Bool(rng.chance(2)),
        8 => Value::String(rng.pick(NAMES).to_string()),
        9 => Value::Array(Array::I32(vec![n as i32; rng.below(4)])),
        _ => Value::Array(Array::String(
            (0..rng.below(4))
                .map(|_| rng.pick(TOKEN_TEXTS).to_string())
                .collect(),
        )),
    }
}

/// An integer value of another width or signedness (or a float, a string).
fn retype(rng: &mut Rng, v: u64) -> Value {
    match rng.below(8) {
        0 => Value::U8(v as u8),
        1 => Value::U16(v as u16),
        2 => Value::I16(v as i16),
        3 => Value::I32(v as i32),
        4 => Value::U64(v),
        5 => Value::I64(v as i64),
        6 => Value::F32(v as f32),
        _ => Value::String(v.to_string()),
    }
}

fn mutate_string(rng: &mut Rng, s: &str) -> String {
    let mut s = s.to_string();
    let at = |rng: &mut Rng, s: &str| {
        let mut i = rng.below(s.len() + 1);
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match rng.below(7) {
        0 => rng.pick(NAMES).to_string(),
        1 => rng.pick(TOKEN_TEXTS).to_string(),
        2 => {
            let i = at(rng, &s);
            s.insert_str(i, *rng.pick(TEMPLATE_SNIPPETS));
            s
        }
        3 => {
            let i = at(rng, &s);
            s.insert_str(i, *rng.pick(TOKEN_TEXTS));
            s
        }
        4 => {
            let i = at(rng, &s);
            s.truncate(i);
            s
        }
        5 => {
            // Remove a span.
            let i = at(rng, &s);
            let j = at(rng, &s);
            let (i, j) = (i.min(j), i.max(j));
            s.replace_range(i..j, "");
            s
        }
        _ => s.repeat(1 + rng.below(3)),
    }
}

fn mutate_array(rng: &mut Rng, a: &mut Array) {
    fn edit<T: Clone>(rng: &mut Rng, v: &mut Vec<T>, new: impl FnOnce(&mut Rng, Option<&T>) -> T) {
        let i = rng.below(v.len());
        match rng.below(6) {
            0 if !v.is_empty() => {
                v.remove(i);
            }
            1 if !v.is_empty() => {
                let x = v[i].clone();
                v.insert(rng.below(v.len() + 1), x);
            }
            2 if !v.is_empty() => {
                let j = rng.below(v.len());
                v.swap(i, j);
            }
            3 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            _ => {
                let x = new(rng, v.get(i));
                if v.is_empty() || rng.chance(3) {
                    v.insert(rng.below(v.len() + 1), x);
                } else {
                    v[i] = x;
                }
            }
        }
    }
    match a {
        Array::String(v) => edit(rng, v, |rng, old| match old {
            Some(s) if rng.chance(2) => mutate_string(rng, s),
            _ => rng.pick(TOKEN_TEXTS).to_string(),
        }),
        Array::I32(v) => edit(rng, v, |rng, old| {
            interesting_int(rng, old.map_or(1, |&x| x as u64)) as i32
        }),
        Array::U32(v) => edit(rng, v, |rng, old| {
            interesting_int(rng, old.map_or(1, |&x| x as u64)) as u32
        }),
        Array::F32(v) => edit(rng, v, |rng, _| *rng.pick(FLOATS)),
        Array::U8(v) => edit(rng, v, |rng, _| rng.next() as u8),
        Array::I64(v) => edit(rng, v, |rng, old| {
            interesting_int(rng, old.map_or(1, |&x| x as u64)) as i64
        }),
        _ => {}
    }
}

fn mutate_value(rng: &mut Rng, v: &Value) -> Value {
    if rng.chance(8) {
        return random_value(rng);
    }
    match v {
        Value::String(s) => Value::String(mutate_string(rng, s)),
        Value::F32(x) => Value::F32(if rng.chance(2) {
            *rng.pick(FLOATS)
        } else {
            x * *rng.pick(&[-1.0, 0.5, 2.0, 1e10])
        }),
        Value::F64(_) => Value::F64(*rng.pick(FLOATS) as f64),
        Value::Bool(b) => {
            if rng.chance(2) {
                Value::Bool(!b)
            } else {
                Value::U8(*b as u8)
            }
        }
        Value::Array(a) => {
            let mut a = a.clone();
            mutate_array(rng, &mut a);
            Value::Array(a)
        }
        other => {
            let n = other.as_u64().or(other.as_i64().map(|x| x as u64)).unwrap_or(0);
            let n = interesting_int(rng, n);
            if rng.chance(4) {
                retype(rng, n)
            } else {
                match other {
                    Value::U8(_) => Value::U8(n as u8),
                    Value::I8(_) => Value::I8(n as i8),
                    Value::U16(_) => Value::U16(n as u16),
                    Value::I16(_) => Value::I16(n as i16),
                    Value::U32(_) => Value::U32(n as u32),
                    Value::I32(_) => Value::I32(n as i32),
                    Value::I64(_) => Value::I64(n as i64),
                    _ => Value::U64(n),
                }
            }
        }
    }
}

/// `data` resized to what `ty` and `dims` need, filled with random bytes
/// where it grows. `None` if the shape is not whole blocks of `ty` or too big.
fn resized(rng: &mut Rng, data: &[u8], ty: GgmlType, dims: &[u64], limit: usize) -> Option<Vec<u8>> {
    if dims.is_empty() || dims.contains(&0) || !dims[0].is_multiple_of(ty.block_size() as u64) {
        return None;
    }
    let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    let bytes = ty.row_bytes(n)?;
    if bytes > limit as u64 {
        return None;
    }
    let mut out = data.to_vec();
    let old = out.len();
    out.resize(bytes as usize, 0);
    for b in &mut out[old.min(bytes as usize)..] {
        *b = rng.next() as u8;
    }
    Some(out)
}

fn mutate_tensor(rng: &mut Rng, tensors: &mut Vec<Tensor>, limit: usize) {
    if tensors.is_empty() {
        return;
    }
    let i = rng.below(tensors.len());
    match rng.below(9) {
        0 => {
            tensors.remove(i);
        }
        1 => {
            // Rename: another block index (possibly huge), or another role.
            let t = &mut tensors[i];
            if let Some(rest) = t.name.strip_prefix("blk.") {
                if let Some((_, role)) = rest.split_once('.') {
                    let idx = interesting_int(rng, 1);
                    t.name = format!("blk.{idx}.{role}");
                }
            } else {
                t.name = rng
                    .pick(&["output.weight", "token_embd.weight", "output_norm.weight", "blk.0.attn_q.bias"])
                    .to_string();
            }
        }
        2 => {
            // Another type, the data resized to match.
            let ty = *rng.pick(TYPES);
            let t = &tensors[i];
            if let Some(data) = resized(rng, &t.data, ty, &t.dims, limit) {
                let t = &mut tensors[i];
                t.ty = ty;
                t.data = data;
            }
        }
        3 => {
            // Another shape of the same type.
            let t = &tensors[i];
            let mut dims = t.dims.clone();
            match rng.below(4) {
                0 => dims.reverse(),
                1 if dims.len() < 4 => dims.push(1 + rng.below(3) as u64),
                2 if dims.len() > 1 => {
                    dims.pop();
                }
                _ => {
                    let d = rng.below(dims.len());
                    dims[d] = interesting_int(rng, dims[d]).clamp(1, 1 << 20);
                }
            }
            if let Some(data) = resized(rng, &t.data, t.ty, &dims, limit) {
                let t = &mut tensors[i];
                t.dims = dims;
                t.data = data;
            }
        }
        4 => {
            // Special values in the data: NaN/inf f32 and f16 bit patterns, 0xFF scales.
            let t = &mut tensors[i];
            if !t.data.is_empty() {
                let pattern: &[u8] = *rng.pick(&[
                    &[0x00, 0x00, 0xC0, 0x7F][..],
                    &[0x00, 0x00, 0x80, 0x7F][..],
                    &[0x00, 0x7E][..],
                    &[0x00, 0x7C][..],
                    &[0xFF, 0xFF][..],
                    &[0x00, 0x00][..],
                ]);
                let at = rng.below(t.data.len());
                for (k, &b) in pattern.iter().enumerate() {
                    if let Some(x) = t.data.get_mut(at + k) {
                        *x = b;
                    }
                }
            }
        }
        5 => {
            // A duplicate under another block index.
            let t = &tensors[i];
            if let Some(rest) = t.name.strip_prefix("blk.") {
                if let Some((_, role)) = rest.split_once('.') {
                    let name = format!("blk.{}.{role}", interesting_int(rng, 2));
                    if !tensors.iter().any(|x| x.name == name) {
                        let copy = Tensor {
                            name,
                            ty: t.ty,
                            dims: t.dims.clone(),
                            data: t.data.clone(),
                        };
                        tensors.push(copy);
                    }
                }
            }
        }
        6 => {
            let j = rng.below(tensors.len());
            tensors.swap(i, j);
        }
        _ => {
            // Random bytes over a stretch of the data.
            let t = &mut tensors[i];
            let n = t.data.len();
            if n > 0 {
                let start = rng.below(n);
                let len = (1 + rng.below(64)).min(n - start);
                for b in &mut t.data[start..start + len] {
                    *b = rng.next() as u8;
                }
            }
        }
    }
}

fn mutate_metadata(rng: &mut Rng, m: &mut Metadata) {
    let keys: Vec<String> = m.iter().map(|(k, _)| k.to_string()).collect();
    let arch = m
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    match rng.below(10) {
        0 if !keys.is_empty() => {
            let key = rng.pick(&keys).clone();
            m.remove(&key);
        }
        1 => {
            let key = rng.pick(KEYS).replace("{}", &arch);
            let value = match m.get(&key) {
                Some(v) => mutate_value(rng, v),
                None => random_value(rng),
            };
            m.set(key, value);
        }
        _ if !keys.is_empty() => {
            let key = rng.pick(&keys).clone();
            let value = mutate_value(rng, m.get(&key).unwrap());
            m.set(key, value);
        }
        _ => {}
    }
}

/// One structural mutation of `data`, or `None` if it is not a GGUF file
/// this can rewrite (the caller falls back to byte-level mutation).
pub fn structured(data: &[u8], max_size: usize, seed: u32) -> Option<Vec<u8>> {
    let file = GgufFile::from_bytes(data.to_vec()).ok()?;
    let mut rng = Rng::new(seed as u64 ^ ((data.len() as u64) << 32));
    let mut metadata = file.metadata().clone();
    let mut tensors: Vec<Tensor> = file
        .tensors()
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            ty: t.ty,
            dims: t.dims.clone(),
            data: file.tensor_data(t).to_vec(),
        })
        .collect();
    // Up to three changes at once.
    for _ in 0..1 + rng.below(3) {
        if rng.chance(3) {
            mutate_tensor(&mut rng, &mut tensors, max_size);
        } else {
            mutate_metadata(&mut rng, &mut metadata);
        }
    }
    // The writer pads to `general.alignment`: a mutated 2^40 would make it
    // write a terabyte here, in the mutator (the reader's handling of odd
    // alignments is left to the byte-level mutations).
    if let Some(a) = metadata.get("general.alignment") {
        if a.as_u64().is_none_or(|a| a > 1 << 16) {
            return None;
        }
    }
    let mut w = GgufWriter::with_metadata(metadata);
    for t in &tensors {
        w.add_tensor(t.name.clone(), t.ty, &t.dims, &t.data[..]).ok()?;
    }
    let mut out = Vec::with_capacity(data.len() + 256);
    w.write(&mut out).ok()?;
    (out.len() <= max_size).then_some(out)
}
