//! One decoder-only transformer, described as data.
//!
//! Every architecture is the same block (RMSNorm → attention → residual,
//! RMSNorm → gated feed-forward → residual) with differences that are data:
//! a row of [`ARCHITECTURES`] for what the file does not say (RoPE pairing,
//! activation, embedding scale, the sliding-window period), then which
//! tensors are present (QKV bias, QK-norm, post-norms, fused QKV or gate+up,
//! RoPE frequency factors), then the metadata. A present but malformed key,
//! a RoPE scaling or a tensor the engine does not implement is refused by
//! name; the backends implement one forward pass that follows the spec.
//! Nothing is guessed from file names.

use gguf::{GgufFile, Metadata, Value};

use crate::EngineError;

/// The architectures this engine runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
    SmolLm3,
}

/// What an architecture fixes that its files do not say.
#[derive(Clone, Copy, Debug)]
pub struct ArchTraits {
    pub arch: Arch,
    pub name: &'static str,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    /// Token embeddings are multiplied by √n_embd (Gemma).
    pub scale_embeddings: bool,
    /// Of each group of this many layers, the last is global and the
    /// others slide (`attention.sliding_window_pattern` overrides it); 1:
    /// every layer slides. `None`: the architecture has no local attention
    /// (a window in its metadata is ignored, as llama.cpp ignores Phi-3's).
    pub sliding_period: Option<usize>,
    /// Window when the metadata gives none (Gemma 2: 4,096).
    pub default_window: Option<usize>,
    /// RoPE base of sliding-window layers when the metadata gives none
    /// (Gemma 3: 10,000); `None`: the global base.
    pub local_rope_base: Option<f32>,
    /// Every layer whose number (from 1) is a multiple of this skips RoPE (SmolLM3: 4).
    pub no_rope_period: Option<usize>,
}

/// The architectures, one row each. Adding one is a row here (plus, at
/// most, a kernel for an operation no other architecture has).
pub const ARCHITECTURES: [ArchTraits; 7] = {
    const BASE: ArchTraits = ArchTraits {
        arch: Arch::Llama,
        name: "llama",
        rope_style: RopeStyle::Normal,
        activation: Activation::Silu,
        scale_embeddings: false,
        // Mistral's files are llama files with a window for every layer.
        sliding_period: Some(1),
        default_window: None,
        local_rope_base: None,
        no_rope_period: None,
    };
    const NEOX: ArchTraits = ArchTraits {
        rope_style: RopeStyle::Neox,
        sliding_period: None,
        ..BASE
    };
    [
        BASE,
        ArchTraits {
            arch: Arch::Qwen2,
            name: "qwen2",
            ..NEOX
        },
        ArchTraits {
            arch: Arch::Qwen3,
            name: "qwen3",
            ..NEOX
        },
        ArchTraits {
            arch: Arch::Phi3,
            name: "phi3",
            ..NEOX
        },
        ArchTraits {
            arch: Arch::Gemma2,
            name: "gemma2",
            activation: Activation::GeluTanh,
            scale_embeddings: true,
            sliding_period: Some(2),
            default_window: Some(4096),
            ..NEOX
        },
        ArchTraits {
            arch: Arch::Gemma3,
            name: "gemma3",
            activation: Activation::GeluTanh,
            scale_embeddings: true,
            sliding_period: Some(6),
            local_rope_base: Some(10_000.0),
            ..NEOX
        },
        ArchTraits {
            arch: Arch::SmolLm3,
            name: "smollm3",
            sliding_period: None,
            no_rope_period: Some(4),
            ..BASE
        },
    ]
};

impl Arch {
    pub fn traits(self) -> &'static ArchTraits {
        ARCHITECTURES
            .iter()
            .find(|t| t.arch == self)
            .expect("every architecture has a row")
    }

    pub fn name(self) -> &'static str {
        self.traits().name
    }

    pub fn from_name(name: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.arch)
    }

    /// The names of every architecture, for messages.
    pub fn names() -> Vec<&'static str> {
        ARCHITECTURES.iter().map(|t| t.name).collect()
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

/// What differs from layer to layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerPlan {
    /// Attends only within `ModelSpec::sliding_window`.
    pub sliding: bool,
    /// Rotates Q and K (SmolLM3 leaves every fourth layer unrotated).
    pub rope: bool,
    /// RoPE base.
    pub rope_theta: f32,
    /// Positions are multiplied by this before rotating (linear scaling).
    pub rope_freq_scale: f32,
}

/// Context served when none is asked for and the model was trained on more.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;
/// Most positions a sequence may have, whatever the model says.
pub const MAX_CONTEXT: usize = 1 << 24;

/// Tensors outside the blocks that the engine reads.
const GLOBAL_TENSORS: [&str; 6] = [
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
];
/// Tensors of a block that the engine reads (after `blk.N.`).
const BLOCK_TENSORS: [&str; 17] = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_qkv.weight",
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
    "attn_output.weight",
    "post_attention_norm.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "post_ffw_norm.weight",
];

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
    pub rope_style: RopeStyle,
    /// cos and sin are multiplied by this (`rope.scaling.attn_factor`; LongRoPE).
    pub rope_attn_factor: f32,
    /// The tensor of per-pair frequency divisors, `[rope_dims / 2]`: Llama
    /// 3's `rope_freqs`, or Phi-3's LongRoPE short or long factors.
    pub rope_factors: Option<String>,
    pub rms_eps: f32,
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (gemma3, qwen3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before the residual add (gemma2/3).
    pub post_norms: bool,
    pub activation: Activation,
    /// Token embeddings are multiplied by this (Gemma: √n_embd).
    pub embedding_scale: Option<f32>,
    /// Local attention window of sliding-window layers: a position sees
    /// itself and the `window - 1` before it.
    pub sliding_window: Option<usize>,
    /// Multiplier of Q·K before the softmax.
    pub attention_scale: f32,
    /// Attention scores pass through `cap · tanh(score / cap)` (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Logits pass through `cap · tanh(logit / cap)` (Gemma 2).
    pub final_softcap: Option<f32>,
    /// The LM head is the token embedding (no `output.weight`).
    pub tied_output: bool,
    /// Per layer: window, RoPE.
    pub layers: Vec<LayerPlan>,
}

/// Typed, checked access to one architecture's metadata keys.
struct Keys<'m> {
    m: &'m Metadata,
    arch: &'m str,
}

impl Keys<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn get(&self, suffix: &str) -> Result<usize, EngineError> {
        Ok(self.m.arch_u32(suffix)? as usize)
    }

    // A key that is absent takes its default; one that is present but
    // malformed is an error, never silently replaced.
    fn opt(&self, suffix: &str) -> Result<Option<usize>, EngineError> {
        let key = self.key(suffix);
        Ok(match self.m.get(&key) {
            None => None,
            Some(_) => Some(self.m.get_u32(&key)? as usize),
        })
    }

    fn opt_f32(&self, suffix: &str) -> Result<Option<f32>, EngineError> {
        let key = self.key(suffix);
        Ok(match self.m.get(&key) {
            None => None,
            Some(_) => Some(self.m.get_f32(&key)?),
        })
    }

    fn opt_string(&self, suffix: &str) -> Result<Option<&str>, EngineError> {
        let key = self.key(suffix);
        Ok(match self.m.get(&key) {
            None => None,
            Some(_) => Some(self.m.get_str(&key)?),
        })
    }
}

impl ModelSpec {
    /// The spec of `file`, serving contexts up to the training context.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        Self::from_gguf_for_context(file, None)
    }

    /// The spec of `file` for sequences of up to `context` positions (this
    /// picks Phi-3's long or short RoPE factors, as llama.cpp does).
    pub fn from_gguf_for_context(
        file: &GgufFile,
        context: Option<usize>,
    ) -> Result<Self, EngineError> {
        let m = file.metadata();
        let arch_name = m.architecture()?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| {
            EngineError::Invalid(format!(
                "unsupported architecture \"{}\" (supported: {})",
                gguf::shown(arch_name),
                Arch::names().join(", ")
            ))
        })?;
        let traits = arch.traits();
        let keys = Keys { m, arch: arch_name };
        check_tensor_names(file)?;

        let n_embd = keys.get("embedding_length")?;
        let n_heads = keys.get("attention.head_count")?;
        let n_kv_heads = keys.opt("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::Invalid(format!(
                "{n_heads} attention heads cannot be shared by {n_kv_heads} key/value heads"
            )));
        }
        let head_dim = keys
            .opt("attention.key_length")?
            .unwrap_or(n_embd / n_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(EngineError::Invalid(format!(
                "model metadata: the head size {head_dim} (attention.key_length, or embedding_length / head_count) must be even and non-zero"
            )));
        }
        if let Some(value_length) = keys.opt("attention.value_length")? {
            if value_length != head_dim {
                return Err(EngineError::Invalid(format!(
                    "model metadata: attention.value_length {value_length} differs from the key length {head_dim}, which worker-orcd does not implement"
                )));
            }
        }
        let rope_dims = keys.opt("rope.dimension_count")?.unwrap_or(head_dim);
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
        let n_layers = keys.get("block_count")?;
        check_block_count(file, n_layers)?;
        for feature in ["expert_count", "expert_used_count"] {
            if keys.opt(feature)?.is_some_and(|n| n > 0) {
                return Err(EngineError::Invalid(format!(
                    "model metadata: {arch_name}.{feature} says this is a mixture-of-experts model, which worker-orcd does not implement"
                )));
            }
        }
        let context_length = keys.get("context_length")?;
        let has = |name: &str| file.tensor(name).is_some();

        // RoPE scaling: linear (positions scaled), Llama 3 (frequency
        // factors in `rope_freqs`), LongRoPE (Phi-3's long and short factors).
        let scaling = keys.opt_string("rope.scaling.type")?.unwrap_or("none");
        let factor = match keys.opt_f32("rope.scaling.factor")? {
            Some(f) => Some(f),
            None => keys.opt_f32("rope.scale_linear")?,
        };
        let original_context = keys
            .opt("rope.scaling.original_context_length")?
            .unwrap_or(context_length);
        let mut rope_freq_scale = 1.0;
        let rope_factors = match scaling {
            "none" | "linear" | "llama3" | "longrope" => {
                if let Some(f) = factor.filter(|&f| f != 0.0 && scaling == "linear") {
                    if !(f.is_finite() && f > 0.0) {
                        return Err(EngineError::Invalid(format!(
                            "model metadata: rope.scaling.factor is {f}; it must be a positive number"
                        )));
                    }
                    rope_freq_scale = 1.0 / f;
                }
                if has("rope_freqs.weight") {
                    Some("rope_freqs.weight".to_string())
                } else if has("rope_factors_long.weight") || has("rope_factors_short.weight") {
                    // llama.cpp's rule: the long factors once a sequence
                    // may pass the original context.
                    let long = context.is_some_and(|c| c > original_context);
                    Some(
                        if long {
                            "rope_factors_long.weight"
                        } else {
                            "rope_factors_short.weight"
                        }
                        .to_string(),
                    )
                } else if scaling == "llama3" || scaling == "longrope" {
                    return Err(EngineError::Invalid(format!(
                        "model metadata: rope.scaling.type is {scaling} but the file has no RoPE frequency factors (rope_freqs.weight, rope_factors_long.weight)"
                    )));
                } else {
                    None
                }
            }
            other => {
                return Err(EngineError::Invalid(format!(
                    "model metadata: RoPE scaling \"{}\" is not implemented by worker-orcd (it implements none, linear, llama3 frequency factors and longrope)",
                    gguf::shown(other)
                )))
            }
        };
        let rope_attn_factor = keys.opt_f32("rope.scaling.attn_factor")?.unwrap_or(1.0);

        let rope_theta = keys.opt_f32("rope.freq_base")?.unwrap_or(10_000.0);
        let rope_theta_local = match keys.opt_f32("rope.freq_base_swa")? {
            Some(base) => Some(base),
            None => traits.local_rope_base,
        };
        let sliding_window = match traits.sliding_period {
            Some(_) => keys
                .opt("attention.sliding_window")?
                .or(traits.default_window)
                .filter(|&w| w > 0),
            None => None,
        };
        let sliding = sliding_pattern(&keys, traits, n_layers, sliding_window.is_some())?;
        let layers = (0..n_layers)
            .map(|i| LayerPlan {
                sliding: sliding[i],
                rope: traits
                    .no_rope_period
                    .is_none_or(|p| !(i + 1).is_multiple_of(p)),
                rope_theta: match rope_theta_local {
                    Some(local) if sliding[i] => local,
                    _ => rope_theta,
                },
                // llama.cpp scales only the global layers' positions.
                rope_freq_scale: if sliding[i] { 1.0 } else { rope_freq_scale },
            })
            .collect();
        // Gemma 2 caps at 50 and 30 unless its file says otherwise (as in llama.cpp).
        let softcap = |suffix: &str, default: Option<f32>| -> Result<Option<f32>, EngineError> {
            let cap = keys.opt_f32(suffix)?.or(default).filter(|&c| c != 0.0);
            if let Some(c) = cap {
                if !(c.is_finite() && c > 0.0) {
                    return Err(EngineError::Invalid(format!(
                        "model metadata: {arch_name}.{suffix} is {c}; it must be a positive number"
                    )));
                }
            }
            Ok(cap)
        };
        let attn_softcap = match arch {
            Arch::Gemma2 => softcap("attn_logit_softcapping", Some(50.0))?,
            _ => None,
        };
        let final_softcap = match arch {
            Arch::Gemma2 => softcap("final_logit_softcapping", Some(30.0))?,
            Arch::Gemma3 => softcap("final_logit_softcapping", None)?,
            _ => None,
        };
        // Gemma 2 27B scales queries by 1/√(n_embd / n_heads) (its
        // query_pre_attn_scalar, which the file does not carry; llama.cpp
        // tells it by its 46 layers), every other model by 1/√head_dim.
        let gemma_27b = matches!(arch, Arch::Gemma2 | Arch::Gemma3)
            && n_layers == if arch == Arch::Gemma2 { 46 } else { 62 };
        let attention_scale = if gemma_27b {
            1.0 / ((n_embd / n_heads) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };

        let spec = ModelSpec {
            arch,
            n_layers,
            n_embd,
            n_ff: keys.get("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            vocab_size,
            context_length,
            rope_theta,
            rope_style: traits.rope_style,
            rope_attn_factor,
            rope_factors,
            rms_eps: keys
                .opt_f32("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            qkv_bias: has("blk.0.attn_q.bias"),
            qk_norm: has("blk.0.attn_q_norm.weight"),
            post_norms: has("blk.0.post_attention_norm.weight"),
            activation: traits.activation,
            embedding_scale: traits.scale_embeddings.then(|| (n_embd as f32).sqrt()),
            sliding_window,
            attention_scale,
            attn_softcap,
            final_softcap,
            tied_output: !has("output.weight"),
            layers,
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
        for (key, theta) in std::iter::once(("rope.freq_base", self.rope_theta)).chain(
            self.layers
                .iter()
                .map(|l| ("rope.freq_base of the sliding-window layers", l.rope_theta)),
        ) {
            if !(theta.is_finite() && theta > 1.0) {
                return bad(format!(
                    "{key} is {theta}; it must be a finite number greater than 1"
                ));
            }
        }
        if !(self.rope_attn_factor.is_finite() && self.rope_attn_factor > 0.0) {
            return bad(format!(
                "rope.scaling.attn_factor is {}; it must be a positive number",
                self.rope_attn_factor
            ));
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
        self.layers[layer].sliding
    }

    /// The window of layer `layer`, if it slides.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding(layer))
    }

    /// RoPE base for layer `layer`.
    pub fn rope_theta_for(&self, layer: usize) -> f32 {
        self.layers[layer].rope_theta
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Which layers slide: `attention.sliding_window_pattern` (a period, or one
/// flag per layer), else the architecture's period.
fn sliding_pattern(
    keys: &Keys<'_>,
    traits: &ArchTraits,
    n_layers: usize,
    has_window: bool,
) -> Result<Vec<bool>, EngineError> {
    if !has_window {
        return Ok(vec![false; n_layers]);
    }
    let key = keys.key("attention.sliding_window_pattern");
    let period = match keys.m.get(&key) {
        None => traits.sliding_period.unwrap_or(1),
        Some(Value::Array(gguf::Array::Bool(flags))) => {
            if flags.len() != n_layers {
                return Err(EngineError::Invalid(format!(
                    "model metadata: {key} has {} flags for {n_layers} layers",
                    flags.len()
                )));
            }
            return Ok(flags.clone());
        }
        Some(_) => keys.m.get_u32(&key)? as usize,
    };
    if period == 0 {
        return Err(EngineError::Invalid(format!("model metadata: {key} is 0")));
    }
    // Of each `period` layers the last is global (period 1: all slide).
    Ok((0..n_layers)
        .map(|i| period == 1 || !(i + 1).is_multiple_of(period))
        .collect())
}

/// Every tensor must be one the engine reads: a tensor it does not know
/// means a feature it does not implement (a mixture of experts, an output
/// bias, attention sinks), and ignoring it would give wrong text quietly.
fn check_tensor_names(file: &GgufFile) -> Result<(), EngineError> {
    for t in file.tensors() {
        let known = match t.name.strip_prefix("blk.") {
            Some(rest) => rest
                .split_once('.')
                .is_some_and(|(_, suffix)| BLOCK_TENSORS.contains(&suffix)),
            None => GLOBAL_TENSORS.contains(&t.name.as_str()),
        };
        if !known {
            return Err(EngineError::Tensor {
                name: gguf::shown(&t.name).to_string(),
                reason: "worker-orcd does not implement what this tensor is for, and running without it would be wrong".into(),
            });
        }
    }
    Ok(())
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

impl ModelSpec {
    /// The features of this model the forward pass uses, in words (for
    /// `inspect` and load reports).
    pub fn features(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{} layers, {} heads ({} key/value) of {}, feed-forward {}, vocabulary {}",
            self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.n_ff, self.vocab_size
        )];
        let mut rope = format!(
            "RoPE {} over {} of {} dimensions, base {}",
            match self.rope_style {
                RopeStyle::Normal => "normal",
                RopeStyle::Neox => "NeoX",
            },
            self.rope_dims,
            self.head_dim,
            self.rope_theta
        );
        if let Some(f) = &self.rope_factors {
            rope += &format!(", frequency factors from {f}");
        }
        if let Some(scale) = self
            .layers
            .iter()
            .map(|l| l.rope_freq_scale)
            .find(|&s| s != 1.0)
        {
            rope += &format!(", linear scaling {}", 1.0 / scale);
        }
        if self.rope_attn_factor != 1.0 {
            rope += &format!(", attention factor {}", self.rope_attn_factor);
        }
        let unrotated = self.layers.iter().filter(|l| !l.rope).count();
        if unrotated > 0 {
            rope += &format!(", {unrotated} layers without RoPE");
        }
        out.push(rope);
        if let Some(w) = self.sliding_window {
            let sliding = self.layers.iter().filter(|l| l.sliding).count();
            out.push(format!(
                "sliding-window attention ({w} positions) on {sliding} of {} layers",
                self.n_layers
            ));
        }
        for (on, what) in [
            (self.qkv_bias, "QKV bias"),
            (self.qk_norm, "QK-norm"),
            (self.post_norms, "post-norms"),
            (self.tied_output, "LM head tied to the embedding"),
        ] {
            if on {
                out.push(what.to_string());
            }
        }
        out.push(
            match self.activation {
                Activation::Silu => "SwiGLU",
                Activation::GeluTanh => "GeGLU (tanh)",
            }
            .to_string(),
        );
        if let Some(cap) = self.attn_softcap {
            out.push(format!("attention soft-cap {cap}"));
        }
        if let Some(cap) = self.final_softcap {
            out.push(format!("final logit soft-cap {cap}"));
        }
        out
    }
}
