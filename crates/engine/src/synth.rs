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

/// How a preset scales RoPE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1/3.2: per-pair frequency factors in `rope_freqs.weight`,
    /// from the scaling factor, the low and high frequency factors and the
    /// original context, as Meta's and llama.cpp's converters compute them.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: u64,
    },
    /// Phi-3.5 / Phi-4-mini LongRoPE: short and long factor tensors (here
    /// smooth made-up curves of the real ranges), the original context that
    /// chooses between them, and the attention factor.
    LongRope {
        original_context: u64,
    },
}

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
    /// Dimensions RoPE rotates, when fewer than `head_dim` (Phi-4-mini).
    pub rope_dims: Option<u64>,
    /// `None`: as many tokens as the tokenizer it is given.
    pub vocab_size: Option<u64>,
    pub context_length: u64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
    /// Local attention window (which layers slide is the architecture's rule).
    pub sliding_window: Option<u64>,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub post_norms: bool,
    /// One `attn_qkv` tensor instead of three (Phi-3).
    pub fused_qkv: bool,
    /// One `ffn_up` of gate and up rows instead of two tensors (Phi-3).
    pub fused_gate_up: bool,
    /// Gemma 2's attention and final logit soft-capping.
    pub softcaps: Option<(f32, f32)>,
}

const LLAMA: Preset = Preset {
    name: "",
    arch: Arch::Llama,
    n_layers: 2,
    n_embd: 256,
    n_ff: 768,
    n_heads: 4,
    n_kv_heads: 1,
    head_dim: 64,
    rope_dims: None,
    vocab_size: None,
    context_length: 4096,
    rope_theta: 10_000.0,
    rope_scaling: RopeScaling::None,
    rms_eps: 1e-5,
    tied_embeddings: false,
    sliding_window: None,
    qkv_bias: false,
    qk_norm: false,
    post_norms: false,
    fused_qkv: false,
    fused_gate_up: false,
    softcaps: None,
};
const QWEN2: Preset = Preset {
    arch: Arch::Qwen2,
    qkv_bias: true,
    rope_theta: 1_000_000.0,
    rms_eps: 1e-6,
    tied_embeddings: true,
    ..LLAMA
};
/// Qwen2.5 7B and up: untied embeddings over a padded 152,064-token vocabulary.
const QWEN2_LARGE: Preset = Preset {
    head_dim: 128,
    vocab_size: Some(152_064),
    context_length: 32_768,
    tied_embeddings: false,
    ..QWEN2
};
const QWEN3: Preset = Preset {
    arch: Arch::Qwen3,
    qk_norm: true,
    rope_theta: 1_000_000.0,
    rms_eps: 1e-6,
    tied_embeddings: true,
    ..LLAMA
};
const LLAMA3_SCALING: RopeScaling = RopeScaling::Llama3 {
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_context: 8192,
};
const PHI3: Preset = Preset {
    arch: Arch::Phi3,
    fused_qkv: true,
    fused_gate_up: true,
    rope_scaling: RopeScaling::LongRope {
        original_context: 4096,
    },
    context_length: 131_072,
    ..LLAMA
};
const GEMMA2: Preset = Preset {
    arch: Arch::Gemma2,
    post_norms: true,
    softcaps: Some((50.0, 30.0)),
    rms_eps: 1e-6,
    tied_embeddings: true,
    sliding_window: Some(4096),
    context_length: 8192,
    ..LLAMA
};
const LLAMA3_VOCAB: Option<u64> = Some(128_256);
const QWEN_VOCAB: Option<u64> = Some(151_936);

impl Preset {
    pub const ALL: [Preset; 23] = [
        Preset {
            name: "qwen2.5-0.5b",
            n_layers: 24,
            n_embd: 896,
            n_ff: 4864,
            n_heads: 14,
            n_kv_heads: 2,
            vocab_size: QWEN_VOCAB,
            context_length: 32_768,
            ..QWEN2
        },
        Preset {
            name: "qwen2.5-1.5b",
            n_layers: 28,
            n_embd: 1536,
            n_ff: 8960,
            n_heads: 12,
            n_kv_heads: 2,
            head_dim: 128,
            vocab_size: QWEN_VOCAB,
            context_length: 32_768,
            ..QWEN2
        },
        Preset {
            name: "qwen2.5-7b",
            n_layers: 28,
            n_embd: 3584,
            n_ff: 18_944,
            n_heads: 28,
            n_kv_heads: 4,
            ..QWEN2_LARGE
        },
        Preset {
            name: "qwen2.5-32b",
            n_layers: 64,
            n_embd: 5120,
            n_ff: 27_648,
            n_heads: 40,
            n_kv_heads: 8,
            ..QWEN2_LARGE
        },
        Preset {
            name: "smollm2-135m",
            n_layers: 30,
            n_embd: 576,
            n_ff: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            vocab_size: Some(49_152),
            context_length: 8192,
            rope_theta: 100_000.0,
            tied_embeddings: true,
            ..LLAMA
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
            qk_norm: true,
            post_norms: true,
            ..LLAMA
        },
        Preset {
            name: "llama3.2-1b",
            n_layers: 16,
            n_embd: 2048,
            n_ff: 8192,
            n_heads: 32,
            n_kv_heads: 8,
            vocab_size: LLAMA3_VOCAB,
            context_length: 131_072,
            rope_theta: 500_000.0,
            rope_scaling: LLAMA3_SCALING,
            tied_embeddings: true,
            ..LLAMA
        },
        Preset {
            name: "llama3.2-3b",
            n_layers: 28,
            n_embd: 3072,
            n_ff: 8192,
            n_heads: 24,
            n_kv_heads: 8,
            head_dim: 128,
            vocab_size: LLAMA3_VOCAB,
            context_length: 131_072,
            rope_theta: 500_000.0,
            rope_scaling: LLAMA3_SCALING,
            tied_embeddings: true,
            ..LLAMA
        },
        Preset {
            name: "qwen3-0.6b",
            n_layers: 28,
            n_embd: 1024,
            n_ff: 3072,
            n_heads: 16,
            n_kv_heads: 8,
            head_dim: 128,
            vocab_size: QWEN_VOCAB,
            context_length: 40_960,
            ..QWEN3
        },
        Preset {
            name: "qwen3-4b",
            n_layers: 36,
            n_embd: 2560,
            n_ff: 9728,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            vocab_size: QWEN_VOCAB,
            context_length: 40_960,
            ..QWEN3
        },
        Preset {
            name: "phi3.5-mini",
            n_layers: 32,
            n_embd: 3072,
            n_ff: 8192,
            n_heads: 32,
            n_kv_heads: 32,
            head_dim: 96,
            vocab_size: Some(32_064),
            ..PHI3
        },
        Preset {
            name: "phi4-mini",
            n_layers: 32,
            n_embd: 3072,
            n_ff: 8192,
            n_heads: 24,
            n_kv_heads: 8,
            head_dim: 128,
            rope_dims: Some(96),
            vocab_size: Some(200_064),
            tied_embeddings: true,
            ..PHI3
        },
        Preset {
            name: "gemma2-2b",
            n_layers: 26,
            n_embd: 2304,
            n_ff: 9216,
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 256,
            vocab_size: Some(256_000),
            ..GEMMA2
        },
        Preset {
            name: "mistral-7b",
            n_layers: 32,
            n_embd: 4096,
            n_ff: 14_336,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            vocab_size: Some(32_000),
            context_length: 32_768,
            sliding_window: Some(4096),
            ..LLAMA
        },
        Preset {
            name: "smollm3-3b",
            arch: Arch::SmolLm3,
            n_layers: 36,
            n_embd: 2048,
            n_ff: 11_008,
            n_heads: 16,
            n_kv_heads: 4,
            head_dim: 128,
            vocab_size: LLAMA3_VOCAB,
            context_length: 65_536,
            rope_theta: 5_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
            ..LLAMA
        },
        Preset {
            name: "tiny-qwen2",
            n_ff: 512,
            n_kv_heads: 2,
            ..QWEN2
        },
        Preset {
            name: "tiny-llama",
            ..LLAMA
        },
        Preset {
            name: "tiny-llama3",
            n_layers: 3,
            n_kv_heads: 2,
            rope_theta: 500_000.0,
            // An original context of 64 puts the 64-value heads' pairs in
            // all three bands of the Llama 3 rule.
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 64,
            },
            tied_embeddings: true,
            ..LLAMA
        },
        Preset {
            name: "tiny-qwen3",
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 96,
            tied_embeddings: false,
            ..QWEN3
        },
        Preset {
            name: "tiny-phi3",
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 64,
            rope_dims: Some(48),
            // Short enough that llama.cpp's test context (256) takes the long factors.
            rope_scaling: RopeScaling::LongRope {
                original_context: 128,
            },
            ..PHI3
        },
        Preset {
            name: "tiny-gemma2",
            n_layers: 4,
            n_kv_heads: 2,
            head_dim: 96,
            // Shorter than the test sequences, so that half the layers slide.
            sliding_window: Some(24),
            // An attention cap low enough to bend this model's scores (they
            // stay far below Gemma 2's 50); the final cap is Gemma 2's.
            softcaps: Some((2.0, 30.0)),
            ..GEMMA2
        },
        Preset {
            name: "tiny-mistral",
            n_layers: 3,
            n_kv_heads: 2,
            // Mistral's window on every layer, shorter than the test sequences.
            sliding_window: Some(24),
            ..LLAMA
        },
        Preset {
            name: "tiny-smollm3",
            arch: Arch::SmolLm3,
            n_layers: 4,
            n_kv_heads: 2,
            rope_theta: 5_000_000.0,
            tied_embeddings: true,
            ..LLAMA
        },
    ];

    pub fn by_name(name: &str) -> Option<&'static Preset> {
        Self::ALL.iter().find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|p| p.name).collect()
    }

    fn rope_dims(&self) -> u64 {
        self.rope_dims.unwrap_or(self.head_dim)
    }

    /// Every tensor of the model: name and dims in ggml order.
    pub fn tensor_shapes(&self, vocab: u64) -> Vec<(String, Vec<u64>)> {
        let (embd, ff) = (self.n_embd, self.n_ff);
        let q_dim = self.n_heads * self.head_dim;
        let kv_dim = self.n_kv_heads * self.head_dim;
        let mut out = vec![("token_embd.weight".to_string(), vec![embd, vocab])];
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Llama3 { .. } => {
                out.push(("rope_freqs.weight".into(), vec![self.rope_dims() / 2]))
            }
            RopeScaling::LongRope { .. } => {
                out.push((
                    "rope_factors_long.weight".into(),
                    vec![self.rope_dims() / 2],
                ));
                out.push((
                    "rope_factors_short.weight".into(),
                    vec![self.rope_dims() / 2],
                ));
            }
        }
        for i in 0..self.n_layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            out.push((name("attn_norm.weight"), vec![embd]));
            if self.fused_qkv {
                out.push((name("attn_qkv.weight"), vec![embd, q_dim + 2 * kv_dim]));
            } else {
                out.push((name("attn_q.weight"), vec![embd, q_dim]));
                out.push((name("attn_k.weight"), vec![embd, kv_dim]));
                out.push((name("attn_v.weight"), vec![embd, kv_dim]));
            }
            if self.qkv_bias {
                out.push((name("attn_q.bias"), vec![q_dim]));
                out.push((name("attn_k.bias"), vec![kv_dim]));
                out.push((name("attn_v.bias"), vec![kv_dim]));
            }
            if self.qk_norm {
                out.push((name("attn_q_norm.weight"), vec![self.head_dim]));
                out.push((name("attn_k_norm.weight"), vec![self.head_dim]));
            }
            if self.post_norms {
                out.push((name("post_attention_norm.weight"), vec![embd]));
                out.push((name("post_ffw_norm.weight"), vec![embd]));
            }
            out.push((name("attn_output.weight"), vec![q_dim, embd]));
            out.push((name("ffn_norm.weight"), vec![embd]));
            if self.fused_gate_up {
                out.push((name("ffn_up.weight"), vec![embd, 2 * ff]));
            } else {
                out.push((name("ffn_gate.weight"), vec![embd, ff]));
                out.push((name("ffn_up.weight"), vec![embd, ff]));
            }
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
        // "phi3" or "phi-3" in the name makes llama.cpp (and our tokenizer,
        // which follows it) give Phi-3's special tokens their attributes and
        // look up `</s>`, which the tokenizers synth copies may lack.
        let name = self.name.replace("phi3", "phi 3").replace("phi4", "phi 4");
        m.set("general.name", Value::String(format!("synthetic {name}")));
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
        if self.arch == Arch::Llama {
            m.set(key("vocab_size"), u32v(vocab));
        }
        if self.arch == Arch::Llama || self.rope_dims.is_some() {
            m.set(key("rope.dimension_count"), u32v(self.rope_dims()));
        }
        if self.n_embd != self.n_heads * self.head_dim
            || matches!(self.arch, Arch::Gemma2 | Arch::Gemma3)
        {
            m.set(key("attention.key_length"), u32v(self.head_dim));
            m.set(key("attention.value_length"), u32v(self.head_dim));
        }
        if let Some(w) = self.sliding_window {
            m.set(key("attention.sliding_window"), u32v(w));
        }
        if let Some((attn, last)) = self.softcaps {
            m.set(key("attn_logit_softcapping"), Value::F32(attn));
            m.set(key("final_logit_softcapping"), Value::F32(last));
        }
        if let RopeScaling::LongRope { original_context } = self.rope_scaling {
            // As llama.cpp's converter writes Phi-3's: the attention factor
            // from the ratio of the contexts.
            let scale = self.context_length as f64 / original_context as f64;
            let attn_factor = (1.0 + scale.ln() / (original_context as f64).ln()).sqrt();
            m.set(
                key("rope.scaling.attn_factor"),
                Value::F32(attn_factor as f32),
            );
            m.set(
                key("rope.scaling.original_context_length"),
                u32v(original_context),
            );
        }
    }

    /// The RoPE factor tensors' values.
    fn rope_factor_values(&self, name: &str) -> Option<Vec<f32>> {
        let half = (self.rope_dims() / 2) as usize;
        match (self.rope_scaling, name) {
            (
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context,
                },
                "rope_freqs.weight",
            ) => {
                let old = original_context as f32;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                Some(
                    (0..half)
                        .map(|i| {
                            let freq = self
                                .rope_theta
                                .powf(-2.0 * i as f32 / self.rope_dims() as f32);
                            let wavelen = 2.0 * std::f32::consts::PI / freq;
                            if wavelen < high_wavelen {
                                1.0
                            } else if wavelen > low_wavelen {
                                factor
                            } else {
                                let smooth = (old / wavelen - low_freq_factor)
                                    / (high_freq_factor - low_freq_factor);
                                1.0 / ((1.0 - smooth) / factor + smooth)
                            }
                        })
                        .collect(),
                )
            }
            // Shapes of Phi-3.5's factors: short ones near 1, long ones
            // rising from 1 to about 50 over the pairs.
            (RopeScaling::LongRope { .. }, "rope_factors_short.weight") => Some(
                (0..half)
                    .map(|i| 1.0 + 0.2 * (i as f32 / half as f32).powi(2))
                    .collect(),
            ),
            (RopeScaling::LongRope { .. }, "rope_factors_long.weight") => Some(
                (0..half)
                    .map(|i| 1.0 + 49.0 * (i as f32 / half as f32).powi(3))
                    .collect(),
            ),
            _ => None,
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
            let values = preset
                .rope_factor_values(name)
                .unwrap_or_else(|| random_values(name, dims, opts.seed, i));
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
