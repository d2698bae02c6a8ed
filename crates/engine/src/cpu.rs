//! The CPU backend: the reference forward pass, f32 activations, weights
//! dequantized on the fly from the file mapping, rows spread over threads.

use std::sync::Arc;

use gguf::GgufFile;
use quant::{Activations, MatmulInput};
use rayon::prelude::*;

use crate::kv::{KvCache, KvPool};
use crate::spec::{Activation, ModelSpec, RopeStyle};
use crate::weights::{HostWeights, Matrix};
use crate::EngineError;

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (teacher-forced evaluation).
    All,
    /// None (a prefill chunk that is not the prompt's last).
    None,
}

/// One sequence's part of a batched forward pass.
pub struct Segment<'a> {
    pub kv: &'a mut KvCache,
    /// Tokens at positions `kv.len()..`.
    pub tokens: &'a [u32],
    pub logits: Logits,
}

pub struct CpuModel {
    file: Arc<GgufFile>,
    spec: ModelSpec,
    weights: HostWeights,
    activations: Activations,
}

/// Named intermediate results of a forward pass (`tokens × width` values
/// each): every step of layer 0, then the residual stream after each layer.
/// A backend under test records the same names, so that a difference can be
/// pinned to a layer and an operation.
pub type Trace = Vec<(String, Vec<f32>)>;

impl CpuModel {
    pub fn load(file: Arc<GgufFile>) -> Result<Self, EngineError> {
        Self::load_for_context(file, None)
    }

    /// [`Self::load`] for sequences of up to `context` positions (which
    /// decides Phi-3's RoPE factors).
    pub fn load_for_context(
        file: Arc<GgufFile>,
        context: Option<usize>,
    ) -> Result<Self, EngineError> {
        let spec = ModelSpec::from_gguf_for_context(&file, context)?;
        let weights = HostWeights::load(&file, &spec)?;
        Ok(CpuModel {
            file,
            spec,
            weights,
            activations: Activations::F32,
        })
    }

    /// Use `activations` for every matrix product: `F32` (the default) is
    /// the reference; `Q8` quantizes activations to 8 bits per block, as
    /// llama.cpp's CPU backend does, and is faster.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    pub fn activations(&self) -> Activations {
        self.activations
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// A cache for `context` positions, its memory not limited by a pool.
    pub fn new_cache(&self, context: usize) -> KvCache {
        KvCache::new(self.spec.n_layers, self.spec.kv_dim(), context)
    }

    /// A cache for `context` positions whose pages are drawn from `pool`.
    pub fn new_cache_in(&self, pool: &KvPool, context: usize) -> KvCache {
        KvCache::new_in(pool, self.spec.n_layers, self.spec.kv_dim(), context)
    }

    /// Run `tokens` at positions `kv.len()..`, append their keys and values
    /// to `kv`, and return logits (`n × vocab` for [`Logits::All`]).
    pub fn forward(
        &self,
        kv: &mut KvCache,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        let mut batch = [Segment {
            kv,
            tokens,
            logits: which,
        }];
        Ok(self.forward_batch(&mut batch)?.pop().unwrap_or_default())
    }

    /// [`Self::forward`] of one sequence that also records its intermediate
    /// results ([`Trace`]); returns the last position's logits.
    pub fn forward_traced(
        &self,
        kv: &mut KvCache,
        tokens: &[u32],
    ) -> Result<(Vec<f32>, Trace), EngineError> {
        let mut trace = Trace::new();
        let mut batch = [Segment {
            kv,
            tokens,
            logits: Logits::Last,
        }];
        let logits = self
            .forward_inner(&mut batch, Some(&mut trace))?
            .pop()
            .unwrap_or_default();
        Ok((logits, trace))
    }

    /// One forward pass over several sequences at once: their tokens share
    /// every matrix product (each weight is read once per step), attention
    /// runs per sequence over its own cache. Returns each segment's logits.
    pub fn forward_batch(&self, batch: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.forward_inner(batch, None)
    }

    fn forward_inner(
        &self,
        batch: &mut [Segment<'_>],
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let spec = &self.spec;
        for seg in batch.iter() {
            crate::backend::check_segment(spec, seg.tokens, seg.kv.len(), seg.kv.capacity())?;
        }
        // Reserve every cache's pages first, so a full pool fails before any work.
        for seg in batch.iter_mut() {
            seg.kv.reserve(seg.kv.len() + seg.tokens.len())?;
        }
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let n = tokens.len();
        let embd = spec.n_embd;
        let w = &self.weights;
        // Row range of each segment in the batch.
        let mut ranges = Vec::with_capacity(batch.len());
        let mut row = 0;
        for seg in batch.iter() {
            ranges.push(row..row + seg.tokens.len());
            row += seg.tokens.len();
        }

        // Residual stream, n × n_embd.
        let mut x = self.embed(&tokens)?;
        let mut normed = vec![0f32; n * embd];

        let mut record = |name: &dyn Fn() -> String, values: &[f32]| {
            if let Some(trace) = trace.as_deref_mut() {
                trace.push((name(), values.to_vec()));
            }
        };
        for (layer, lw) in w.layers.iter().enumerate() {
            let first = layer == 0;
            let mut record0 = |name: &str, values: &[f32]| {
                if first {
                    record(&|| format!("layer0.{name}"), values);
                }
            };
            // Attention block.
            rms_norm_rows(&x, &lw.attn_norm, spec.rms_eps, &mut normed);
            let input = MatmulInput::new(&normed, n, embd)?;
            // n × q_dim, n × kv_dim, n × kv_dim in one pass over the pool.
            let [mut q, mut k, mut v] = self.matmul_many(&[&lw.wq, &lw.wk, &lw.wv], &input)?;
            drop(input);
            record0("attn_norm", &normed);
            record0("q_proj", &q);
            record0("k_proj", &k);
            record0("v_proj", &v);
            if let (Some(bq), Some(bk), Some(bv)) = (&lw.bq, &lw.bk, &lw.bv) {
                add_bias_rows(&mut q, bq);
                add_bias_rows(&mut k, bk);
                add_bias_rows(&mut v, bv);
            }
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                rms_norm_heads(&mut q, qn, spec.rms_eps);
                rms_norm_heads(&mut k, kn, spec.rms_eps);
            }
            let window = spec.window(layer);
            let rope = Rope::of_layer(spec, layer, w.rope_factors.as_deref());
            let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
            let mut attn = vec![0f32; n * q_dim]; // n × q_dim
            for (seg, r) in batch.iter_mut().zip(&ranges) {
                let (m, start) = (r.len(), seg.kv.len());
                let q_seg = &mut q[r.start * q_dim..r.end * q_dim];
                let k_seg = &mut k[r.start * kv_dim..r.end * kv_dim];
                if let Some(rope) = &rope {
                    rope.apply(q_seg, m, start);
                    rope.apply(k_seg, m, start);
                }
                seg.kv
                    .append(layer, k_seg, &v[r.start * kv_dim..r.end * kv_dim]);
                let (keys, values) = seg.kv.layer(layer);
                let out = attention(spec, q_seg, keys, values, start, m, window);
                attn[r.start * q_dim..r.end * q_dim].copy_from_slice(&out);
            }
            record0("q_rope", &q);
            record0("k_rope", &k);
            record0("attn", &attn);
            let mut out = self.matmul(&lw.wo, &attn, n)?; // n × n_embd
            if let Some(post) = &lw.post_attn_norm {
                rms_norm_in_place(&mut out, post, spec.rms_eps, embd);
            }
            add_in_place(&mut x, &out);
            record0("x_attn", &x);

            // Feed-forward block.
            rms_norm_rows(&x, &lw.ffn_norm, spec.rms_eps, &mut normed);
            let input = MatmulInput::new(&normed, n, embd)?;
            let [mut gate, up] = self.matmul_many(&[&lw.gate, &lw.up], &input)?; // n × n_ff each
            drop(input);
            gated_activation(&mut gate, &up, spec.activation);
            record0("ffn_norm", &normed);
            record0("ffn_act", &gate);
            let mut down = self.matmul(&lw.down, &gate, n)?; // n × n_embd
            if let Some(post) = &lw.post_ffn_norm {
                rms_norm_in_place(&mut down, post, spec.rms_eps, embd);
            }
            add_in_place(&mut x, &down);
            record(&|| format!("layer{layer}.out"), &x);
        }
        for seg in batch.iter_mut() {
            seg.kv.commit(seg.tokens.len());
        }

        // Rows whose logits are wanted, in batch order.
        let mut wanted: Vec<usize> = Vec::new();
        for (seg, r) in batch.iter().zip(&ranges) {
            match seg.logits {
                Logits::Last => wanted.push(r.end - 1),
                Logits::All => wanted.extend(r.clone()),
                Logits::None => {}
            }
        }
        let mut final_normed = vec![0f32; wanted.len() * embd];
        for (out, &r) in final_normed.chunks_exact_mut(embd).zip(&wanted) {
            rms_norm(
                &x[r * embd..(r + 1) * embd],
                &w.output_norm,
                spec.rms_eps,
                out,
            );
        }
        let mut logits = if wanted.is_empty() {
            Vec::new()
        } else {
            self.matmul(&w.output, &final_normed, wanted.len())?
        };
        crate::backend::final_softcap(spec, &mut logits);
        let modes: Vec<Logits> = batch.iter().map(|s| s.logits).collect();
        let lengths: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        Ok(crate::backend::split_rows(
            &logits,
            spec.vocab_size,
            &modes,
            &lengths,
        ))
    }

    /// Rows of the token embedding (scaled where the spec says), n × n_embd.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let embd = self.spec.n_embd;
        let table = &self.weights.token_embd;
        let data = table.data(&self.file);
        let row_bytes = table.row_bytes();
        let mut x = vec![0f32; tokens.len() * embd];
        for (row, &t) in x.chunks_exact_mut(embd).zip(tokens) {
            let t = t as usize;
            quant::dequantize(table.ty, &data[t * row_bytes..(t + 1) * row_bytes], row)?;
            if let Some(scale) = self.spec.embedding_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(x)
    }

    /// `y = x·Wᵀ` for `n` input rows: x is n × cols, y is n × rows.
    fn matmul(&self, w: &Matrix, x: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
        let input = MatmulInput::new(x, n, w.cols)?;
        self.matmul_input(w, &input)
    }

    /// Several products of one input (`N` matrices of `input`'s width) in
    /// one pass over the thread pool.
    fn matmul_many<const N: usize>(
        &self,
        ws: &[&Matrix; N],
        input: &MatmulInput<'_>,
    ) -> Result<[Vec<f32>; N], EngineError> {
        let mut outs: [Vec<f32>; N] =
            std::array::from_fn(|i| vec![0f32; input.tokens() * ws[i].rows]);
        let mut products: Vec<quant::Product<'_>> = ws
            .iter()
            .zip(outs.iter_mut())
            .map(|(w, y)| quant::Product {
                ty: w.ty,
                w: w.data(&self.file),
                rows: w.rows,
                y,
            })
            .collect();
        quant::matmul_many(&mut products, input, self.activations).map_err(|e| {
            EngineError::Tensor {
                name: ws.iter().map(|w| w.label()).collect::<Vec<_>>().join(" / "),
                reason: e.to_string(),
            }
        })?;
        drop(products);
        Ok(outs)
    }

    /// [`Self::matmul`] with activations shared by several matrices.
    fn matmul_input(&self, w: &Matrix, input: &MatmulInput<'_>) -> Result<Vec<f32>, EngineError> {
        let mut y = vec![0f32; input.tokens() * w.rows];
        quant::matmul_input(
            w.ty,
            w.data(&self.file),
            w.rows,
            input,
            &mut y,
            self.activations,
        )
        .map_err(|e| EngineError::Tensor {
            name: w.label(),
            reason: e.to_string(),
        })?;
        Ok(y)
    }
}

/// Dot product with 32 independent accumulators (four vectors of eight), so
/// that the additions of consecutive values do not wait on each other.
/// `WIDE`: with AVX2 intrinsics (the caller runs with AVX2 enabled), the
/// same operations in the same order, so the same result.
#[inline(always)]
fn dot<const WIDE: bool>(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    assert_eq!(a.len(), b.len());
    let whole = a.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        use std::arch::x86_64::*;
        // SAFETY: the caller runs with AVX2 (WIDE), and every load reads
        // 8 values of `a` or `b` below `whole`.
        unsafe {
            let mut v = [_mm256_setzero_ps(); 4];
            for c in (0..whole).step_by(LANES) {
                for (j, v) in v.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(a.as_ptr().add(c + 8 * j));
                    let y = _mm256_loadu_ps(b.as_ptr().add(c + 8 * j));
                    *v = _mm256_add_ps(*v, _mm256_mul_ps(x, y));
                }
            }
            for (j, v) in v.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(8 * j), *v);
            }
        }
    }
    if !WIDE || cfg!(not(target_arch = "x86_64")) {
        for c in (0..whole).step_by(LANES) {
            for i in 0..LANES {
                acc[i] += a[c + i] * b[c + i];
            }
        }
    }
    let mut sum = 0f32;
    for i in 0..8 {
        sum += (acc[i] + acc[i + 8]) + (acc[i + 16] + acc[i + 24]);
    }
    for i in whole..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm(xr, weight, eps, or);
    }
}

fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32, d: usize) {
    let mut tmp = vec![0f32; d];
    for row in x.chunks_exact_mut(d) {
        rms_norm(row, weight, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// RMSNorm of every head of every row (`weight` has `head_dim` entries).
fn rms_norm_heads(x: &mut [f32], weight: &[f32], eps: f32) {
    rms_norm_in_place(x, weight, eps, weight.len());
}

fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// One layer's rotary position embedding.
struct Rope<'a> {
    head_dim: usize,
    dims: usize,
    style: RopeStyle,
    /// base^(-2/dims): pair i turns by pos · theta_scale^i.
    theta_scale: f32,
    /// Positions are multiplied by this (linear scaling).
    freq_scale: f32,
    /// cos and sin are multiplied by this.
    attn_factor: f32,
    /// Per-pair divisors of the angle, `[dims / 2]`.
    factors: Option<&'a [f32]>,
}

impl<'a> Rope<'a> {
    /// Layer `layer`'s rotation, `None` where the layer has none.
    fn of_layer(spec: &ModelSpec, layer: usize, factors: Option<&'a [f32]>) -> Option<Self> {
        let plan = spec.layers[layer];
        plan.rope.then(|| Rope {
            head_dim: spec.head_dim,
            dims: spec.rope_dims,
            style: spec.rope_style,
            theta_scale: plan.rope_theta.powf(-2.0 / spec.rope_dims as f32),
            freq_scale: plan.rope_freq_scale,
            attn_factor: spec.rope_attn_factor,
            factors,
        })
    }

    /// Rotates every head of `x` (n rows of whole heads); row `t` is at
    /// position `start + t`.
    fn apply(&self, x: &mut [f32], n: usize, start: usize) {
        let row_len = x.len() / n;
        let half = self.dims / 2;
        let mut cos_sin = vec![(0f32, 0f32); half];
        for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
            // θ_i = pos · base^(-2i/d), built by repeated multiplication as
            // llama.cpp does, then divided by the pair's factor and scaled.
            let mut angle = (start + t) as f32;
            for (i, cs) in cos_sin.iter_mut().enumerate() {
                let divisor = self.factors.map_or(1.0, |f| f[i]);
                let theta = self.freq_scale * (angle / divisor);
                *cs = (
                    theta.cos() * self.attn_factor,
                    theta.sin() * self.attn_factor,
                );
                angle *= self.theta_scale;
            }
            for head in row.chunks_exact_mut(self.head_dim) {
                for (i, &(c, s)) in cos_sin.iter().enumerate() {
                    let (a, b) = match self.style {
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
}

/// Attention of the `n` query rows `q` (n × q_dim, RoPE applied) at
/// positions `start..start+n` over the cached keys and values of positions
/// `0..start+n`. Returns n × q_dim.
fn attention(
    spec: &ModelSpec,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    start: usize,
    n: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let q_dim = spec.q_dim();
    let mut out = vec![0f32; n * q_dim];
    let wide = simd::wide();
    // One task per (row, head): independent and evenly sized.
    out.par_chunks_mut(spec.head_dim)
        .enumerate()
        .for_each(|(task, o)| {
            let head = Head {
                spec,
                q,
                keys,
                values,
                row: task / spec.n_heads,
                head: task % spec.n_heads,
                start,
                window,
            };
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: simd::wide() checked AVX2 and FMA.
                unsafe { head.attend_avx2(o) };
                return;
            }
            let _ = wide;
            head.attend::<false>(o);
        });
    out
}

/// One attention task: a query row's head.
struct Head<'a> {
    spec: &'a ModelSpec,
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    row: usize,
    head: usize,
    start: usize,
    window: Option<usize>,
}

impl Head<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self, o: &mut [f32]) {
        self.attend::<true>(o)
    }

    /// Softmax of the scaled (and capped) scores against the keys, times the values, into `o`.
    #[inline(always)]
    fn attend<const WIDE: bool>(&self, o: &mut [f32]) {
        let spec = self.spec;
        let (hd, q_dim, kv_dim) = (spec.head_dim, spec.q_dim(), spec.kv_dim());
        let pos = self.start + self.row;
        let first = match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        let kvh = self.head / (spec.n_heads / spec.n_kv_heads);
        let at = self.row * q_dim + self.head * hd;
        let qh = &self.q[at..at + hd];
        // plain loops, no closures: a closure handed to an iterator adapter
        // is compiled outside this function and would lose its AVX2
        let mut scores = vec![0f32; pos + 1 - first];
        for (i, score) in scores.iter_mut().enumerate() {
            let p = first + i;
            let key = &self.keys[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd];
            *score = dot::<WIDE>(qh, key) * spec.attention_scale;
            if let Some(cap) = spec.attn_softcap {
                *score = cap * (*score / cap).tanh();
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // the exponentials in a loop of their own, which vectorizes
        for s in scores.iter_mut() {
            *s = simd::exp(*s - max);
        }
        let inv = 1.0 / scores.iter().sum::<f32>();
        for s in scores.iter_mut() {
            *s *= inv;
        }
        let values = &self.values[first * kv_dim + kvh * hd..];
        weighted_sum::<WIDE>(o, &scores, values, kv_dim);
    }
}

/// `o[i] = Σ_p weights[p] · values[p·stride + i]`, each sum in order of
/// `p`, the outputs kept in registers 32 at a time. `WIDE`: with AVX2
/// intrinsics (the caller runs with AVX2 enabled), the same operations in
/// the same order.
#[inline(always)]
fn weighted_sum<const WIDE: bool>(o: &mut [f32], weights: &[f32], values: &[f32], stride: usize) {
    const LANES: usize = 32;
    let hd = o.len();
    if let Some(last) = weights.len().checked_sub(1) {
        assert!(values.len() >= last * stride + hd);
    }
    let whole = hd / LANES * LANES;
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        use std::arch::x86_64::*;
        for c in (0..whole).step_by(LANES) {
            // SAFETY: the caller runs with AVX2 (WIDE); the loads read
            // values[p·stride + c .. + 32] with p·stride + hd ≤ values.len()
            // (asserted) and c + 32 ≤ hd, the stores o[c .. c + 32].
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (p, &w) in weights.iter().enumerate() {
                    let w = _mm256_set1_ps(w);
                    let row = values.as_ptr().add(p * stride + c);
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let v = _mm256_loadu_ps(row.add(8 * j));
                        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, v));
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(c + 8 * j), *acc);
                }
            }
        }
    }
    let done = if WIDE && cfg!(target_arch = "x86_64") {
        whole
    } else {
        0
    };
    o[done..].fill(0.0);
    for (p, &w) in weights.iter().enumerate() {
        let row = &values[p * stride + done..p * stride + hd];
        for (acc, &v) in o[done..].iter_mut().zip(row) {
            *acc += w * v;
        }
    }
}

/// `gate = act(gate) * up`, elementwise; large inputs (prompts) spread over
/// the thread pool.
fn gated_activation(gate: &mut [f32], up: &[f32], activation: Activation) {
    const CHUNK: usize = 1 << 13;
    let wide = simd::wide();
    let run = |gate: &mut [f32], up: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: simd::wide() checked AVX2 and FMA.
            unsafe { simd::gated_avx2(gate, up, activation) };
            return;
        }
        let _ = wide;
        simd::gated(gate, up, activation);
    };
    if gate.len() <= CHUNK {
        run(gate, up);
    } else {
        gate.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(|(g, u)| run(g, u));
    }
}

/// Elementwise functions written without library calls, so that loops over
/// them vectorize, and compiled a second time for AVX2 (picked at run time;
/// the same operations, so the same results, as Rust does not contract
/// `a * b + c` into a fused multiply-add).
mod simd {
    use crate::spec::Activation;

    /// Whether this CPU runs the AVX2 + FMA copies.
    pub fn wide() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `e^x` to within 2e-7 (relative) for x in [-87, 88], clamped outside
    /// it: `2^k · e^r` with `k = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and e^r
    /// by its Taylor polynomial of degree 6.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        // ln 2 in two parts, the first exact in few bits (Cody and Waite)
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // adding and subtracting 1.5·2^23 rounds to an integer (ties to even)
        const ROUND: f32 = 12_582_912.0;
        let x = x.clamp(-87.0, 88.0);
        let k = (x * LOG2_E + ROUND) - ROUND;
        let r = (x - k * LN2_HI) - k * LN2_LO;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
        p * two_k
    }

    /// `tanh(x)` as `1 - 2 / (e^{2x} + 1)` (absolute error about 1e-7).
    #[inline(always)]
    pub fn tanh(x: f32) -> f32 {
        1.0 - 2.0 / (exp(2.0 * x) + 1.0)
    }

    #[inline(always)]
    pub fn gated(gate: &mut [f32], up: &[f32], activation: Activation) {
        match activation {
            Activation::Silu => {
                for (g, &u) in gate.iter_mut().zip(up) {
                    *g = *g / (1.0 + exp(-*g)) * u;
                }
            }
            Activation::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                const COEF: f32 = 0.044_715;
                for (g, &u) in gate.iter_mut().zip(up) {
                    let x = *g;
                    *g = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * x * (1.0 + COEF * x * x))) * u;
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gated_avx2(gate: &mut [f32], up: &[f32], activation: Activation) {
        gated(gate, up, activation)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp_and_tanh_match_the_library() {
            let mut worst_exp = 0f64;
            let mut worst_tanh = 0f64;
            for i in -200_000..=200_000 {
                let x = i as f32 * 4.4e-4; // -88 .. 88
                let want = f64::from(x).exp();
                if x >= -87.0 {
                    worst_exp = worst_exp.max((f64::from(exp(x)) - want).abs() / want);
                }
                let t = x / 8.0;
                worst_tanh = worst_tanh.max((f64::from(tanh(t)) - f64::from(t).tanh()).abs());
            }
            assert!(worst_exp < 4e-7, "exp: worst relative error {worst_exp:e}");
            assert!(
                worst_tanh < 3e-7,
                "tanh: worst absolute error {worst_tanh:e}"
            );
            assert_eq!(exp(-1000.0), exp(-87.0));
            assert!(exp(1000.0).is_finite());
            assert_eq!(tanh(100.0), 1.0);
            assert_eq!(tanh(-100.0), -1.0);
        }
    }
}
