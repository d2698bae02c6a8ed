//! Writes the fuzz seeds: tiny but complete models (a few kilobytes to a
//! few tens of kilobytes) that load, tokenize and run a forward step, so the
//! fuzzer starts deep in the pipeline instead of at the GGUF magic.
//!
//! ```sh
//! cd crates/engine/fuzz && cargo run --release --example write_seeds [OUT_DIR]
//! ```
//!
//! `OUT_DIR` defaults to `seeds/` next to this crate's Cargo.toml. After
//! writing, every seed is run through `engine_fuzz::run` (the fuzz target's
//! pipeline) and must reach the forward step; the program fails otherwise.
//! The output is deterministic.

use std::path::PathBuf;

use gguf::{Array, GgmlType, GgufWriter, Metadata, Value};

// ---------------------------------------------------------------- tokenizers

/// GPT-2's byte → printable character map (as `tokenizer::unicode`).
fn byte_to_char() -> [char; 256] {
    let printable =
        |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut table = ['\0'; 256];
    let mut shifted = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap()
        };
    }
    table
}

const SAMPLE: &str = "Hello world! The quick brown fox jumps over the lazy dog. \
    Hello there, hello world, the world is the world. 123 456 789. \
    In the beginning there was the word, and the word was hello.";

/// Token texts, token types, optional scores, merges, special ids.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Option<Vec<f32>>,
    merges: Option<Vec<String>>,
}

impl Vocab {
    fn id(&self, text: &str) -> u32 {
        self.tokens.iter().position(|t| t == text).unwrap() as u32
    }

    fn len(&self) -> u64 {
        self.tokens.len() as u64
    }
}

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;

/// A byte-level BPE vocabulary: `specials` (control tokens) first, then the
/// 256 byte characters, then `n_merges` merges learnt from [`SAMPLE`].
fn bpe_vocab(specials: &[&str], n_merges: usize) -> Vocab {
    let table = byte_to_char();
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut types = vec![CONTROL; specials.len()];
    for c in table {
        tokens.push(c.to_string());
        types.push(NORMAL);
    }
    // Words as in GPT-2: a leading space belongs to the word (Ġ).
    let mut words: Vec<Vec<String>> = Vec::new();
    for (i, w) in SAMPLE.split(' ').enumerate() {
        let bytes = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        words.push(bytes.bytes().map(|b| table[b as usize].to_string()).collect());
    }
    let mut merges = Vec::new();
    for _ in 0..n_merges {
        let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
            }
        }
        // Most frequent, ties by the pair's order (deterministic).
        let Some(((a, b), _)) = counts
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)))
        else {
            break;
        };
        let merged = format!("{a}{b}");
        merges.push(format!("{a} {b}"));
        if !tokens.contains(&merged) {
            tokens.push(merged.clone());
            types.push(NORMAL);
        }
        for w in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
            *w = out;
        }
    }
    Vocab {
        tokens,
        types,
        scores: None,
        merges: Some(merges),
    }
}

/// A SentencePiece vocabulary: `specials` (`(text, type)`), the 256 byte
/// tokens, `▁`, the characters of [`SAMPLE`] and some whole words.
fn spm_vocab(specials: &[(&str, i32)]) -> Vocab {
    let mut tokens: Vec<String> = Vec::new();
    let mut types = Vec::new();
    let mut scores = Vec::new();
    let mut push = |t: String, ty: i32, score: f32| {
        if !tokens.contains(&t) {
            tokens.push(t);
            types.push(ty);
            scores.push(score);
        }
    };
    for &(t, ty) in specials {
        push(t.to_string(), ty, 0.0);
    }
    for b in 0..256 {
        push(format!("<0x{b:02X}>"), BYTE, 0.0);
    }
    push("\u{2581}".to_string(), NORMAL, -1.0);
    let mut chars: Vec<char> = SAMPLE.chars().filter(|&c| c != ' ').collect();
    chars.sort_unstable();
    chars.dedup();
    for c in chars {
        push(c.to_string(), NORMAL, -5.0);
    }
    let pieces = [
        "\u{2581}the", "\u{2581}Hello", "\u{2581}hello", "\u{2581}world", "\u{2581}w", "\u{2581}t",
        "\u{2581}h", "he", "ll", "llo", "or", "ld", "orld", "\u{2581}The", "\u{2581}quick", "own",
        "\u{2581}br", "\u{2581}fox", "\u{2581}lazy", "\u{2581}dog", "er", "\u{2581}over", "\u{2581}is",
        "\u{2581}was", "\u{2581}word", "in", "\u{2581}In", "\u{2581}1", "23", "\u{2581}123", "ing",
    ];
    for (i, p) in pieces.iter().enumerate() {
        push(p.to_string(), NORMAL, -2.0 - i as f32 * 0.01);
    }
    Vocab {
        tokens,
        types,
        scores: Some(scores),
        merges: None,
    }
}

fn strings(v: &[String]) -> Value {
    Value::Array(Array::String(v.to_vec()))
}

fn set_tokenizer(m: &mut Metadata, model: &str, pre: Option<&str>, v: &Vocab) {
    m.set("tokenizer.ggml.model", Value::String(model.into()));
    if let Some(pre) = pre {
        m.set("tokenizer.ggml.pre", Value::String(pre.into()));
    }
    m.set("tokenizer.ggml.tokens", strings(&v.tokens));
    m.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(v.types.clone())),
    );
    if let Some(s) = &v.scores {
        m.set("tokenizer.ggml.scores", Value::Array(Array::F32(s.clone())));
    }
    if let Some(merges) = &v.merges {
        m.set("tokenizer.ggml.merges", strings(merges));
    }
}

// ------------------------------------------------------------------- models

#[derive(Clone, Copy, PartialEq)]
enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

struct Shape {
    arch: Arch,
    n_layers: u64,
    n_embd: u64,
    n_ff: u64,
    n_heads: u64,
    n_kv_heads: u64,
    head_dim: u64,
    tied: bool,
    sliding_window: Option<u64>,
}

impl Shape {
    fn arch_name(&self) -> &'static str {
        match self.arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    fn hyperparameters(&self, m: &mut Metadata, vocab: u64, name: &str) {
        let arch = self.arch_name();
        let key = |s: &str| format!("{arch}.{s}");
        let u = |v: u64| Value::U32(v as u32);
        m.set("general.architecture", Value::String(arch.into()));
        m.set("general.name", Value::String(name.into()));
        m.set(key("context_length"), u(256));
        m.set(key("embedding_length"), u(self.n_embd));
        m.set(key("block_count"), u(self.n_layers));
        m.set(key("feed_forward_length"), u(self.n_ff));
        m.set(key("attention.head_count"), u(self.n_heads));
        m.set(key("attention.head_count_kv"), u(self.n_kv_heads));
        m.set(key("rope.freq_base"), Value::F32(10_000.0));
        m.set(key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6));
        if self.n_embd != self.n_heads * self.head_dim || self.arch == Arch::Gemma3 {
            m.set(key("attention.key_length"), u(self.head_dim));
            m.set(key("attention.value_length"), u(self.head_dim));
        }
        if self.arch == Arch::Llama {
            m.set(key("vocab_size"), u(vocab));
            m.set(key("rope.dimension_count"), u(self.head_dim));
        }
        if let Some(w) = self.sliding_window {
            m.set(key("attention.sliding_window"), u(w));
        }
    }

    /// Every tensor: name and dims in ggml order (row length first).
    fn tensors(&self, vocab: u64) -> Vec<(String, Vec<u64>)> {
        let (embd, ff) = (self.n_embd, self.n_ff);
        let q = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let mut out = vec![("token_embd.weight".to_string(), vec![embd, vocab])];
        for i in 0..self.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            out.push((n("attn_norm.weight"), vec![embd]));
            out.push((n("attn_q.weight"), vec![embd, q]));
            out.push((n("attn_k.weight"), vec![embd, kv]));
            out.push((n("attn_v.weight"), vec![embd, kv]));
            if self.arch == Arch::Qwen2 {
                out.push((n("attn_q.bias"), vec![q]));
                out.push((n("attn_k.bias"), vec![kv]));
                out.push((n("attn_v.bias"), vec![kv]));
            }
            if self.arch == Arch::Gemma3 {
                out.push((n("attn_q_norm.weight"), vec![self.head_dim]));
                out.push((n("attn_k_norm.weight"), vec![self.head_dim]));
                out.push((n("post_attention_norm.weight"), vec![embd]));
                out.push((n("post_ffw_norm.weight"), vec![embd]));
            }
            out.push((n("attn_output.weight"), vec![q, embd]));
            out.push((n("ffn_norm.weight"), vec![embd]));
            out.push((n("ffn_gate.weight"), vec![embd, ff]));
            out.push((n("ffn_up.weight"), vec![embd, ff]));
            out.push((n("ffn_down.weight"), vec![ff, embd]));
        }
        out.push(("output_norm.weight".to_string(), vec![embd]));
        if !self.tied {
            out.push(("output.weight".to_string(), vec![embd, vocab]));
        }
        out
    }
}

/// SplitMix64: deterministic values without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0 // [-1, 1)
    }
}

fn values(name: &str, dims: &[u64], rng: &mut Rng) -> Vec<f32> {
    let n: u64 = dims.iter().product();
    if name.contains("norm") {
        return (0..n).map(|_| 1.0 + 0.1 * rng.next_f32()).collect();
    }
    if name.ends_with(".bias") {
        return (0..n).map(|_| 0.1 * rng.next_f32()).collect();
    }
    let fan_in = if name == "token_embd.weight" { 1 } else { dims[0] };
    let a = (3.0 / fan_in as f32).sqrt();
    (0..n).map(|_| a * rng.next_f32()).collect()
}

struct Seed {
    file: &'static str,
    shape: Shape,
    vocab: Vocab,
    tokenizer_model: &'static str,
    pre: Option<&'static str>,
    extra: Vec<(&'static str, Value)>,
    /// The type of each matrix by name (vectors are always F32).
    matrix_type: fn(&str) -> GgmlType,
    /// Whether the chat template should render (false: the file has none).
    has_template: bool,
}

fn build(seed: &Seed) -> Vec<u8> {
    let mut m = Metadata::new();
    let vocab = seed.vocab.len();
    seed.shape.hyperparameters(&mut m, vocab, seed.file);
    m.set("general.quantization_version", Value::U32(2));
    set_tokenizer(&mut m, seed.tokenizer_model, seed.pre, &seed.vocab);
    for (k, v) in &seed.extra {
        m.set(*k, v.clone());
    }
    let mut w = GgufWriter::with_metadata(m);
    let mut rng = Rng(0x5EED ^ seed.file.len() as u64);
    for (name, dims) in seed.shape.tensors(vocab) {
        let ty = if dims.len() == 1 {
            GgmlType::F32
        } else {
            (seed.matrix_type)(&name)
        };
        let data = quant::quantize(ty, &values(&name, &dims, &mut rng))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        w.add_tensor(name, ty, &dims, data).unwrap();
    }
    let mut out = Vec::new();
    w.write(&mut out).unwrap();
    out
}

const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>\
{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

fn seeds() -> Vec<Seed> {
    let llama_bpe = bpe_vocab(
        &[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        40,
    );
    let (bos, eot) = (llama_bpe.id("<|begin_of_text|>"), llama_bpe.id("<|eot_id|>"));
    let qwen_bpe = bpe_vocab(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 40);
    let (qwen_eot, qwen_end) = (qwen_bpe.id("<|endoftext|>"), qwen_bpe.id("<|im_end|>"));
    let gemma_spm = spm_vocab(&[
        ("<pad>", CONTROL),
        ("<eos>", CONTROL),
        ("<bos>", CONTROL),
        ("<unk>", UNKNOWN),
        ("<start_of_turn>", CONTROL),
        ("<end_of_turn>", CONTROL),
    ]);
    let llama_spm = spm_vocab(&[("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]);
    vec![
        Seed {
            file: "llama-bpe-q8_0.gguf",
            shape: Shape {
                arch: Arch::Llama,
                n_layers: 2,
                n_embd: 32,
                n_ff: 64,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                tied: false,
                sliding_window: None,
            },
            vocab: llama_bpe,
            tokenizer_model: "gpt2",
            pre: Some("llama-bpe"),
            extra: vec![
                ("tokenizer.ggml.bos_token_id", Value::U32(bos)),
                ("tokenizer.ggml.eos_token_id", Value::U32(eot)),
                ("tokenizer.chat_template", Value::String(LLAMA3_TEMPLATE.into())),
            ],
            matrix_type: |_| GgmlType::Q8_0,
            has_template: true,
        },
        Seed {
            file: "qwen2-bpe-f32.gguf",
            shape: Shape {
                arch: Arch::Qwen2,
                n_layers: 2,
                n_embd: 16,
                n_ff: 32,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 8,
                tied: true,
                sliding_window: None,
            },
            vocab: qwen_bpe,
            tokenizer_model: "gpt2",
            pre: Some("qwen2"),
            extra: vec![
                ("tokenizer.ggml.bos_token_id", Value::U32(qwen_eot)),
                ("tokenizer.ggml.eos_token_id", Value::U32(qwen_end)),
                ("tokenizer.ggml.padding_token_id", Value::U32(qwen_eot)),
                ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ],
            matrix_type: |_| GgmlType::F32,
            has_template: true, // ChatML from <|im_start|>
        },
        Seed {
            file: "gemma3-spm-q4_k.gguf",
            shape: Shape {
                arch: Arch::Gemma3,
                n_layers: 1,
                n_embd: 32,
                n_ff: 256,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 16,
                tied: true,
                sliding_window: Some(4),
            },
            vocab: gemma_spm,
            tokenizer_model: "llama",
            pre: Some("default"),
            extra: vec![
                ("tokenizer.ggml.bos_token_id", Value::U32(2)),
                ("tokenizer.ggml.eos_token_id", Value::U32(1)),
                ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
                ("tokenizer.ggml.padding_token_id", Value::U32(0)),
                ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
                ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
                ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
            ],
            // ffn_down's rows are n_ff = 256 values: one Q4_K super-block.
            matrix_type: |name| {
                if name.ends_with("ffn_down.weight") {
                    GgmlType::Q4_K
                } else {
                    GgmlType::Q8_0
                }
            },
            has_template: true, // Gemma's from <start_of_turn>
        },
        Seed {
            file: "llama-spm-mixed.gguf",
            shape: Shape {
                arch: Arch::Llama,
                n_layers: 1,
                n_embd: 32,
                n_ff: 256,
                n_heads: 2,
                n_kv_heads: 2,
                head_dim: 16,
                tied: false,
                sliding_window: None,
            },
            vocab: llama_spm,
            tokenizer_model: "llama",
            pre: None,
            extra: vec![],
            matrix_type: |name| {
                if name.ends_with("ffn_down.weight") {
                    GgmlType::Q4_K
                } else if name.contains("attn_") {
                    GgmlType::F16
                } else {
                    GgmlType::Q8_0
                }
            },
            has_template: false,
        },
    ]
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    std::fs::create_dir_all(&dir).unwrap();
    engine_fuzz::init_single_thread();
    let mut failed = false;
    for seed in seeds() {
        let bytes = build(&seed);
        let path = dir.join(seed.file);
        std::fs::write(&path, &bytes).unwrap();
        // Both parities of the length: f32 and 8-bit activations.
        let mut odd = bytes.clone();
        odd.push(0);
        for (what, data) in [("f32", &bytes), ("q8", &odd)] {
            let r = engine_fuzz::run(data);
            let ok = r.parsed
                && r.spec
                && r.tokenizer
                && r.loaded
                && r.forward
                && r.template == seed.has_template
                && r.rendered == seed.has_template;
            failed |= !ok;
            println!(
                "{} {:>6} bytes, {what} activations: {} tokens {:?}{}",
                path.display(),
                bytes.len(),
                if ok { "reaches the forward step," } else { "FAILS:" },
                r.tokens,
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!(", errors {:?}", r.errors)
                }
            );
        }
    }
    if failed {
        std::process::exit(1);
    }
}
