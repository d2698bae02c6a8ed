//! Kernels for every format on every CPU: decode a run of blocks with the
//! crate's dequantizer into a small buffer that stays in L1, then take its
//! dot product with each token of the tile. Also the scalar activation
//! quantizers, which the AVX2 ones must match.

use std::ops::Range;

use super::{Kernel, Needs, Prepared, Q8Block, Q8KBlock, Weights, TOKEN_TILE};
use crate::kernel::{dequantize_serial, Dequantize};
#[allow(unused_imports)] // the block types are named inside with_kernel!
use crate::{
    float, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType, QK_K, QK_LEGACY,
};

/// Values decoded at a time (a multiple of every block size).
const CHUNK: usize = 256;

/// The portable kernel of `ty`, which reads the f32 activations.
pub(super) fn select(ty: GgmlType) -> (Kernel, Needs) {
    with_kernel!(
        ty,
        K => (kernel::<K> as Kernel, Needs::X),
        unsupported => unreachable!("matmul checked that {ty} can be dequantized")
    )
}

fn kernel<K: Dequantize>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    let mut t0 = 0;
    while t0 < out.len() {
        let tile = (out.len() - t0).min(TOKEN_TILE);
        match tile {
            1 => tile_rows::<K, 1>(w, input, rows.clone(), out, t0),
            2 => tile_rows::<K, 2>(w, input, rows.clone(), out, t0),
            3 => tile_rows::<K, 3>(w, input, rows.clone(), out, t0),
            _ => tile_rows::<K, TOKEN_TILE>(w, input, rows.clone(), out, t0),
        }
        t0 += tile;
    }
}

/// Tokens `t0..t0 + T` against `rows`.
#[inline(always)]
pub(super) fn tile_rows<K: Dequantize, const T: usize>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
    t0: usize,
) {
    let x: [&[f32]; T] = std::array::from_fn(|i| input.x(t0 + i));
    let (block_size, type_size) = (w.ty.block_size(), w.ty.type_size());
    let chunk_bytes = CHUNK / block_size * type_size;
    let mut decoded = [0f32; CHUNK];
    for r in rows.clone() {
        let mut acc = [[0f32; 8]; T];
        for (c, bytes) in w.row(r).chunks(chunk_bytes).enumerate() {
            let values = &mut decoded[..bytes.len() / type_size * block_size];
            dequantize_serial::<K>(bytes, values);
            for (acc, x) in acc.iter_mut().zip(&x) {
                dot_into(values, &x[c * CHUNK..][..values.len()], acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            out[t0 + i][r - rows.start] = acc.iter().sum();
        }
    }
}

/// `acc[i % 8] += a[i] * b[i]`, in eight lanes that vectorize.
#[inline(always)]
fn dot_into(a: &[f32], b: &[f32], acc: &mut [f32; 8]) {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a8.remainder(), b8.remainder());
    for (a, b) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    for (i, (a, b)) in a_rest.iter().zip(b_rest).enumerate() {
        acc[i] += a * b;
    }
}

/// Σx of 32 values, in eight lanes.
#[inline(always)]
pub(super) fn sum32(x: &[f32; QK_LEGACY]) -> f32 {
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for i in 0..8 {
            lanes[i] += chunk[i];
        }
    }
    lanes.iter().sum()
}

/// Scale `amax / 127` and its inverse (0 for an all-zero block).
#[inline(always)]
pub(super) fn q8_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if amax == 0.0 { 0.0 } else { 127.0 / amax };
    (d, id)
}

/// `round(x · id)` to nearest even (what `vroundps` does), as i8.
#[inline(always)]
fn q8(x: f32, id: f32) -> i8 {
    (x * id).round_ties_even() as i8
}

/// The scalar [`Q8Block`] quantizer: `d = max|x| / 127`, `q = round(x / d)`,
/// as llama.cpp's `block_q8_0`/`block_q8_1` keep them (see [`q8_block`]).
pub(super) fn quantize_q8_block(x: &[f32; QK_LEGACY]) -> Q8Block {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (d, id) = q8_scale(amax);
    let qs = x.map(|v| q8(v, id));
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    q8_block(qs, d, sum)
}

/// A [`Q8Block`] with llama.cpp's stored precision: the scale `d` rounded
/// to f16 (`block_q8_0.d`, `block_q8_1.d`), the values quantized with the
/// f32 scale before that rounding; `s` is `d·Σq` with that f16 `d`, in f32
/// (llama.cpp's `block_q8_1.s` rounds it to f16 as well: at most one f16
/// step apart, on the min term of Q4_1 and Q5_1 only).
#[inline(always)]
pub(super) fn q8_block(qs: [i8; QK_LEGACY], d: f32, sum: i32) -> Q8Block {
    let d = round_f16(d);
    Q8Block {
        qs,
        d,
        s: d * sum as f32,
    }
}

/// `x` rounded to the nearest f16 (ties to even), as f32.
#[inline(always)]
pub(crate) fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// The scalar [`Q8KBlock`] quantizer, as [`quantize_q8_block`] over 256 values.
pub(super) fn quantize_q8k_block(x: &[f32; QK_K]) -> Q8KBlock {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (d, id) = q8_scale(amax);
    let qs = x.map(|v| q8(v, id));
    let bsums =
        std::array::from_fn(|g| qs[16 * g..16 * (g + 1)].iter().map(|&q| i16::from(q)).sum());
    Q8KBlock { qs, bsums, d }
}
