//! Matrix products straight from the blocks: `y = x·Wᵀ` without
//! dequantizing `W` to memory first (llama.cpp's `vec_dot_*` and
//! `ggml_compute_forward_mul_mat` on the CPU).
//!
//! Two ways for the activations to meet the weights ([`Activations`]):
//!
//! * **F32** — each weight block is decoded in registers and multiplied into
//!   the f32 activations with fused multiply-adds. Block scales are factored
//!   out of the inner sums (`d·Σq·x`), and for the formats with a min,
//!   `Σ(d·q + m)·x = d·Σq·x + m·Σx` with `Σx` taken once per 32 activations.
//!   Not bit-exact with [`crate::dequantize`] followed by a dot product (the
//!   summation order differs and FMA rounds once), but f32 accumulation
//!   throughout: this is the reference mode.
//! * **Q8** — the activations are quantized once per input to 8 bits per
//!   block as llama.cpp's `vec_dot_type` holds them: 32-value blocks for the
//!   legacy formats with the scale rounded to f16 (`block_q8_0`,
//!   `block_q8_1`; the block's `d·Σq` stays f32), 256-value blocks with 16-value sums and
//!   an f32 scale for the K-quants (`block_q8_K`), values rounded to nearest
//!   even; each block product is an integer dot product (`vpmaddubsw` +
//!   `vpmaddwd`, or `vpdpbusd` where the CPU has AVX-512 VNNI), scaled once
//!   per block. F16 and BF16 weights meet the activations rounded to f16 and
//!   bf16, as llama.cpp's do. About twice as fast, with the error of 8-bit
//!   activations (what llama.cpp computes). Q2_K, Q3_K and CPUs without
//!   AVX2 compute the F32 result instead.
//!
//! Work is split over the rayon pool by rows of `W` (small products stay on
//! the calling thread); [`matmul_many`] puts several products of one input
//! in one fork-join. With several tokens each weight block is decoded once
//! for a tile of up to [`TOKEN_TILE`] tokens. The fast kernels are written
//! with AVX2+FMA+F16C intrinsics and picked at run time; every format also
//! has a portable kernel (decode a run of blocks with the crate's
//! dequantizer, then a dot product).

mod portable;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::{can_dequantize, GgmlType, Op, QuantError, QK_K, QK_LEGACY};

/// How the activations meet the weights; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activations {
    /// f32 activations, f32 products and sums (the reference).
    F32,
    /// Activations quantized per block to 8 bits, integer block products.
    Q8,
}

/// Tokens whose products share one decode of each weight block.
pub const TOKEN_TILE: usize = 4;

/// Below this many multiply-adds a product runs on the calling thread: a
/// fork-join from outside the pool costs about 12 µs on the 2-core test
/// machine (under load), about what a single thread needs for 2^19
/// multiply-adds in Q8 mode.
const PARALLEL_MIN_WORK: usize = 1 << 19;
/// Activations (values) from which their quantization is spread over the
/// thread pool.
const PARALLEL_MIN_VALUES: usize = 1 << 15;
/// Weight bytes a task works through before moving to the next token tile,
/// so that the rows stay in the L1/L2 cache across tiles.
const ROW_BLOCK_BYTES: usize = 1 << 15;

/// One 32-value block of 8-bit activations: `x ≈ d·q`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Q8Block {
    pub qs: [i8; QK_LEGACY],
    pub d: f32,
    /// `d·Σq`: the block's sum, for the formats with an offset.
    pub s: f32,
}

/// The activations of the legacy formats as stored: two [`Q8Block`]s
/// interleaved by halves, the order in which the kernels unpack two weight
/// blocks' nibbles into one register (low nibbles of both, then high
/// nibbles of both). A row with an odd number of blocks ends with a zero block.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Q8Pair {
    /// `a.qs[..16]`, `b.qs[..16]`, `a.qs[16..]`, `b.qs[16..]`
    pub qs: [i8; 2 * QK_LEGACY],
    /// `a.d`, `a.s`, `b.d`, `b.s`
    pub ds: [f32; 4],
}

const HALF: usize = QK_LEGACY / 2;

impl Q8Block {
    pub const ZERO: Q8Block = Q8Block {
        qs: [0; QK_LEGACY],
        d: 0.0,
        s: 0.0,
    };
}

impl Q8Pair {
    pub const ZERO: Q8Pair = Q8Pair {
        qs: [0; 2 * QK_LEGACY],
        ds: [0.0; 4],
    };

    pub fn new(a: &Q8Block, b: &Q8Block) -> Self {
        let mut qs = [0; 2 * QK_LEGACY];
        qs[..HALF].copy_from_slice(&a.qs[..HALF]);
        qs[HALF..2 * HALF].copy_from_slice(&b.qs[..HALF]);
        qs[2 * HALF..3 * HALF].copy_from_slice(&a.qs[HALF..]);
        qs[3 * HALF..].copy_from_slice(&b.qs[HALF..]);
        Q8Pair {
            qs,
            ds: [a.d, a.s, b.d, b.s],
        }
    }

    /// Block `k` (0 or 1) of the pair.
    #[cfg(test)]
    pub fn block(&self, k: usize) -> Q8Block {
        let mut qs = [0; QK_LEGACY];
        qs[..HALF].copy_from_slice(&self.qs[k * HALF..(k + 1) * HALF]);
        qs[HALF..].copy_from_slice(&self.qs[(2 + k) * HALF..(3 + k) * HALF]);
        Q8Block {
            qs,
            d: self.ds[2 * k],
            s: self.ds[2 * k + 1],
        }
    }
}

/// 8-bit activations for the K-quants: `x ≈ d·q`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Q8KBlock {
    pub qs: [i8; QK_K],
    /// Σq of each 16 values.
    pub bsums: [i16; QK_K / 16],
    pub d: f32,
}

/// The activations of one product, `n × cols` f32 values (token-major),
/// with the derived forms the kernels want computed once, on first use.
///
/// Make one for activations that several matrices multiply (the Q, K and V
/// projections, the FFN gate and up) so they are quantized only once.
pub struct MatmulInput<'a> {
    x: &'a [f32],
    n: usize,
    cols: usize,
    /// Σx of each 32 values, n × cols/32.
    sums: OnceLock<Vec<f32>>,
    /// n × ⌈cols/64⌉
    q8: OnceLock<Vec<Q8Pair>>,
    /// n × cols/256
    q8k: OnceLock<Vec<Q8KBlock>>,
    /// `x` rounded to f16, and to bf16.
    x_f16: OnceLock<Vec<f32>>,
    x_bf16: OnceLock<Vec<f32>>,
}

impl<'a> MatmulInput<'a> {
    /// `x` is `n` rows of `cols` values.
    pub fn new(x: &'a [f32], n: usize, cols: usize) -> Result<Self, QuantError> {
        if n.checked_mul(cols) != Some(x.len()) {
            return Err(QuantError::Activations {
                len: x.len(),
                n,
                cols,
            });
        }
        Ok(MatmulInput {
            x,
            n,
            cols,
            sums: OnceLock::new(),
            q8: OnceLock::new(),
            q8k: OnceLock::new(),
            x_f16: OnceLock::new(),
            x_bf16: OnceLock::new(),
        })
    }

    /// Number of tokens (rows of `x`).
    pub fn tokens(&self) -> usize {
        self.n
    }

    /// Values per token.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn sums(&self) -> &[f32] {
        self.sums.get_or_init(|| {
            let groups = self.cols / QK_LEGACY;
            let mut sums = vec![0f32; self.n * groups];
            for (x, sums) in self
                .x
                .chunks_exact(self.cols)
                .zip(sums.chunks_exact_mut(groups))
            {
                for (x, sum) in x.chunks_exact(QK_LEGACY).zip(sums) {
                    *sum = portable::sum32(x.try_into().expect("32 values"));
                }
            }
            sums
        })
    }

    fn x_f16(&self) -> &[f32] {
        self.x_f16
            .get_or_init(|| self.x.iter().map(|&v| portable::round_f16(v)).collect())
    }

    fn x_bf16(&self) -> &[f32] {
        self.x_bf16.get_or_init(|| {
            self.x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        })
    }

    fn q8(&self) -> &[Q8Pair] {
        self.q8.get_or_init(|| {
            let pairs = pairs_per_row(self.cols);
            let mut out = vec![Q8Pair::ZERO; self.n * pairs];
            self.each_row(&mut out, pairs, quantize_q8);
            out
        })
    }

    fn q8k(&self) -> &[Q8KBlock] {
        self.q8k.get_or_init(|| {
            let empty = Q8KBlock {
                qs: [0; QK_K],
                bsums: [0; QK_K / 16],
                d: 0.0,
            };
            let per_row = self.cols / QK_K;
            let mut blocks = vec![empty; self.n * per_row];
            self.each_row(&mut blocks, per_row, quantize_q8k);
            blocks
        })
    }

    /// `f(x_t, out_t)` for every token `t` (`per_row` outputs each), on the
    /// thread pool when there are many (a prompt's activations).
    fn each_row<T: Send>(&self, out: &mut [T], per_row: usize, f: fn(&[f32], &mut [T])) {
        if self.n == 0 || per_row == 0 {
            return;
        }
        if self.x.len() < PARALLEL_MIN_VALUES {
            for (x, out) in self
                .x
                .chunks_exact(self.cols)
                .zip(out.chunks_exact_mut(per_row))
            {
                f(x, out);
            }
        } else {
            self.x
                .par_chunks_exact(self.cols)
                .zip(out.par_chunks_exact_mut(per_row))
                .for_each(|(x, out)| f(x, out));
        }
    }
}

/// [`Q8Pair`]s in a row of `cols` values.
fn pairs_per_row(cols: usize) -> usize {
    (cols / QK_LEGACY).div_ceil(2)
}

/// Quantizes one row `x` (whole 32-value blocks) to [`Q8Pair`]s.
fn quantize_q8(x: &[f32], out: &mut [Q8Pair]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        x86::quantize_q8(x, out);
        return;
    }
    for (x, out) in x.chunks(2 * QK_LEGACY).zip(out) {
        let (a, b) = x.split_at(QK_LEGACY);
        let a = portable::quantize_q8_block(a.try_into().expect("32 values"));
        let b = match b.try_into() {
            Ok(b) => portable::quantize_q8_block(b),
            Err(_) => Q8Block::ZERO,
        };
        *out = Q8Pair::new(&a, &b);
    }
}

/// Quantizes `x` (whole 256-value blocks) to [`Q8KBlock`]s.
fn quantize_q8k(x: &[f32], out: &mut [Q8KBlock]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        x86::quantize_q8k(x, out);
        return;
    }
    for (x, out) in x.chunks_exact(QK_K).zip(out) {
        *out = portable::quantize_q8k_block(x.try_into().expect("256 values"));
    }
}

/// The weight matrix as the kernels see it: `rows` rows of `row_bytes`.
#[derive(Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub row_bytes: usize,
}

impl<'a> Weights<'a> {
    #[inline(always)]
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// The activations in the form a kernel asked for (the others empty).
#[derive(Clone, Copy)]
pub(crate) struct Prepared<'a> {
    pub cols: usize,
    pub x: &'a [f32],
    pub sums: &'a [f32],
    pub q8: &'a [Q8Pair],
    pub q8k: &'a [Q8KBlock],
}

impl<'a> Prepared<'a> {
    #[inline(always)]
    pub fn x(&self, t: usize) -> &'a [f32] {
        &self.x[t * self.cols..(t + 1) * self.cols]
    }
    #[inline(always)]
    pub fn sums(&self, t: usize) -> &'a [f32] {
        let groups = self.cols / QK_LEGACY;
        &self.sums[t * groups..(t + 1) * groups]
    }
    #[inline(always)]
    pub fn q8(&self, t: usize) -> &'a [Q8Pair] {
        let pairs = pairs_per_row(self.cols);
        &self.q8[t * pairs..(t + 1) * pairs]
    }
    #[inline(always)]
    pub fn q8k(&self, t: usize) -> &'a [Q8KBlock] {
        let blocks = self.cols / QK_K;
        &self.q8k[t * blocks..(t + 1) * blocks]
    }
}

/// Which derived activations a kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// only the x86 kernels read 8-bit activations
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Needs {
    X,
    /// `x` rounded to f16 (llama.cpp's activations for F16 weights).
    XF16,
    /// `x` rounded to bf16 (llama.cpp's activations for BF16 weights).
    XBf16,
    XAndSums,
    Q8,
    Q8K,
}

/// Computes `out[t][i] = Σ_c W[rows.start + i][c] · x[t][c]` for every token `t`.
pub(crate) type Kernel =
    fn(w: Weights<'_>, input: &Prepared<'_>, rows: Range<usize>, out: &mut [&mut [f32]]);

/// The best kernel for `ty` and `act` on this CPU.
fn select(ty: GgmlType, act: Activations) -> (Kernel, Needs) {
    let (kernel, needs) = select_kernel(ty, act);
    // In the 8-bit mode the float formats meet activations rounded as
    // llama.cpp rounds them for those weights (its `vec_dot_type`).
    let needs = match (act, ty, needs) {
        (Activations::Q8, GgmlType::F16, Needs::X) => Needs::XF16,
        (Activations::Q8, GgmlType::BF16, Needs::X) => Needs::XBf16,
        _ => needs,
    };
    (kernel, needs)
}

fn select_kernel(ty: GgmlType, act: Activations) -> (Kernel, Needs) {
    #[cfg(target_arch = "x86_64")]
    if let Some(selected) = x86::select(ty, act) {
        return selected;
    }
    let _ = act;
    portable::select(ty)
}

/// Every kernel this CPU can run for `ty` and `act`, named: the selected
/// one, the AVX2 one without VNNI, the portable one.
#[cfg(test)]
fn candidates(ty: GgmlType, act: Activations) -> Vec<(&'static str, (Kernel, Needs))> {
    let mut all = vec![("selected", select(ty, act))];
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = x86::select_for(ty, act, false) {
        all.push(("avx2 without vnni", kernel));
    }
    all.push(("portable", portable::select(ty)));
    all
}

/// `y[t][r] = Σ_c W[r][c] · x[t][c]` for `t` in `0..n`: `W` is `rows` rows of
/// `cols` values of type `ty` (whole blocks, row-major as in a GGUF file),
/// `x` is `n × cols` and `y` is `n × rows`. Runs on the rayon pool. Slices
/// may have any alignment.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    act: Activations,
) -> Result<(), QuantError> {
    let input = MatmulInput::new(x, n, cols)?;
    matmul_input(ty, w, rows, &input, y, act)
}

/// [`matmul`] with activations shared between products (see [`MatmulInput`]).
pub fn matmul_input(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    input: &MatmulInput<'_>,
    y: &mut [f32],
    act: Activations,
) -> Result<(), QuantError> {
    matmul_many(&mut [Product { ty, w, rows, y }], input, act)
}

/// One product of [`matmul_many`]: `y = x·Wᵀ` with `W` of type `ty`, `rows`
/// rows of the input's length, and `y` holding `tokens × rows` values.
pub struct Product<'a> {
    pub ty: GgmlType,
    pub w: &'a [u8],
    pub rows: usize,
    pub y: &'a mut [f32],
}

/// Several products of the same activations (the Q, K and V projections;
/// the FFN gate and up) in one pass over the thread pool: one fork-join
/// for all of them instead of one per matrix. Checks every shape before
/// computing anything.
pub fn matmul_many(
    products: &mut [Product<'_>],
    input: &MatmulInput<'_>,
    act: Activations,
) -> Result<(), QuantError> {
    let mut jobs = Vec::with_capacity(products.len());
    for product in products.iter_mut() {
        let ty = product.ty;
        jobs.push(plan(ty, product.w, product.rows, input, product.y, || {
            select(ty, act)
        })?);
    }
    execute(jobs.into_iter().flatten().collect(), input.n);
    Ok(())
}

/// [`matmul_input`] with the kernel chosen by `pick`.
#[cfg(test)]
fn matmul_using(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    input: &MatmulInput<'_>,
    y: &mut [f32],
    pick: impl FnOnce() -> (Kernel, Needs),
) -> Result<(), QuantError> {
    let job = plan(ty, w, rows, input, y, pick)?;
    execute(job.into_iter().collect(), input.n);
    Ok(())
}

/// The kernel of rows of no values.
fn zero_kernel(_: Weights<'_>, _: &Prepared<'_>, _: Range<usize>, out: &mut [&mut [f32]]) {
    for out in out {
        out.fill(0.0);
    }
}

/// One product, checked and ready to run.
struct Job<'a> {
    kernel: Kernel,
    weights: Weights<'a>,
    input: Prepared<'a>,
    rows: usize,
}

impl Job<'_> {
    /// Rows `rows` into `out` (the matching part of each token's output).
    fn run(&self, rows: Range<usize>, out: &mut [&mut [f32]]) {
        // Row blocks small enough to stay cached while every token tile passes over them.
        let block = (ROW_BLOCK_BYTES / self.weights.row_bytes.max(1)).max(1);
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + block).min(rows.end);
            let mut sub: Vec<&mut [f32]> = out
                .iter_mut()
                .map(|o| &mut o[start - rows.start..end - rows.start])
                .collect();
            (self.kernel)(self.weights, &self.input, start..end, &mut sub);
            start = end;
        }
    }

    /// Multiply-adds.
    fn work(&self, n: usize) -> usize {
        self.rows * self.input.cols * n
    }
}

/// Checks the shapes of one product and picks its kernel; `None` when there
/// is nothing to compute (no tokens or no rows).
/// The job comes with its output, `tokens × rows`.
fn plan<'a>(
    ty: GgmlType,
    w: &'a [u8],
    rows: usize,
    input: &'a MatmulInput<'_>,
    y: &'a mut [f32],
    pick: impl FnOnce() -> (Kernel, Needs),
) -> Result<Option<(Job<'a>, &'a mut [f32])>, QuantError> {
    let (n, cols) = (input.n, input.cols);
    if !can_dequantize(ty) {
        return Err(QuantError::Unsupported { ty, op: Op::Matmul });
    }
    let shape_error = |problem| QuantError::MatmulShape {
        ty,
        rows,
        cols,
        problem,
    };
    if !cols.is_multiple_of(ty.block_size()) {
        return Err(shape_error(format!(
            "the row length is not a multiple of the block size {}",
            ty.block_size()
        )));
    }
    let row_bytes = cols / ty.block_size() * ty.type_size();
    if rows.checked_mul(row_bytes) != Some(w.len()) {
        return Err(shape_error(format!(
            "expected {} bytes of weights, found {}",
            rows.saturating_mul(row_bytes),
            w.len()
        )));
    }
    if n.checked_mul(rows) != Some(y.len()) {
        return Err(shape_error(format!(
            "the output for {n} tokens needs {} values, found {}",
            n.saturating_mul(rows),
            y.len()
        )));
    }
    if n == 0 || rows == 0 {
        return Ok(None);
    }
    // empty rows: a sum of nothing
    let (kernel, needs) = if cols == 0 {
        (zero_kernel as Kernel, Needs::X)
    } else {
        pick()
    };
    let prepared = Prepared {
        cols,
        x: match needs {
            Needs::XF16 => input.x_f16(),
            Needs::XBf16 => input.x_bf16(),
            _ => input.x,
        },
        sums: if needs == Needs::XAndSums {
            input.sums()
        } else {
            &[]
        },
        q8: if needs == Needs::Q8 { input.q8() } else { &[] },
        q8k: if needs == Needs::Q8K {
            input.q8k()
        } else {
            &[]
        },
    };
    let job = Job {
        kernel,
        weights: Weights {
            ty,
            data: w,
            row_bytes,
        },
        input: prepared,
        rows,
    };
    Ok(Some((job, y)))
}

/// A job's rows and the matching part of each token's output row.
type Task<'j, 'a> = (&'j Job<'a>, Range<usize>, Vec<&'j mut [f32]>);

/// Runs `jobs` (each `n` tokens) on the rayon pool: every job's rows split
/// into tasks in proportion to its work, all tasks in one parallel loop.
fn execute(jobs: Vec<(Job<'_>, &mut [f32])>, n: usize) {
    let (jobs, ys): (Vec<Job<'_>>, Vec<&mut [f32]>) = jobs.into_iter().unzip();
    let threads = rayon::current_num_threads();
    let total: usize = jobs.iter().map(|job| job.work(n)).sum();
    // A few tasks per thread even out threads that start late.
    let target_tasks = if threads == 1 || total < PARALLEL_MIN_WORK {
        1
    } else {
        threads * 4
    };
    let mut tasks: Vec<Task<'_, '_>> = Vec::new();
    for (job, y) in jobs.iter().zip(ys) {
        let share = (job.work(n) * target_tasks).div_ceil(total.max(1));
        let chunk = job.rows.div_ceil(share.max(1));
        let first = tasks.len();
        for start in (0..job.rows).step_by(chunk) {
            let end = (start + chunk).min(job.rows);
            tasks.push((job, start..end, Vec::with_capacity(n)));
        }
        // each token's output row cut at the same row boundaries
        for token_row in y.chunks_exact_mut(job.rows) {
            for (task, piece) in tasks[first..].iter_mut().zip(token_row.chunks_mut(chunk)) {
                task.2.push(piece);
            }
        }
    }
    if target_tasks == 1 {
        // on the calling thread: handing work to the pool and waiting costs more
        for (job, rows, mut out) in tasks {
            job.run(rows, &mut out);
        }
        return;
    }
    tasks
        .into_par_iter()
        .for_each(|(job, rows, mut out)| job.run(rows, &mut out));
}
