//! The model's tensors, checked against the spec and typed per role.
//!
//! [`ModelWeights`] is one description of a model's weights for every
//! backend, generic over where a tensor lives: the CPU backend holds
//! [`Matrix`] (a byte range of the file mapping, in its GGUF block format)
//! and f32 vectors; the GPU backend maps the same structure to device
//! buffers with [`ModelWeights::map`]. Only the small norm, bias and RoPE
//! factor vectors are decoded to f32 at load.
//!
//! Fused tensors are split here, once: a fused `attn_qkv` (phi3) becomes
//! three row ranges of one tensor, a fused `ffn_up` of twice the
//! feed-forward width (phi3: gate rows first, then up) two. A row range of a
//! quantized matrix is itself a matrix (rows are whole blocks), so neither
//! backend knows a tensor was fused.

use gguf::{GgmlType, GgufFile};

use crate::spec::ModelSpec;
use crate::EngineError;

/// A weight matrix as stored in the file: `rows` rows of `cols` values each
/// (ggml dims `[cols, rows]`), `y = W·x` maps `cols` inputs to `rows` outputs.
/// It may be a row range of a larger tensor (a fused one).
#[derive(Clone, Debug)]
pub struct Matrix {
    /// The file's tensor this matrix is (part of).
    pub name: String,
    /// First row of the tensor this matrix starts at (0 unless fused).
    pub first_row: usize,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    offset: usize,
    len: usize,
    /// A row range of a fused tensor.
    part: bool,
}

impl Matrix {
    /// The matrix's blocks, borrowed from `file` (the file it was loaded from).
    pub fn data<'f>(&self, file: &'f GgufFile) -> &'f [u8] {
        &file.raw_bytes()[self.offset..self.offset + self.len]
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.len / self.rows
    }

    /// Rows `first..first + rows` as a matrix of their own.
    fn rows(&self, first: usize, rows: usize) -> Matrix {
        let row_bytes = self.row_bytes();
        Matrix {
            name: self.name.clone(),
            first_row: self.first_row + first,
            ty: self.ty,
            rows,
            cols: self.cols,
            offset: self.offset + first * row_bytes,
            len: rows * row_bytes,
            part: true,
        }
    }

    /// How errors and reports name it: the tensor, with the rows when a part.
    pub fn label(&self) -> String {
        if !self.part {
            self.name.clone()
        } else {
            format!(
                "{} rows {}..{}",
                self.name,
                self.first_row,
                self.first_row + self.rows
            )
        }
    }
}

/// Weights of one transformer block: `M` is a matrix, `V` a vector, wherever
/// they live. Shapes: `[out]` for vectors, `rows×cols` = `out×in` for matrices.
#[derive(Clone, Debug)]
pub struct LayerWeights<M, V> {
    pub attn_norm: V,              // [n_embd]
    pub wq: M,                     // q_dim × n_embd
    pub wk: M,                     // kv_dim × n_embd
    pub wv: M,                     // kv_dim × n_embd
    pub bq: Option<V>,             // [q_dim]
    pub bk: Option<V>,             // [kv_dim]
    pub bv: Option<V>,             // [kv_dim]
    pub q_norm: Option<V>,         // [head_dim]
    pub k_norm: Option<V>,         // [head_dim]
    pub wo: M,                     // n_embd × q_dim
    pub post_attn_norm: Option<V>, // [n_embd]
    pub ffn_norm: V,               // [n_embd]
    pub gate: M,                   // n_ff × n_embd
    pub up: M,                     // n_ff × n_embd
    pub down: M,                   // n_embd × n_ff
    pub post_ffn_norm: Option<V>,  // [n_embd]
}

impl<M, V> LayerWeights<M, V> {
    /// The same layer with every matrix through `m` and every vector through `v`.
    pub fn map<M2, V2, E>(
        &self,
        m: &mut impl FnMut(&M) -> Result<M2, E>,
        v: &mut impl FnMut(&V) -> Result<V2, E>,
    ) -> Result<LayerWeights<M2, V2>, E> {
        let mut opt = |x: &Option<V>| x.as_ref().map(&mut *v).transpose();
        Ok(LayerWeights {
            bq: opt(&self.bq)?,
            bk: opt(&self.bk)?,
            bv: opt(&self.bv)?,
            q_norm: opt(&self.q_norm)?,
            k_norm: opt(&self.k_norm)?,
            post_attn_norm: opt(&self.post_attn_norm)?,
            post_ffn_norm: opt(&self.post_ffn_norm)?,
            attn_norm: v(&self.attn_norm)?,
            ffn_norm: v(&self.ffn_norm)?,
            wq: m(&self.wq)?,
            wk: m(&self.wk)?,
            wv: m(&self.wv)?,
            wo: m(&self.wo)?,
            gate: m(&self.gate)?,
            up: m(&self.up)?,
            down: m(&self.down)?,
        })
    }

    /// The layer's matrices.
    pub fn matrices(&self) -> [&M; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
    }

    /// The layer's vectors that are present.
    pub fn vectors(&self) -> impl Iterator<Item = &V> {
        [&self.attn_norm, &self.ffn_norm].into_iter().chain(
            [
                &self.bq,
                &self.bk,
                &self.bv,
                &self.q_norm,
                &self.k_norm,
                &self.post_attn_norm,
                &self.post_ffn_norm,
            ]
            .into_iter()
            .flatten(),
        )
    }
}

/// Every weight of a model.
#[derive(Clone, Debug)]
pub struct ModelWeights<M, V> {
    pub token_embd: M, // vocab × n_embd
    pub layers: Vec<LayerWeights<M, V>>,
    pub output_norm: V, // [n_embd]
    pub output: M,      // vocab × n_embd (the token embedding when tied)
    /// Per-pair RoPE frequency divisors (Llama 3's `rope_freqs`, Phi-3's
    /// LongRoPE factors), `[rope_dims / 2]`.
    pub rope_factors: Option<V>,
}

/// The weights as the file holds them (the CPU backend's, and the source of
/// every upload).
pub type HostWeights = ModelWeights<Matrix, Vec<f32>>;

impl<M, V> ModelWeights<M, V> {
    /// The same model with every matrix through `m` and every vector through `v`.
    pub fn map<M2, V2, E>(
        &self,
        mut m: impl FnMut(&M) -> Result<M2, E>,
        mut v: impl FnMut(&V) -> Result<V2, E>,
    ) -> Result<ModelWeights<M2, V2>, E> {
        Ok(ModelWeights {
            layers: self
                .layers
                .iter()
                .map(|l| l.map(&mut m, &mut v))
                .collect::<Result<_, E>>()?,
            token_embd: m(&self.token_embd)?,
            output: m(&self.output)?,
            output_norm: v(&self.output_norm)?,
            rope_factors: self.rope_factors.as_ref().map(&mut v).transpose()?,
        })
    }

    /// Every matrix, layer by layer, then the embedding and the LM head (the
    /// same matrix twice when tied).
    pub fn matrices(&self) -> impl Iterator<Item = &M> {
        self.layers
            .iter()
            .flat_map(|l| l.matrices())
            .chain([&self.token_embd, &self.output])
    }

    /// Every vector present.
    pub fn vectors(&self) -> impl Iterator<Item = &V> {
        self.layers
            .iter()
            .flat_map(|l| l.vectors())
            .chain([&self.output_norm])
            .chain(self.rope_factors.as_ref())
    }
}

struct Loader<'f> {
    file: &'f GgufFile,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&gguf::TensorInfo, EngineError> {
        self.file.tensor(name).ok_or_else(|| EngineError::Tensor {
            name: name.to_string(),
            reason: "missing from the file".to_string(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, EngineError> {
        let t = self.info(name)?;
        if t.dims.len() != 2 || t.dims[0] as usize != cols || t.dims[1] as usize != rows {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                reason: format!("expected {cols}×{rows}, found {}", t.shape_string()),
            });
        }
        if !quant::can_dequantize(t.ty) {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                reason: format!("type {} is not supported", t.ty),
            });
        }
        Ok(Matrix {
            name: name.to_string(),
            first_row: 0,
            ty: t.ty,
            rows,
            cols,
            offset: (self.file.data_offset() + t.offset) as usize,
            len: t.n_bytes as usize,
            part: false,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let t = self.info(name)?;
        if t.dims.len() != 1 || t.dims[0] as usize != len {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                reason: format!("expected {len}, found {}", t.shape_string()),
            });
        }
        let mut out = vec![0f32; len];
        quant::dequantize(t.ty, self.file.tensor_data(t), &mut out).map_err(|e| {
            EngineError::Tensor {
                name: name.to_string(),
                reason: e.to_string(),
            }
        })?;
        // Norm and bias vectors are small and enter every token: one NaN or
        // infinity in them turns all output into garbage, so they are
        // scanned (the large matrices are not; `inspect --check` does that).
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                reason: format!("value {i} is {}; the file is corrupt", out[i]),
            });
        }
        Ok(out)
    }

    fn optional_vector(
        &self,
        present: bool,
        name: &str,
        len: usize,
    ) -> Result<Option<Vec<f32>>, EngineError> {
        present.then(|| self.vector(name, len)).transpose()
    }
}

impl HostWeights {
    pub fn load(file: &GgufFile, spec: &ModelSpec) -> Result<Self, EngineError> {
        let l = Loader { file };
        let (embd, ff, q, kv) = (spec.n_embd, spec.n_ff, spec.q_dim(), spec.kv_dim());
        let mut layers = Vec::with_capacity(spec.n_layers);
        for i in 0..spec.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            // Q, K and V: three tensors, or row ranges of one fused tensor.
            let (wq, wk, wv) = if l.has(&n("attn_qkv.weight")) {
                let fused = l.matrix(&n("attn_qkv.weight"), q + 2 * kv, embd)?;
                (fused.rows(0, q), fused.rows(q, kv), fused.rows(q + kv, kv))
            } else {
                (
                    l.matrix(&n("attn_q.weight"), q, embd)?,
                    l.matrix(&n("attn_k.weight"), kv, embd)?,
                    l.matrix(&n("attn_v.weight"), kv, embd)?,
                )
            };
            // Gate and up: two tensors, or one `ffn_up` of both (gate first).
            let (gate, up) = if l.has(&n("ffn_gate.weight")) {
                (
                    l.matrix(&n("ffn_gate.weight"), ff, embd)?,
                    l.matrix(&n("ffn_up.weight"), ff, embd)?,
                )
            } else {
                let fused = l.matrix(&n("ffn_up.weight"), 2 * ff, embd)?;
                (fused.rows(0, ff), fused.rows(ff, ff))
            };
            layers.push(LayerWeights {
                attn_norm: l.vector(&n("attn_norm.weight"), embd)?,
                wq,
                wk,
                wv,
                bq: l.optional_vector(spec.qkv_bias, &n("attn_q.bias"), q)?,
                bk: l.optional_vector(spec.qkv_bias, &n("attn_k.bias"), kv)?,
                bv: l.optional_vector(spec.qkv_bias, &n("attn_v.bias"), kv)?,
                q_norm: l.optional_vector(spec.qk_norm, &n("attn_q_norm.weight"), spec.head_dim)?,
                k_norm: l.optional_vector(spec.qk_norm, &n("attn_k_norm.weight"), spec.head_dim)?,
                wo: l.matrix(&n("attn_output.weight"), embd, q)?,
                post_attn_norm: l.optional_vector(
                    spec.post_norms,
                    &n("post_attention_norm.weight"),
                    embd,
                )?,
                ffn_norm: l.vector(&n("ffn_norm.weight"), embd)?,
                gate,
                up,
                down: l.matrix(&n("ffn_down.weight"), embd, ff)?,
                post_ffn_norm: l.optional_vector(
                    spec.post_norms,
                    &n("post_ffw_norm.weight"),
                    embd,
                )?,
            });
        }
        let token_embd = l.matrix("token_embd.weight", spec.vocab_size, embd)?;
        let output = if spec.tied_output {
            token_embd.clone()
        } else {
            l.matrix("output.weight", spec.vocab_size, embd)?
        };
        let rope_factors = match &spec.rope_factors {
            Some(name) => {
                let factors = l.vector(name, spec.rope_dims / 2)?;
                if let Some(i) = factors.iter().position(|&f| f <= 0.0) {
                    return Err(EngineError::Tensor {
                        name: name.clone(),
                        reason: format!(
                            "RoPE frequency factor {i} is {}; factors divide frequencies and must be positive",
                            factors[i]
                        ),
                    });
                }
                Some(factors)
            }
            None => None,
        };
        Ok(ModelWeights {
            token_embd,
            layers,
            output_norm: l.vector("output_norm.weight", embd)?,
            output,
            rope_factors,
        })
    }
}
