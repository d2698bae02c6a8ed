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

/// Context served when none is asked for and the model was trained on more.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;
/// Most positions a sequence may have, whatever the model says.
pub const MAX_CONTEXT: usize = 1 << 24;

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
                "unsupported architecture \"{}\" (supported: llama, qwen2, gemma3)",
                gguf::shown(arch_name)
            ))
        })?;
        let get = |suffix: &str| -> Result<usize, EngineError> { Ok(m.arch_u32(suffix)? as usize) };
        // A key that is absent takes its default; one that is present but
        // malformed is an error, never silently replaced.
        let opt = |suffix: &str| -> Result<Option<usize>, EngineError> {
            let key = format!("{arch_name}.{suffix}");
            Ok(match m.get(&key) {
                None => None,
                Some(_) => Some(m.get_u32(&key)? as usize),
            })
        };
        let opt_f32 = |suffix: &str| -> Result<Option<f32>, EngineError> {
            let key = format!("{arch_name}.{suffix}");
            Ok(match m.get(&key) {
                None => None,
                Some(_) => Some(m.get_f32(&key)?),
            })
        };

        let n_embd = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = opt("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::Invalid(format!(
                "{n_heads} attention heads cannot be shared by {n_kv_heads} key/value heads"
            )));
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(n_embd / n_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(EngineError::Invalid(format!(
                "model metadata: the head size {head_dim} (attention.key_length, or embedding_length / head_count) must be even and non-zero"
            )));
        }
        let rope_dims = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dims > head_dim || !rope_dims.is_multiple_of(2) {
            return Err(EngineError::Invalid(format!(
                "model metadata: rope.dimension_count {rope_dims} must be even and at most the head size {head_dim}"
            )));
        }
        let (vocab_size, embedding_length) = token_embedding_shape(file)?;
        if embedding_length != n_embd {
            return Err(EngineError::Invalid(format!(
                "model metadata: embedding_length is {n_embd} but token_embd.weight has rows of {embedding_length}"
            )));
        }
        let n_layers = get("block_count")?;
        check_block_count(file, n_layers)?;
        let spec = ModelSpec {
            arch,
            n_layers,
            n_embd,
            n_ff: get("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            vocab_size,
            context_length: get("context_length")?,
            rope_theta: opt_f32("rope.freq_base")?.unwrap_or(10_000.0),
            rope_theta_local: (arch == Arch::Gemma3).then_some(10_000.0),
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen2 | Arch::Gemma3 => RopeStyle::Neox,
            },
            rms_eps: opt_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Gemma3,
            post_norms: arch == Arch::Gemma3,
            activation: match arch {
                Arch::Gemma3 => Activation::GeluTanh,
                _ => Activation::Silu,
            },
            embedding_scale: (arch == Arch::Gemma3).then(|| (n_embd as f32).sqrt()),
            sliding_window: if arch == Arch::Gemma3 {
                opt("attention.sliding_window")?
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
        let bad = |what: String| Err(EngineError::Invalid(format!("model metadata: {what}")));
        if self.n_layers == 0 || self.n_embd == 0 || self.n_ff == 0 {
            return bad("zero layers, embedding or feed-forward size".into());
        }
        if self.context_length < 2 {
            return bad(format!(
                "context_length is {}; a model needs at least 2 positions (a prompt token and a generated one)",
                self.context_length
            ));
        }
        // These enter every layer; out of range they give garbage text, not an error.
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps <= 0.1) {
            return bad(format!(
                "attention.layer_norm_rms_epsilon is {}; it must be a number in (0, 0.1]",
                self.rms_eps
            ));
        }
        for (key, theta) in [
            ("rope.freq_base", Some(self.rope_theta)),
            (
                "rope.freq_base of the sliding-window layers",
                self.rope_theta_local,
            ),
        ] {
            if let Some(theta) = theta {
                if !(theta.is_finite() && theta > 1.0) {
                    return bad(format!(
                        "{key} is {theta}; it must be a finite number greater than 1"
                    ));
                }
            }
        }
        if self.sliding_window == Some(0) {
            return bad("attention.sliding_window is 0".into());
        }
        Ok(())
    }

    /// Positions per sequence to serve: `requested` (`--ctx-size`), or the
    /// training context up to [`DEFAULT_MAX_CONTEXT`]. More than the model
    /// was trained on is refused unless `beyond_training` allows it: past it
    /// the model's output degrades and the KV budget grows without bound.
    pub fn serving_context(
        &self,
        requested: Option<usize>,
        beyond_training: bool,
    ) -> Result<usize, EngineError> {
        let context = requested.unwrap_or_else(|| self.context_length.min(DEFAULT_MAX_CONTEXT));
        if context < 2 {
            return Err(EngineError::Invalid(format!(
                "--ctx-size {context}: it must be at least 2 (one prompt token and one generated)"
            )));
        }
        if context > self.context_length && !beyond_training {
            return Err(EngineError::Invalid(format!(
                "--ctx-size {context} is more than the {} positions the model was trained on; pass --allow-ctx-beyond-training to use it anyway",
                self.context_length
            )));
        }
        // Positions are u32 on the GPU and in the KV tables.
        if context > MAX_CONTEXT {
            return Err(EngineError::Invalid(format!(
                "--ctx-size {context} is more than {MAX_CONTEXT} positions"
            )));
        }
        Ok(context)
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

/// Every count read from the metadata is checked against the tensors present
/// before anything is sized by it: `block_count` may not name more blocks
/// than the file has (a hostile 2^32 would otherwise size the layer list).
fn check_block_count(file: &GgufFile, n_layers: usize) -> Result<(), EngineError> {
    let blocks: std::collections::HashSet<usize> = file
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse().ok())
        .collect();
    // Every block 0..n_layers must have tensors: a count past the number of
    // distinct blocks (which the file's size bounds) is refused before any
    // loop runs that far.
    if n_layers > blocks.len() {
        return Err(EngineError::Invalid(format!(
            "model metadata: block_count is {n_layers} but the file has tensors for {} blocks",
            blocks.len()
        )));
    }
    if let Some(missing) = (0..n_layers).find(|i| !blocks.contains(i)) {
        return Err(EngineError::Invalid(format!(
            "model metadata: block_count is {n_layers} but the file has no tensors for block {missing}"
        )));
    }
    Ok(())
}

/// `(rows, row length)` of the token embedding: the vocabulary and embedding sizes.
fn token_embedding_shape(file: &GgufFile) -> Result<(usize, usize), EngineError> {
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
    Ok((t.dims[1] as usize, t.dims[0] as usize))
}
