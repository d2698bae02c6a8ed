//! One decoder-only transformer, described as data.
//!
//! qwen2, llama and gemma3 differ only in the flags below, all read from the
//! GGUF metadata and tensor index; the backends implement one forward pass
//! that follows them. Nothing is guessed from file names.

use gguf::{GgufFile, Metadata};

use crate::EngineError;

/// The architectures this engine runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])` (llama; its converter permutes Q/K to match).
    Normal,
    /// Halves `(x[i], x[i + n/2])` (GPT-NeoX; qwen2, gemma3).
    Neox,
}

/// The gate activation of the feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU: `gelu(gate) * up`.
    GeluTanh,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (≤ `head_dim`).
    pub rope_dims: usize,
    pub vocab_size: usize,
    /// Training context length from the metadata.
    pub context_length: usize,
    pub rope_theta: f32,
    /// RoPE base of sliding-window layers, when it differs (gemma3: 10,000).
    pub rope_theta_local: Option<f32>,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (gemma3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before the residual add (gemma3).
    pub post_norms: bool,
    pub activation: Activation,
    /// Token embeddings are multiplied by this (gemma3: √n_embd).
    pub embedding_scale: Option<f32>,
    /// Local attention window of sliding-window layers.
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer (the last of each group) is global; the others slide.
    pub sliding_window_pattern: usize,
    /// Multiplier of Q·K before the softmax.
    pub attention_scale: f32,
    /// The LM head is the token embedding (no `output.weight`).
    pub tied_output: bool,
}

impl ModelSpec {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        let m = file.metadata();
        let arch_name = m.architecture()?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| {
            EngineError::Invalid(format!(
                "unsupported architecture {arch_name:?} (supported: llama, qwen2, gemma3)"
            ))
        })?;
        let get = |suffix: &str| -> Result<usize, EngineError> { Ok(m.arch_u32(suffix)? as usize) };
        let opt = |suffix: &str| -> Option<usize> { m.arch_u32(suffix).ok().map(|v| v as usize) };

        let n_embd = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = opt("attention.head_count_kv").unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::Invalid(format!(
                "{n_heads} attention heads cannot be shared by {n_kv_heads} key/value heads"
            )));
        }
        let head_dim = opt("attention.key_length").unwrap_or(n_embd / n_heads);
        let rope_dims = opt("rope.dimension_count").unwrap_or(head_dim);
        let vocab_size = token_embedding_rows(file)?;
        let spec = ModelSpec {
            arch,
            n_layers: get("block_count")?,
            n_embd,
            n_ff: get("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            vocab_size,
            context_length: get("context_length")?,
            rope_theta: m.arch_f32("rope.freq_base").unwrap_or(10_000.0),
            rope_theta_local: (arch == Arch::Gemma3).then_some(10_000.0),
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen2 | Arch::Gemma3 => RopeStyle::Neox,
            },
            rms_eps: m
                .arch_f32("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Gemma3,
            post_norms: arch == Arch::Gemma3,
            activation: match arch {
                Arch::Gemma3 => Activation::GeluTanh,
                _ => Activation::Silu,
            },
            embedding_scale: (arch == Arch::Gemma3).then(|| (n_embd as f32).sqrt()),
            sliding_window: if arch == Arch::Gemma3 {
                opt("attention.sliding_window")
            } else {
                None
            },
            sliding_window_pattern: 6,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            tied_output: file.tensor("output.weight").is_none(),
        };
        spec.validate(m)?;
        Ok(spec)
    }

    fn validate(&self, _m: &Metadata) -> Result<(), EngineError> {
        let bad = |what: &str| Err(EngineError::Invalid(format!("model metadata: {what}")));
        if self.n_layers == 0 || self.n_embd == 0 || self.n_ff == 0 || self.head_dim == 0 {
            return bad("zero layers, embedding, feed-forward or head size");
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return bad("rope.dimension_count must be even and at most the head size");
        }
        if self.context_length == 0 {
            return bad("context_length is 0");
        }
        Ok(())
    }

    /// Whether layer `layer` attends only within the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !(layer + 1).is_multiple_of(self.sliding_window_pattern)
    }

    /// RoPE base for layer `layer`.
    pub fn rope_theta_for(&self, layer: usize) -> f32 {
        match self.rope_theta_local {
            Some(local) if self.is_sliding(layer) => local,
            _ => self.rope_theta,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn token_embedding_rows(file: &GgufFile) -> Result<usize, EngineError> {
    let t = file
        .tensor("token_embd.weight")
        .ok_or_else(|| EngineError::Tensor {
            name: "token_embd.weight".into(),
            reason: "missing from the file".into(),
        })?;
    if t.dims.len() != 2 {
        return Err(EngineError::Tensor {
            name: t.name.clone(),
            reason: format!("expected 2 dimensions, found {}", t.shape_string()),
        });
    }
    Ok(t.dims[1] as usize)
}
