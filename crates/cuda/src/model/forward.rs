//! One forward pass on the GPU: the step's metadata uploaded, the layers
//! run (fused for decode-sized steps), the LM head, and the results split
//! among the sequences.

use cudarc::driver::result as driver;
use engine::backend::{split_rows, Cache, Segment, TokenMask};
use engine::cpu::Logits;
use engine::spec::{Activation, RopeStyle};
use engine::EngineError;
use gguf::GgmlType;

use super::workspace::{mask_words, GraphKey, StepAddresses, Workspace};
use super::{invalid, or_null, to_engine, CudaModel, WeightsMode, GRAPH_MAX_TOKENS, LOGIT_ROWS};
use crate::error::{DriverContext, Result};
use crate::kernels::{
    argmax_index, Attention, DeviceMatrix, Kernels, MatvecOut, QkvPrepare, TokenMasks,
};
use crate::kv::GpuCache;

impl CudaModel {
    /// One sequence's forward pass that also returns intermediate results
    /// (`name`, `tokens × width` values): every step of layer 0, the residual
    /// stream after each layer, and the last position's logits.
    pub fn forward_traced(
        &self,
        cache: &mut GpuCache,
        tokens: &[u32],
    ) -> Result<(Vec<f32>, engine::cpu::Trace), EngineError> {
        let mut trace = Vec::new();
        let mut batch = [Segment {
            kv: cache,
            tokens,
            logits: Logits::Last,
        }];
        let logits = match self.run(&mut batch, Pick::Logits, Some(&mut trace))? {
            Output::Logits(mut rows) => rows.pop().unwrap_or_default(),
            Output::Tokens(_) => unreachable!("logits were asked for"),
        };
        Ok((logits, trace))
    }

    /// The batched forward pass: logits, or token ids as `pick` says.
    pub(super) fn run(
        &self,
        batch: &mut [Segment<'_, GpuCache>],
        mut pick: Pick<'_>,
        mut trace: Option<&mut Vec<(String, Vec<f32>)>>,
    ) -> Result<Output, EngineError> {
        let greedy = !matches!(pick, Pick::Logits);
        for seg in batch.iter() {
            engine::backend::check_segment(
                &self.spec,
                seg.tokens,
                seg.kv.len(),
                seg.kv.capacity(),
            )?;
        }
        let n: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut work = self
            .work
            .lock()
            .map_err(|_| EngineError::Invalid("GPU workspace poisoned".into()))?;
        if n > work.max_tokens {
            return Err(EngineError::Invalid(format!(
                "a forward pass of {n} tokens exceeds the GPU workspace of {} tokens",
                work.max_tokens
            )));
        }
        // Reserve every cache's pages first, so a full pool fails before any work.
        for seg in batch.iter_mut() {
            let positions = seg.kv.len() + seg.tokens.len();
            seg.kv.reserve(positions)?;
        }

        let attention_warps = attention_warps(
            n * self.spec.n_heads,
            batch
                .iter()
                .map(|s| s.kv.len() + s.tokens.len())
                .max()
                .unwrap_or(0),
        );
        // Step metadata, one upload: tokens | positions | table offsets | wanted rows | block tables.
        let mut meta: Vec<u32> = Vec::with_capacity(4 * n);
        meta.extend(batch.iter().flat_map(|s| s.tokens.iter().copied()));
        for seg in batch.iter() {
            let start = seg.kv.len() as u32;
            meta.extend((0..seg.tokens.len() as u32).map(|i| start + i));
        }
        let mut table_offset = 0u32;
        for seg in batch.iter() {
            meta.extend(std::iter::repeat_n(table_offset, seg.tokens.len()));
            table_offset += seg.kv.table().len() as u32;
        }
        let mut wanted: Vec<u32> = Vec::new();
        // The segment of each wanted row.
        let mut row_segments: Vec<usize> = Vec::new();
        let mut row = 0u32;
        for (segment, seg) in batch.iter().enumerate() {
            let m = seg.tokens.len() as u32;
            match seg.logits {
                Logits::Last => wanted.push(row + m - 1),
                Logits::All => wanted.extend(row..row + m),
                Logits::None => {}
            }
            row_segments.resize(wanted.len(), segment);
            row += m;
        }
        if matches!(pick, Pick::Masked(_)) && wanted.len() > LOGIT_ROWS {
            return Err(EngineError::Invalid(format!(
                "a masked greedy step of {} rows exceeds the {LOGIT_ROWS} the GPU workspace holds",
                wanted.len()
            )));
        }
        meta.extend(&wanted);
        for seg in batch.iter() {
            meta.extend(seg.kv.table());
        }
        if meta.len() > work.meta_len {
            return Err(EngineError::Invalid(format!(
                "step metadata of {} entries exceeds the GPU workspace's {}",
                meta.len(),
                work.meta_len
            )));
        }
        let (tokens_at, positions_at, offsets_at, wanted_at, tables_at) = {
            let at = |i: usize| work.meta + 4 * i as u64;
            (at(0), at(n), at(2 * n), at(3 * n), at(3 * n + wanted.len()))
        };

        let at = StepAddresses {
            tokens: tokens_at,
            positions: positions_at,
            table_offsets: offsets_at,
            wanted: wanted_at,
            tables: tables_at,
        };
        // Steps of up to 64 tokens run as CUDA graphs, however the tokens
        // fall among the sequences (the kernels read that from the step's
        // metadata): a step is ~700 launches, whose host time would exceed
        // the GPU's — decode steps of many streams, and the steps that mix
        // them with prompt chunks or run a short prompt after a cached prefix.
        let graph_key =
            (trace.is_none() && n <= GRAPH_MAX_TOKENS && (1..=LOGIT_ROWS).contains(&wanted.len()))
                .then_some(GraphKey {
                    tokens: n,
                    rows: wanted.len(),
                    // A masked pick runs after the graph, once the masks are in.
                    greedy: matches!(pick, Pick::Greedy),
                    attention_warps,
                });
        let result = (|| -> Result<Output> {
            // The raw copies below use the thread's current context (the
            // scheduler runs this on its own thread).
            self.device
                .context()
                .bind_to_thread()
                .context(|| format!("binding GPU {}", self.device.index()))?;
            let stream = self.device.stream();
            // SAFETY: `meta` is pageable host memory copied out before the call returns.
            unsafe { driver::memcpy_htod_async(work.meta, &meta, stream.cu_stream()) }
                .context(|| "uploading step metadata".into())?;
            let replayed = match graph_key {
                Some(key) => self.replay(&mut work, key, &at)?,
                None => false,
            };
            if !replayed {
                self.layers_forward(
                    &work,
                    n,
                    attention_warps,
                    at.tokens,
                    at.positions,
                    at.table_offsets,
                    at.tables,
                    &mut trace,
                )?;
            }
            match &mut pick {
                Pick::Masked(masks) => {
                    if !replayed {
                        self.head_kernels(&work, wanted.len(), 0, at.wanted, false)?;
                    }
                    self.masked_argmax(&work, &row_segments, masks)
                }
                _ if replayed => self.collect(&work, wanted.len(), greedy),
                _ => self.head(&work, &wanted, at.wanted, greedy),
            }
        })();
        // Nothing queued may outlive this call (caches may drop their pages next).
        let synced = self.device.synchronize();
        let output = result.map_err(to_engine)?;
        synced.map_err(to_engine)?;
        for seg in batch.iter_mut() {
            seg.kv.commit(seg.tokens.len());
        }
        // Split the rows among the segments.
        let modes: Vec<Logits> = batch.iter().map(|s| s.logits).collect();
        let lengths: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        let vocab = self.spec.vocab_size;
        Ok(match output {
            Output::Logits(mut all) => {
                let mut flat = all.pop().unwrap_or_default();
                engine::backend::final_softcap(&self.spec, &mut flat);
                Output::Logits(split_rows(&flat, vocab, &modes, &lengths))
            }
            Output::Tokens(mut all) => {
                let flat = all.pop().unwrap_or_default();
                Output::Tokens(split_rows(&flat, 1, &modes, &lengths))
            }
        })
    }

    /// The results of a replayed decode step: `rows` token ids or logits rows.
    pub(super) fn collect(&self, work: &Workspace, rows: usize, greedy: bool) -> Result<Output> {
        if greedy {
            Ok(Output::Tokens(vec![self.fetch_ids(work, rows)?]))
        } else {
            let logits = self.fetch(work.logits, rows * self.spec.vocab_size)?;
            Ok(Output::Logits(vec![logits]))
        }
    }

    /// Each wanted row's argmax within its segment's mask (asked for now,
    /// after the logits are queued), as one list of token ids.
    fn masked_argmax(
        &self,
        work: &Workspace,
        row_segments: &[usize],
        masks: &mut MaskSource<'_>,
    ) -> Result<Output> {
        let rows = row_segments.len();
        let vocab = self.spec.vocab_size;
        let words = mask_words(vocab);
        let masks = masks();
        // Mask numbers by row, then the masks (each segment's once).
        let mut upload: Vec<u32> = vec![u32::MAX; rows];
        let mut numbered: Vec<Option<u32>> = vec![None; masks.len()];
        let mut count = 0u32;
        for (row, &segment) in row_segments.iter().enumerate() {
            let Some(mask) = masks.get(segment).and_then(Option::as_ref) else {
                continue;
            };
            let number = match numbered[segment] {
                Some(number) => number,
                None => {
                    let number = count;
                    count += 1;
                    numbered[segment] = Some(number);
                    let start = upload.len();
                    upload.resize(start + words, 0);
                    let n = mask.len().min(words);
                    upload[start..start + n].copy_from_slice(&mask[..n]);
                    number
                }
            };
            upload[row] = number;
        }
        let stream = self.device.stream();
        let on_device = TokenMasks {
            row_mask: work.masks,
            masks: work.masks + 4 * rows as u64,
            words,
        };
        // SAFETY: `upload` (rows ≤ LOGIT_ROWS numbers and at most LOGIT_ROWS
        // masks of `words`) fits work.masks; pageable memory is copied out
        // before the call returns.
        unsafe { driver::memcpy_htod_async(work.masks, &upload, stream.cu_stream()) }
            .context(|| "uploading token masks".into())?;
        // SAFETY: the logits rows are queued on this stream; ids holds rows u64.
        unsafe {
            self.kernels
                .argmax_rows_masked(work.logits, vocab, rows, &on_device, work.ids)?
        };
        Ok(Output::Tokens(vec![self.fetch_ids(work, rows)?]))
    }

    /// The first `rows` argmax results, as token ids.
    pub(super) fn fetch_ids(&self, work: &Workspace, rows: usize) -> Result<Vec<u32>> {
        let stream = self.device.stream();
        let mut keys = vec![0u64; rows];
        if rows > 0 {
            // SAFETY: `ids` holds `rows` u64 written by argmax_rows on this stream.
            unsafe { driver::memcpy_dtoh_async(&mut keys, work.ids, stream.cu_stream()) }
                .context(|| "copying token ids to the host".into())?;
            stream
                .synchronize()
                .context(|| "waiting for token ids".into())?;
        }
        Ok(keys.into_iter().map(argmax_index).collect())
    }

    /// Copies `count` f32 from the device (after the queued work).
    pub(super) fn fetch(&self, ptr: u64, count: usize) -> Result<Vec<f32>> {
        let mut host = vec![0f32; count];
        let stream = self.device.stream();
        // SAFETY: `ptr` holds `count` f32 written by queued work; the copy is
        // ordered after it on the stream and waited for below.
        unsafe { driver::memcpy_dtoh_async(&mut host, ptr, stream.cu_stream()) }
            .context(|| "copying activations to the host".into())?;
        stream
            .synchronize()
            .context(|| "waiting for activations".into())?;
        Ok(host)
    }

    /// `y (+)= x · Wᵀ` for `n` rows: matvec from the blocks for a few rows,
    /// else cuBLAS on f16 (the weights dequantized to the scratch when needed).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.matmul_from(work, w, x, false, n, y, ldy, accumulate)
            .map(|_| ())
    }

    /// [`Self::matmul`] where `x_in_f16` says that the f16 activation buffer
    /// already holds x (the previous product of the same input left it
    /// there). Returns whether it now does.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_from(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        x: u64,
        x_in_f16: bool,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<bool> {
        // SAFETY (every block below): the addresses come from this model's
        // buffers, sized at load for max_batch_tokens rows of every width.
        if self.on_matvec(n, &[w]) {
            unsafe { self.kernels.matvec(w, x, n, y, ldy, accumulate)? };
            return Ok(x_in_f16);
        }
        if !x_in_f16 {
            // SAFETY: act_f16 holds max_batch_tokens rows of every width.
            unsafe { self.kernels.f32_to_f16(x, work.act_f16, n * w.cols)? };
        }
        self.matmul_blas(work, w, n, y, ldy, accumulate)?;
        Ok(true)
    }

    /// `y (+)= x · Wᵀ` for x as f16 in `work.act_f16`: up to
    /// `MATMUL_Q_MAX_ROWS` rows against a block format on the tensor-core
    /// kernel; else through cuBLAS, W itself if f16, else dequantized to f16
    /// scratch a chunk of rows at a time.
    pub(super) fn matmul_blas(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        // SAFETY (every block below): as for `matmul`.
        // A few rows against a block format: the tensor-core kernel reads
        // the blocks as they are (the scratch holds its split sums).
        if unsafe {
            self.kernels.matmul_q(
                w,
                work.act_f16,
                n,
                y,
                ldy,
                accumulate,
                work.scratch,
                2 * work.scratch_values,
            )?
        } {
            return Ok(());
        }
        if w.ty == GgmlType::F16 {
            return unsafe {
                self.blas
                    .gemm_f16(w.ptr, w.rows, w.cols, work.act_f16, n, y, ldy, accumulate)
            };
        }
        let chunk_rows = (work.scratch_values / w.cols).max(1);
        let stream = self.device.stream();
        for first in (0..w.rows).step_by(chunk_rows) {
            let rows = chunk_rows.min(w.rows - first);
            if rows * w.cols > work.scratch_values {
                return Err(invalid(
                    "weight scratch",
                    format!("{}×{} does not fit", rows, w.cols),
                ));
            }
            unsafe {
                if !self.kernels.rows_to_f16(w, first, rows, work.scratch)? {
                    self.kernels.dequantizer.dequantize_f16_raw(
                        stream,
                        w.ty,
                        w.ptr + (first * w.row_bytes) as u64,
                        (rows * w.cols) as u64,
                        work.scratch,
                    )?;
                }
                self.blas.gemm_f16(
                    work.scratch,
                    rows,
                    w.cols,
                    work.act_f16,
                    n,
                    y + 4 * first as u64,
                    ldy,
                    accumulate,
                )?;
            }
        }
        Ok(())
    }

    /// Whether products of `n` rows through `ws` run on the mat-vec kernels
    /// (quantized weights, few rows, rows of whole 8-value stretches) rather
    /// than through cuBLAS.
    pub(super) fn on_matvec(&self, n: usize, ws: &[&DeviceMatrix]) -> bool {
        self.mode == WeightsMode::Quantized
            && n <= self.matvec_rows
            && ws.iter().all(|w| Kernels::matvec_takes(w))
    }

    /// Embedding and every layer, leaving the residual stream in `work.x`.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layers_forward(
        &self,
        work: &Workspace,
        n: usize,
        attention_warps: u32,
        tokens: u64,
        positions: u64,
        table_offsets: u64,
        block_tables: u64,
        trace: &mut Option<&mut Vec<(String, Vec<f32>)>>,
    ) -> Result<()> {
        let spec = &self.spec;
        let k = &self.kernels;
        let (embd, q_dim, kv_dim, ff) = (spec.n_embd, spec.q_dim(), spec.kv_dim(), spec.n_ff);
        let eps = spec.rms_eps;
        let tracing = trace.is_some();
        let mut record = |name: String, ptr: u64, width: usize| -> Result<()> {
            if let Some(trace) = trace.as_deref_mut() {
                trace.push((name, self.fetch(ptr, n * width)?));
            }
            Ok(())
        };
        // SAFETY (every kernel call below): the buffers are this model's,
        // sized at load for max_batch_tokens ≥ n rows; the metadata holds n
        // tokens (below the vocabulary: checked), their positions, table
        // offsets, and tables covering every position (reserved).
        unsafe {
            k.embed(
                &self.weights.token_embd,
                tokens,
                n,
                spec.embedding_scale.unwrap_or(1.0),
                work.x,
            )?;
        }
        // Decode-sized steps run on the mat-vec kernels, fused where the plan says.
        let decode = n <= self.matvec_rows;
        for (index, layer) in self.weights.layers.iter().enumerate() {
            let first = index == 0;
            let fusion = &self.fusion[index];
            let qkv = [
                (&layer.wq, work.q, q_dim),
                (&layer.wk, work.k, kv_dim),
                (&layer.wv, work.v, kv_dim),
            ];
            if decode && fusion.fused_qkv {
                // RMSNorm inside the products, one launch per weight layout.
                for group in &fusion.qkv_groups {
                    let outs: Vec<MatvecOut<'_>> = group
                        .iter()
                        .map(|&j| MatvecOut {
                            w: qkv[j].0,
                            y: qkv[j].1,
                            ldy: qkv[j].2,
                        })
                        .collect();
                    // SAFETY: x holds n rows of n_embd; q, k and v n rows of their widths.
                    unsafe {
                        k.matvec_stacked(&outs, work.x, n, Some((layer.attn_norm, eps)), false)?
                    };
                }
                if first && tracing {
                    unsafe { k.rms_norm(work.x, 0, layer.attn_norm, eps, embd, n, work.normed)? };
                }
            } else {
                unsafe { k.rms_norm(work.x, 0, layer.attn_norm, eps, embd, n, work.normed)? };
                // One f16 copy of the normed rows serves all three.
                let mut in_f16 = false;
                for (w, y, ldy) in qkv {
                    in_f16 = self.matmul_from(work, w, work.normed, in_f16, n, y, ldy, false)?;
                }
            }
            if first {
                record("layer0.attn_norm".into(), work.normed, embd)?;
                record("layer0.q_proj".into(), work.q, q_dim)?;
                record("layer0.k_proj".into(), work.k, kv_dim)?;
                record("layer0.v_proj".into(), work.v, kv_dim)?;
            }
            let plan = spec.layers[index];
            unsafe {
                k.qkv_prepare(&QkvPrepare {
                    q: work.q,
                    k: work.k,
                    v: work.v,
                    bq: or_null(layer.bq),
                    bk: or_null(layer.bk),
                    bv: or_null(layer.bv),
                    q_norm: or_null(layer.q_norm),
                    k_norm: or_null(layer.k_norm),
                    eps,
                    positions,
                    table_offsets,
                    block_tables,
                    k_cache: self.kv.keys(index),
                    v_cache: self.kv.values(index),
                    n_tokens: n,
                    n_heads: spec.n_heads,
                    n_kv_heads: spec.n_kv_heads,
                    head_dim: spec.head_dim,
                    // 0: this layer does not rotate.
                    rope_dims: if plan.rope { spec.rope_dims } else { 0 },
                    // As the CPU backend computes it, so the angles match bit for bit.
                    theta_scale: plan.rope_theta.powf(-2.0 / spec.rope_dims as f32),
                    neox: spec.rope_style == RopeStyle::Neox,
                    rope_factors: or_null(self.weights.rope_factors),
                    freq_scale: plan.rope_freq_scale,
                    attn_factor: spec.rope_attn_factor,
                })?;
                k.attention(&Attention {
                    q: work.q,
                    k_cache: self.kv.keys(index),
                    v_cache: self.kv.values(index),
                    positions,
                    table_offsets,
                    block_tables,
                    n_tokens: n,
                    n_heads: spec.n_heads,
                    n_kv_heads: spec.n_kv_heads,
                    head_dim: spec.head_dim,
                    window: spec.window(index).unwrap_or(0),
                    scale: spec.attention_scale,
                    softcap: spec.attn_softcap.unwrap_or(0.0),
                    out: work.attn,
                    warps: attention_warps,
                })?;
            }
            if first {
                record("layer0.q_rope".into(), work.q, q_dim)?;
                record("layer0.k_rope".into(), work.k, kv_dim)?;
                record("layer0.attn".into(), work.attn, q_dim)?;
            }
            self.residual(work, &layer.wo, work.attn, n, layer.post_attn_norm)?;
            if first {
                record("layer0.x_attn".into(), work.x, embd)?;
            }

            let gelu = spec.activation == Activation::GeluTanh;
            if decode && fusion.fused_gate_up {
                // SAFETY: gate and up are ff × n_embd; x holds n rows, gate n rows of ff.
                unsafe {
                    k.matvec_gated(
                        &layer.gate,
                        &layer.up,
                        work.x,
                        n,
                        Some((layer.ffn_norm, eps)),
                        work.gate,
                        gelu,
                    )?
                };
                if first && tracing {
                    unsafe { k.rms_norm(work.x, 0, layer.ffn_norm, eps, embd, n, work.normed)? };
                }
            } else {
                unsafe { k.rms_norm(work.x, 0, layer.ffn_norm, eps, embd, n, work.normed)? };
                if decode && fusion.gated_matvec {
                    // SAFETY: as above, from the normed rows.
                    unsafe {
                        k.matvec_gated(
                            &layer.gate,
                            &layer.up,
                            work.normed,
                            n,
                            None,
                            work.gate,
                            gelu,
                        )?
                    };
                } else {
                    let in_f16 = self.matmul_from(
                        work,
                        &layer.gate,
                        work.normed,
                        false,
                        n,
                        work.gate,
                        ff,
                        false,
                    )?;
                    self.matmul_from(work, &layer.up, work.normed, in_f16, n, work.up, ff, false)?;
                    unsafe { k.gated_activation(work.gate, work.up, n * ff, gelu)? };
                }
            }
            if first {
                record("layer0.ffn_norm".into(), work.normed, embd)?;
                record("layer0.ffn_act".into(), work.gate, ff)?;
            }
            self.residual(work, &layer.down, work.gate, n, layer.post_ffn_norm)?;
            record(format!("layer{index}.out"), work.x, embd)?;
        }
        Ok(())
    }

    /// `x += W·a`, or `x += RMSNorm(W·a)·post_norm` where the spec has post-norms.
    pub(super) fn residual(
        &self,
        work: &Workspace,
        w: &DeviceMatrix,
        a: u64,
        n: usize,
        post_norm: Option<u64>,
    ) -> Result<()> {
        let embd = self.spec.n_embd;
        let Some(post_norm) = post_norm else {
            return self.matmul(work, w, a, n, work.x, embd, true);
        };
        self.matmul(work, w, a, n, work.tmp, embd, false)?;
        // SAFETY: x and tmp hold n × n_embd f32; post_norm n_embd f32.
        unsafe {
            self.kernels
                .add_rms_norm(work.x, work.tmp, post_norm, self.spec.rms_eps, embd, n)
        }
    }

    /// Final norm and LM head of `rows` (≤ LOGIT_ROWS) wanted rows from
    /// number `first` on (`wanted_at` holds their indices on the device) into
    /// `work.logits`, and with `greedy` their argmax into `work.ids[first..]`.
    pub(super) fn head_kernels(
        &self,
        work: &Workspace,
        rows: usize,
        first: usize,
        wanted_at: u64,
        greedy: bool,
    ) -> Result<()> {
        let (embd, vocab) = (self.spec.n_embd, self.spec.vocab_size);
        // SAFETY: the rows index n ≤ max_batch_tokens rows of x; final_rows
        // and logits hold LOGIT_ROWS rows; ids holds max_batch_tokens.
        unsafe {
            self.kernels.rms_norm(
                work.x,
                wanted_at + 4 * first as u64,
                self.weights.output_norm,
                self.spec.rms_eps,
                embd,
                rows,
                work.final_rows,
            )?;
        }
        if rows == 1 {
            self.matmul(
                work,
                &self.weights.output,
                work.final_rows,
                rows,
                work.logits,
                vocab,
                false,
            )?;
        } else {
            // Several rows: the head's weights (the largest matrix) are read
            // once through cuBLAS rather than by the few-row matvec.
            // SAFETY: final_rows holds LOGIT_ROWS rows of n_embd; act_f16 room for them.
            unsafe {
                self.kernels.f32_to_f16(
                    work.final_rows,
                    work.act_f16,
                    rows * self.weights.output.cols,
                )?
            };
            self.matmul_blas(work, &self.weights.output, rows, work.logits, vocab, false)?;
        }
        if greedy {
            unsafe {
                self.kernels
                    .argmax_rows(work.logits, vocab, rows, work.ids + 8 * first as u64)?
            };
        }
        Ok(())
    }

    /// Final norm and LM head of the wanted rows (`wanted_at` holds their
    /// indices on the device), LOGIT_ROWS at a time.
    pub(super) fn head(
        &self,
        work: &Workspace,
        wanted: &[u32],
        wanted_at: u64,
        greedy: bool,
    ) -> Result<Output> {
        let vocab = self.spec.vocab_size;
        let stream = self.device.stream();
        let mut logits = if greedy {
            Vec::new()
        } else {
            vec![0f32; wanted.len() * vocab]
        };
        for first in (0..wanted.len()).step_by(LOGIT_ROWS) {
            let rows = LOGIT_ROWS.min(wanted.len() - first);
            self.head_kernels(work, rows, first, wanted_at, greedy)?;
            if !greedy {
                let dst = &mut logits[first * vocab..(first + rows) * vocab];
                // SAFETY: `logits` holds rows × vocab f32 written just before on this stream.
                unsafe { driver::memcpy_dtoh_async(dst, work.logits, stream.cu_stream()) }
                    .context(|| "copying logits to the host".into())?;
                stream
                    .synchronize()
                    .context(|| "waiting for logits".into())?;
            }
        }
        if greedy {
            Ok(Output::Tokens(vec![self.fetch_ids(work, wanted.len())?]))
        } else {
            Ok(Output::Logits(vec![logits]))
        }
    }
}

/// What a forward pass returns.
pub(super) enum Pick<'a> {
    Logits,
    /// Each row's best token.
    Greedy,
    /// Each row's best token within its segment's mask (by segment, asked
    /// for once the logits are queued).
    Masked(&'a mut MaskSource<'a>),
}

/// Where a masked pick gets its masks from.
pub(super) type MaskSource<'a> = dyn FnMut() -> Vec<Option<TokenMask>> + 'a;

/// A forward pass's result: per segment (or, inside `run`, one flat list).
pub(super) enum Output {
    Logits(Vec<Vec<f32>>),
    Tokens(Vec<Vec<u32>>),
}

/// Warps per attention block for a step of `pairs` (token, query head)
/// pairs over at most `context` keys: 4 while the pairs fill the GPU with
/// blocks, else enough that no warp walks more than 4 chunks of 32 keys
/// (up to 16), so a step of few pairs over a long context is not one long
/// chain of loads per block.
fn attention_warps(pairs: usize, context: usize) -> u32 {
    const FILLING_PAIRS: usize = 256;
    if pairs >= FILLING_PAIRS {
        return 4;
    }
    let chunks = context.div_ceil(32);
    (chunks.div_ceil(4).next_power_of_two() as u32).clamp(4, crate::kernels::ATTENTION_MAX_WARPS)
}

#[cfg(test)]
mod attention_warps_tests {
    use super::attention_warps;

    #[test]
    fn few_pairs_over_long_contexts_get_more_warps() {
        // A decode step of 64 streams: blocks enough.
        assert_eq!(attention_warps(64 * 14, 4000), 4);
        // One sequence: by its context.
        assert_eq!(attention_warps(14, 100), 4);
        assert_eq!(attention_warps(14, 600), 8);
        assert_eq!(attention_warps(16 * 14, 2016), 16);
        assert_eq!(attention_warps(14, 30_000), 16);
    }
}
