//! A plain forward pass of one sequence on the CPU that records every
//! intermediate result, under the names the GPU's traced forward pass uses
//! ([`crate::CudaModel::forward_traced`]), so that a GPU error can be pinned
//! to a layer and an operation.
//!
//! It follows `engine::cpu` step for step (f32, the same dot product, RMSNorm,
//! RoPE recurrence and softmax), for one prompt from position 0, without a
//! cache. The CPU backend stays the reference for results: the self-test
//! checks this pass's logits against it too.

use engine::spec::{Activation, ModelSpec, RopeStyle};
use engine::weights::{Matrix, ModelWeights};
use engine::EngineError;
use gguf::GgufFile;
use rayon::prelude::*;

/// Named intermediates (`tokens × width` each) and the last position's logits.
pub type Trace = Vec<(String, Vec<f32>)>;

pub fn forward_traced(
    file: &GgufFile,
    spec: &ModelSpec,
    weights: &ModelWeights,
    tokens: &[u32],
) -> Result<(Vec<f32>, Trace), EngineError> {
    let n = tokens.len();
    let (embd, q_dim, kv_dim, hd) = (spec.n_embd, spec.q_dim(), spec.kv_dim(), spec.head_dim);
    let mut trace = Trace::new();

    let table = &weights.token_embd;
    let mut x = vec![0f32; n * embd];
    for (row, &t) in x.chunks_exact_mut(embd).zip(tokens) {
        let bytes =
            &table.data(file)[t as usize * table.row_bytes()..(t as usize + 1) * table.row_bytes()];
        quant::dequantize(table.ty, bytes, row)?;
        if let Some(scale) = spec.embedding_scale {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    }

    for (layer, lw) in weights.layers.iter().enumerate() {
        let first = layer == 0;
        let normed = rms_norm_rows(&x, &lw.attn_norm, spec.rms_eps);
        let mut q = matmul(file, &lw.wq, &normed, n)?;
        let mut k = matmul(file, &lw.wk, &normed, n)?;
        let mut v = matmul(file, &lw.wv, &normed, n)?;
        if first {
            trace.push(("layer0.attn_norm".into(), normed.clone()));
            trace.push(("layer0.q_proj".into(), q.clone()));
            trace.push(("layer0.k_proj".into(), k.clone()));
            trace.push(("layer0.v_proj".into(), v.clone()));
        }
        if let (Some(bq), Some(bk), Some(bv)) = (&lw.bq, &lw.bk, &lw.bv) {
            add_rows(&mut q, bq);
            add_rows(&mut k, bk);
            add_rows(&mut v, bv);
        }
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            q = rms_norm_rows(&q, qn, spec.rms_eps);
            k = rms_norm_rows(&k, kn, spec.rms_eps);
        }
        let theta = spec.rope_theta_for(layer);
        rope(&mut q, n, hd, spec.rope_dims, theta, spec.rope_style);
        rope(&mut k, n, hd, spec.rope_dims, theta, spec.rope_style);
        let window = if spec.is_sliding(layer) {
            spec.sliding_window
        } else {
            None
        };
        let group = spec.n_heads / spec.n_kv_heads;
        let mut attn = vec![0f32; n * q_dim];
        attn.par_chunks_mut(hd).enumerate().for_each(|(task, out)| {
            let (t, h) = (task / spec.n_heads, task % spec.n_heads);
            let first_key = window.map_or(0, |w| (t + 1).saturating_sub(w));
            let kvh = h / group;
            let qh = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            let mut scores: Vec<f32> = (first_key..=t)
                .map(|p| {
                    dot(qh, &k[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd])
                        * spec.attention_scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (p, &s) in (first_key..=t).zip(&scores) {
                let weight = s / sum;
                for (o, &val) in out
                    .iter_mut()
                    .zip(&v[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd])
                {
                    *o += weight * val;
                }
            }
        });
        if first {
            trace.push(("layer0.q_rope".into(), q.clone()));
            trace.push(("layer0.k_rope".into(), k.clone()));
            trace.push(("layer0.attn".into(), attn.clone()));
        }
        let mut out = matmul(file, &lw.wo, &attn, n)?;
        if let Some(post) = &lw.post_attn_norm {
            out = rms_norm_rows(&out, post, spec.rms_eps);
        }
        add(&mut x, &out);
        if first {
            trace.push(("layer0.x_attn".into(), x.clone()));
        }

        let normed = rms_norm_rows(&x, &lw.ffn_norm, spec.rms_eps);
        let mut gate = matmul(file, &lw.gate, &normed, n)?;
        let up = matmul(file, &lw.up, &normed, n)?;
        for (g, &u) in gate.iter_mut().zip(&up) {
            *g = match spec.activation {
                Activation::Silu => *g / (1.0 + (-*g).exp()) * u,
                Activation::GeluTanh => {
                    let x = *g;
                    0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044_715 * x * x)).tanh()) * u
                }
            };
        }
        if first {
            trace.push(("layer0.ffn_norm".into(), normed.clone()));
            trace.push(("layer0.ffn_act".into(), gate.clone()));
        }
        let mut down = matmul(file, &lw.down, &gate, n)?;
        if let Some(post) = &lw.post_ffn_norm {
            down = rms_norm_rows(&down, post, spec.rms_eps);
        }
        add(&mut x, &down);
        trace.push((format!("layer{layer}.out"), x.clone()));
    }
    let last = rms_norm_rows(&x[(n - 1) * embd..], &weights.output_norm, spec.rms_eps);
    let logits = matmul(file, &weights.output, &last, 1)?;
    Ok((logits, trace))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// `y = x·Wᵀ`: x is n × cols, y is n × rows.
fn matmul(file: &GgufFile, w: &Matrix, x: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
    let data = w.data(file);
    let row_bytes = w.row_bytes();
    let columns: Vec<Vec<f32>> = (0..w.rows)
        .into_par_iter()
        .map(|r| -> Result<Vec<f32>, quant::QuantError> {
            let mut row = vec![0f32; w.cols];
            quant::dequantize(w.ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut row)?;
            Ok((0..n)
                .map(|t| dot(&row, &x[t * w.cols..(t + 1) * w.cols]))
                .collect())
        })
        .collect::<Result<_, _>>()?;
    let mut y = vec![0f32; n * w.rows];
    for (r, column) in columns.iter().enumerate() {
        for (t, &value) in column.iter().enumerate() {
            y[t * w.rows + r] = value;
        }
    }
    Ok(y)
}

/// RMSNorm of every `weight.len()`-wide piece of `x` (rows, or heads).
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
    out
}

fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// RoPE of every head of n rows at positions 0..n (the CPU backend's recurrence).
fn rope(x: &mut [f32], n: usize, head_dim: usize, rope_dims: usize, theta: f32, style: RopeStyle) {
    let row_len = x.len() / n;
    let half = rope_dims / 2;
    let theta_scale = theta.powf(-2.0 / rope_dims as f32);
    for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
        let mut cos_sin = Vec::with_capacity(half);
        let mut angle = t as f32;
        for _ in 0..half {
            cos_sin.push((angle.cos(), angle.sin()));
            angle *= theta_scale;
        }
        for head in row.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in cos_sin.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}
