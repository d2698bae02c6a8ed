//! The model's tensors, checked against the spec and typed per role.
//!
//! Matrices stay in the file mapping in their GGUF block format and are
//! referred to by byte range; only the small norm and bias vectors are
//! decoded to f32 at load.

use gguf::{GgmlType, GgufFile};

use crate::spec::ModelSpec;
use crate::EngineError;

/// A weight matrix as stored in the file: `rows` rows of `cols` values each
/// (ggml dims `[cols, rows]`), `y = W·x` maps `cols` inputs to `rows` outputs.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    offset: usize,
    len: usize,
}

impl Matrix {
    /// The matrix's blocks, borrowed from `file` (the file it was loaded from).
    pub fn data<'f>(&self, file: &'f GgufFile) -> &'f [u8] {
        &file_bytes(file)[self.offset..self.offset + self.len]
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.len / self.rows
    }
}

fn file_bytes(file: &GgufFile) -> &[u8] {
    file.raw_bytes()
}

/// Weights of one transformer block.
/// Shapes: `[out]` for vectors, `rows×cols` = `out×in` for matrices.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,              // [n_embd]
    pub wq: Matrix,                       // q_dim × n_embd
    pub wk: Matrix,                       // kv_dim × n_embd
    pub wv: Matrix,                       // kv_dim × n_embd
    pub bq: Option<Vec<f32>>,             // [q_dim]
    pub bk: Option<Vec<f32>>,             // [kv_dim]
    pub bv: Option<Vec<f32>>,             // [kv_dim]
    pub q_norm: Option<Vec<f32>>,         // [head_dim]
    pub k_norm: Option<Vec<f32>>,         // [head_dim]
    pub wo: Matrix,                       // n_embd × q_dim
    pub post_attn_norm: Option<Vec<f32>>, // [n_embd]
    pub ffn_norm: Vec<f32>,               // [n_embd]
    pub gate: Matrix,                     // n_ff × n_embd
    pub up: Matrix,                       // n_ff × n_embd
    pub down: Matrix,                     // n_embd × n_ff
    pub post_ffn_norm: Option<Vec<f32>>,  // [n_embd]
}

#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub token_embd: Matrix, // vocab × n_embd
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>, // [n_embd]
    pub output: Matrix,        // vocab × n_embd (the token embedding when tied)
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
            ty: t.ty,
            rows,
            cols,
            offset: (self.file.data_offset() + t.offset) as usize,
            len: t.n_bytes as usize,
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

impl ModelWeights {
    pub fn load(file: &GgufFile, spec: &ModelSpec) -> Result<Self, EngineError> {
        let l = Loader { file };
        let (embd, ff, q, kv) = (spec.n_embd, spec.n_ff, spec.q_dim(), spec.kv_dim());
        let mut layers = Vec::with_capacity(spec.n_layers);
        for i in 0..spec.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(LayerWeights {
                attn_norm: l.vector(&n("attn_norm.weight"), embd)?,
                wq: l.matrix(&n("attn_q.weight"), q, embd)?,
                wk: l.matrix(&n("attn_k.weight"), kv, embd)?,
                wv: l.matrix(&n("attn_v.weight"), kv, embd)?,
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
                gate: l.matrix(&n("ffn_gate.weight"), ff, embd)?,
                up: l.matrix(&n("ffn_up.weight"), ff, embd)?,
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
        Ok(ModelWeights {
            token_embd,
            layers,
            output_norm: l.vector("output_norm.weight", embd)?,
            output,
        })
    }
}
