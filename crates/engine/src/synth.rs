//! Synthetic models: a GGUF file of a real model's exact shape and
//! architecture filled with seeded random weights, so GPU benchmarks and
//! backend cross-checks need no large download.

use gguf::{Array, GgmlType, GgufFile, GgufWriter, Metadata, Value};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::convert::{plan_types, FileType, TensorDesc};
use crate::spec::Arch;
use crate::EngineError;

/// The shape of a model: everything that decides tensor shapes and the
/// hyperparameter keys, nothing about its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub arch: Arch,
    pub n_layers: u64,
    pub n_embd: u64,
    pub n_ff: u64,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub head_dim: u64,
    /// `None`: as many tokens as the tokenizer it is given.
    pub vocab_size: Option<u64>,
    pub context_length: u64,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
    /// Gemma 3: local attention window (every sixth layer is global).
    pub sliding_window: Option<u64>,
}

impl Preset {
    pub const ALL: [Preset; 6] = [
        Preset {
            name: "qwen2.5-0.5b",
            arch: Arch::Qwen2,
            n_layers: 24,
            n_embd: 896,
            n_ff: 4864,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            vocab_size: Some(151_936),
            context_length: 32_768,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
            sliding_window: None,
        },
        Preset {
            name: "qwen2.5-1.5b",
            arch: Arch::Qwen2,
            n_layers: 28,
            n_embd: 1536,
            n_ff: 8960,
            n_heads: 12,
            n_kv_heads: 2,
            head_dim: 128,
            vocab_size: Some(151_936),
            context_length: 32_768,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
            sliding_window: None,
        },
        Preset {
            name: "smollm2-135m",
            arch: Arch::Llama,
            n_layers: 30,
            n_embd: 576,
            n_ff: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: Some(49_152),
            context_length: 8192,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            tied_embeddings: true,
            sliding_window: None,
        },
        Preset {
            name: "gemma3-270m",
            arch: Arch::Gemma3,
            n_layers: 18,
            n_embd: 640,
            n_ff: 2048,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 256,
            vocab_size: Some(262_144),
            context_length: 32_768,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
            sliding_window: Some(512),
        },
        Preset {
            name: "tiny-qwen2",
            arch: Arch::Qwen2,
            n_layers: 2,
            n_embd: 256,
            n_ff: 512,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            vocab_size: None,
            context_length: 4096,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
            sliding_window: None,
        },
        Preset {
            name: "tiny-llama",
            arch: Arch::Llama,
            n_layers: 2,
            n_embd: 256,
            n_ff: 768,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 64,
            vocab_size: None,
            context_length: 4096,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
            sliding_window: None,
        },
    ];

    pub fn by_name(name: &str) -> Option<&'static Preset> {
        Self::ALL.iter().find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|p| p.name).collect()
    }

    /// Every tensor of the model: name and dims in ggml order.
    pub fn tensor_shapes(&self, vocab: u64) -> Vec<(String, Vec<u64>)> {
        let (embd, ff) = (self.n_embd, self.n_ff);
        let q_dim = self.n_heads * self.head_dim;
        let kv_dim = self.n_kv_heads * self.head_dim;
        let mut out = vec![("token_embd.weight".to_string(), vec![embd, vocab])];
        for i in 0..self.n_layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            out.push((name("attn_norm.weight"), vec![embd]));
            out.push((name("attn_q.weight"), vec![embd, q_dim]));
            out.push((name("attn_k.weight"), vec![embd, kv_dim]));
            out.push((name("attn_v.weight"), vec![embd, kv_dim]));
            if self.arch == Arch::Qwen2 {
                out.push((name("attn_q.bias"), vec![q_dim]));
                out.push((name("attn_k.bias"), vec![kv_dim]));
                out.push((name("attn_v.bias"), vec![kv_dim]));
            }
            if self.arch == Arch::Gemma3 {
                out.push((name("attn_q_norm.weight"), vec![self.head_dim]));
                out.push((name("attn_k_norm.weight"), vec![self.head_dim]));
                out.push((name("post_attention_norm.weight"), vec![embd]));
                out.push((name("post_ffw_norm.weight"), vec![embd]));
            }
            out.push((name("attn_output.weight"), vec![q_dim, embd]));
            out.push((name("ffn_norm.weight"), vec![embd]));
            out.push((name("ffn_gate.weight"), vec![embd, ff]));
            out.push((name("ffn_up.weight"), vec![embd, ff]));
            out.push((name("ffn_down.weight"), vec![ff, embd]));
        }
        out.push(("output_norm.weight".to_string(), vec![embd]));
        if !self.tied_embeddings {
            out.push(("output.weight".to_string(), vec![embd, vocab]));
        }
        out
    }

    fn hyperparameters(&self, m: &mut Metadata, vocab: u64) {
        let arch = self.arch.name();
        let key = |s: &str| format!("{arch}.{s}");
        let u32v = |v: u64| Value::U32(v as u32);
        m.set("general.architecture", Value::String(arch.into()));
        m.set("general.type", Value::String("model".into()));
        m.set(
            "general.name",
            Value::String(format!("synthetic {}", self.name)),
        );
        m.set(key("context_length"), u32v(self.context_length));
        m.set(key("embedding_length"), u32v(self.n_embd));
        m.set(key("block_count"), u32v(self.n_layers));
        m.set(key("feed_forward_length"), u32v(self.n_ff));
        m.set(key("attention.head_count"), u32v(self.n_heads));
        m.set(key("attention.head_count_kv"), u32v(self.n_kv_heads));
        m.set(key("rope.freq_base"), Value::F32(self.rope_theta));
        m.set(
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(self.rms_eps),
        );
        match self.arch {
            Arch::Llama => {
                m.set(key("vocab_size"), u32v(vocab));
                m.set(key("rope.dimension_count"), u32v(self.head_dim));
            }
            Arch::Qwen2 => {}
            Arch::Gemma3 => {
                m.set(key("attention.key_length"), u32v(self.head_dim));
                m.set(key("attention.value_length"), u32v(self.head_dim));
                if let Some(w) = self.sliding_window {
                    m.set(key("attention.sliding_window"), u32v(w));
                }
            }
        }
        if self.n_embd != self.n_heads * self.head_dim && self.arch != Arch::Gemma3 {
            m.set(key("attention.key_length"), u32v(self.head_dim));
            m.set(key("attention.value_length"), u32v(self.head_dim));
        }
    }
}

/// Token type of the padding tokens added to reach the preset's vocabulary size.
const TOKEN_TYPE_UNUSED: i32 = 5;

/// Copy the `tokenizer.*` keys of `source`, padded or checked to `vocab` tokens.
fn copy_tokenizer(
    source: &Metadata,
    out: &mut Metadata,
    vocab: Option<u64>,
) -> Result<u64, EngineError> {
    let tokens = source.get_string_array("tokenizer.ggml.tokens")?;
    let n_source = tokens.len() as u64;
    let n = vocab.unwrap_or(n_source);
    if n < n_source {
        return Err(EngineError::Invalid(format!(
            "the tokenizer has {n_source} tokens, more than the preset's vocabulary of {n}"
        )));
    }
    let pad = |i: u64| format!("<|synth_pad_{i}|>");
    for (key, value) in source.iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
        let padded = match (key, value) {
            ("tokenizer.ggml.tokens", Value::Array(Array::String(v))) => {
                let mut v = v.clone();
                v.extend((n_source..n).map(pad));
                Value::Array(Array::String(v))
            }
            ("tokenizer.ggml.token_type", Value::Array(Array::I32(v))) => {
                let mut v = v.clone();
                v.resize(n as usize, TOKEN_TYPE_UNUSED);
                Value::Array(Array::I32(v))
            }
            ("tokenizer.ggml.scores", Value::Array(Array::F32(v))) => {
                let mut v = v.clone();
                v.resize(n as usize, -1e9);
                Value::Array(Array::F32(v))
            }
            _ => value.clone(),
        };
        out.set(key, padded);
    }
    Ok(n)
}

/// What to synthesize.
#[derive(Clone, Debug)]
pub struct SynthOptions<'a> {
    pub preset: &'a Preset,
    pub file_type: FileType,
    pub seed: u64,
    /// The tokenizer (and chat template) are copied from this file.
    pub tokenizer_from: &'a GgufFile,
}

/// Values of one tensor: norms near 1, biases and weights scaled so that
/// activations keep unit scale through the layers.
fn random_values(name: &str, dims: &[u64], seed: u64, index: usize) -> Vec<f32> {
    let n: u64 = dims.iter().product();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    if name.contains("norm") {
        return (0..n).map(|_| 1.0 + rng.gen_range(-0.1f32..0.1)).collect();
    }
    if name.ends_with(".bias") {
        return (0..n).map(|_| rng.gen_range(-0.1f32..0.1)).collect();
    }
    // Uniform(-a, a) has variance a²/3; a = sqrt(3 / fan_in) gives unit-variance outputs.
    let fan_in = if name == "token_embd.weight" {
        1
    } else {
        dims[0]
    };
    let a = (3.0 / fan_in as f32).sqrt();
    (0..n).map(|_| rng.gen_range(-a..a)).collect()
}

/// Build the synthetic model; write it with [`GgufWriter::write_to_path`].
pub fn synthesize(opts: &SynthOptions) -> Result<GgufWriter<'static>, EngineError> {
    let preset = opts.preset;
    let mut metadata = Metadata::new();
    preset.hyperparameters(&mut metadata, 0);
    let vocab = copy_tokenizer(
        opts.tokenizer_from.metadata(),
        &mut metadata,
        preset.vocab_size,
    )?;
    preset.hyperparameters(&mut metadata, vocab);
    metadata.set(
        "general.file_type",
        Value::U32(opts.file_type.llama_ftype()),
    );
    metadata.set("general.quantization_version", Value::U32(2));

    let shapes = preset.tensor_shapes(vocab);
    let descs: Vec<TensorDesc> = shapes
        .iter()
        .map(|(name, dims)| TensorDesc {
            name,
            dims,
            ty: GgmlType::F32,
        })
        .collect();
    let types = plan_types(opts.file_type, &descs);
    let data: Vec<Vec<u8>> = shapes
        .par_iter()
        .zip(types.par_iter())
        .enumerate()
        .map(|(i, ((name, dims), &ty))| {
            let values = random_values(name, dims, opts.seed, i);
            quant::quantize(ty, &values).map_err(|e| EngineError::Tensor {
                name: name.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;

    let mut writer = GgufWriter::with_metadata(metadata);
    for (((name, dims), ty), bytes) in shapes.into_iter().zip(types).zip(data) {
        writer.add_tensor(name, ty, &dims, bytes)?;
    }
    Ok(writer)
}
