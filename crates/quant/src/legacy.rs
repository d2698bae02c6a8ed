//! The original ggml formats: blocks of 32 values with one f16 scale (and,
//! for the `_1` kinds, an f16 offset).
//!
//! Dequantization follows gguf-py's numpy code operation by operation; the
//! quantizers of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 reproduce `gguf.quants.quantize`
//! bit for bit (which, apart from how an all-zero block's scale is signed,
//! is ggml's `quantize_row_*_ref`). Q8_1 follows `quantize_row_q8_1_ref`.

use bytemuck::{Pod, Zeroable};

use crate::float::{f16_field, f16_field_from};
use crate::kernel::{block_kernels, lanes, DequantizeBlock, QuantizeBlock, Store};

/// Values per block of every legacy format (ggml's `QK4_0`, `QK4_1`,
/// `QK5_0`, `QK5_1`, `QK8_0` and `QK8_1` are all 32).
pub const QK_LEGACY: usize = 32;
const HALF: usize = QK_LEGACY / 2;

/// 4.5 bits per value: `x = d * (q - 8)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// scale, f16 little-endian
    pub d: [u8; 2],
    /// 4-bit quants: value `j` in the low nibble of byte `j`, value `j + 16` in its high nibble
    pub qs: [u8; QK_LEGACY / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// 5 bits per value: `x = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// scale, f16 little-endian
    pub d: [u8; 2],
    /// offset (the block's minimum), f16 little-endian
    pub m: [u8; 2],
    /// 4-bit quants, nibble order as in [`BlockQ4_0`]
    pub qs: [u8; QK_LEGACY / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// 5.5 bits per value: `x = d * (q - 16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_0 {
    /// scale, f16 little-endian
    pub d: [u8; 2],
    /// fifth bit of every quant: bit `j` of this little-endian u32 belongs to value `j`
    pub qh: [u8; 4],
    /// low 4 bits of the quants, nibble order as in [`BlockQ4_0`]
    pub qs: [u8; QK_LEGACY / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// 6 bits per value: `x = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_1 {
    /// scale, f16 little-endian
    pub d: [u8; 2],
    /// offset (the block's minimum), f16 little-endian
    pub m: [u8; 2],
    /// fifth bit of every quant, as in [`BlockQ5_0`]
    pub qh: [u8; 4],
    /// low 4 bits of the quants, nibble order as in [`BlockQ4_0`]
    pub qs: [u8; QK_LEGACY / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// 8.5 bits per value: `x = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// scale, f16 little-endian
    pub d: [u8; 2],
    /// signed quants in order
    pub qs: [i8; QK_LEGACY],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// 9 bits per value: [`BlockQ8_0`] plus `d * Σq`, the form the Q4_1/Q5_1 dot
/// products want their activations in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_1 {
    /// scale, f16 little-endian
    pub d: [u8; 2],
    /// `d * sum(qs)`, f16 little-endian
    pub s: [u8; 2],
    /// signed quants in order
    pub qs: [i8; QK_LEGACY],
}
const _: () = assert!(size_of::<BlockQ8_1>() == 36);

block_kernels!(BlockQ4_0, QK_LEGACY);
block_kernels!(BlockQ4_1, QK_LEGACY);
block_kernels!(BlockQ5_0, QK_LEGACY);
block_kernels!(BlockQ5_1, QK_LEGACY);
block_kernels!(BlockQ8_0, QK_LEGACY);
block_kernels!(BlockQ8_1, QK_LEGACY);

// Each kernel writes 8 values at a time: value `j` and `j + 16` come from
// the two nibbles of byte `j`, so bytes 8k..8k+8 give outputs 8k.. and 16+8k...

impl DequantizeBlock<QK_LEGACY> for BlockQ4_0 {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_LEGACY]) {
        let d = f16_field(self.d);
        for k in 0..2 {
            let q = &self.qs[8 * k..][..8];
            S::put8(
                &mut out[8 * k..],
                lanes(|i| d * f32::from((q[i] & 0x0f) as i8 - 8)),
            );
            S::put8(
                &mut out[HALF + 8 * k..],
                lanes(|i| d * f32::from((q[i] >> 4) as i8 - 8)),
            );
        }
    }
}

impl DequantizeBlock<QK_LEGACY> for BlockQ4_1 {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_LEGACY]) {
        let d = f16_field(self.d);
        let m = f16_field(self.m);
        for k in 0..2 {
            let q = &self.qs[8 * k..][..8];
            S::put8(&mut out[8 * k..], lanes(|i| d * f32::from(q[i] & 0x0f) + m));
            S::put8(
                &mut out[HALF + 8 * k..],
                lanes(|i| d * f32::from(q[i] >> 4) + m),
            );
        }
    }
}

/// `FIFTH_BITS[b][i]` is 16 when bit `i` of `b` is set: spreads one byte of
/// `qh` over the 8 values it belongs to. (A table, because LLVM turns a
/// per-lane bit test into per-lane shifts, which do not vectorize.)
static FIFTH_BITS: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut i = 0;
        while i < 8 {
            if byte & (1 << i) != 0 {
                table[byte][i] = 16;
            }
            i += 1;
        }
        byte += 1;
    }
    table
};

/// 5-bit quants `8k..8k+8` and `16+8k..16+8k+8` of a Q5 block.
#[inline(always)]
fn q5_quants(qh: [u8; 4], qs: &[u8; HALF], k: usize) -> ([u8; 8], [u8; 8]) {
    let q = &qs[8 * k..][..8];
    let (low_fifth, high_fifth) = (
        &FIFTH_BITS[usize::from(qh[k])],
        &FIFTH_BITS[usize::from(qh[2 + k])],
    );
    (
        std::array::from_fn(|i| (q[i] & 0x0f) | low_fifth[i]),
        std::array::from_fn(|i| (q[i] >> 4) | high_fifth[i]),
    )
}

impl DequantizeBlock<QK_LEGACY> for BlockQ5_0 {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_LEGACY]) {
        let d = f16_field(self.d);
        for k in 0..2 {
            let (low, high) = q5_quants(self.qh, &self.qs, k);
            S::put8(
                &mut out[8 * k..],
                lanes(|i| d * f32::from(low[i] as i8 - 16)),
            );
            S::put8(
                &mut out[HALF + 8 * k..],
                lanes(|i| d * f32::from(high[i] as i8 - 16)),
            );
        }
    }
}

impl DequantizeBlock<QK_LEGACY> for BlockQ5_1 {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_LEGACY]) {
        let d = f16_field(self.d);
        let m = f16_field(self.m);
        for k in 0..2 {
            let (low, high) = q5_quants(self.qh, &self.qs, k);
            S::put8(&mut out[8 * k..], lanes(|i| d * f32::from(low[i]) + m));
            S::put8(
                &mut out[HALF + 8 * k..],
                lanes(|i| d * f32::from(high[i]) + m),
            );
        }
    }
}

/// `q * d` for Q8_0 and Q8_1 (gguf-py multiplies in this order; it is commutative anyway).
#[inline(always)]
fn dequantize_q8<S: Store>(d: f32, qs: &[i8; QK_LEGACY], out: &mut [S::Elem; QK_LEGACY]) {
    for k in 0..4 {
        let q = &qs[8 * k..][..8];
        S::put8(&mut out[8 * k..], lanes(|i| f32::from(q[i]) * d));
    }
}

impl DequantizeBlock<QK_LEGACY> for BlockQ8_0 {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_LEGACY]) {
        dequantize_q8::<S>(f16_field(self.d), &self.qs, out);
    }
}

impl DequantizeBlock<QK_LEGACY> for BlockQ8_1 {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_LEGACY]) {
        dequantize_q8::<S>(f16_field(self.d), &self.qs, out);
    }
}

/// The value of largest magnitude, keeping its sign; the first one on ties
/// (numpy's `argmax`, ggml's strict `<` scan). An all-zero block yields its
/// first value, so `-0.0` leads to a scale of `+0.0` as it does in gguf-py.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = x[0];
    for &v in &x[1..] {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((x[0], x[0]), |(min, max), &v| {
        (if v < min { v } else { min }, if v > max { v } else { max })
    })
}

/// `1/d`, or 0 for an all-zero block.
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// gguf-py's `np.trunc(v).astype(np.uint8).clip(0, max)` for the values a
/// finite block produces (`as u8` saturates where numpy's cast is undefined).
fn trunc_clip(v: f32, max: u8) -> u8 {
    (v.trunc() as u8).min(max)
}

fn pack_nibbles(q: &[u8; QK_LEGACY]) -> [u8; HALF] {
    std::array::from_fn(|j| (q[j] & 0x0f) | (q[j + HALF] << 4))
}

fn pack_fifth_bits(q: &[u8; QK_LEGACY]) -> [u8; 4] {
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |qh, (j, &q)| qh | (u32::from(q >> 4) << j));
    qh.to_le_bytes()
}

impl QuantizeBlock<QK_LEGACY> for BlockQ4_0 {
    fn quantize(x: &[f32; QK_LEGACY]) -> Self {
        let d = signed_absmax(x) / -8.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clip(v * id + 8.5, 15));
        Self {
            d: f16_field_from(d),
            qs: pack_nibbles(&q),
        }
    }
}

impl QuantizeBlock<QK_LEGACY> for BlockQ4_1 {
    fn quantize(x: &[f32; QK_LEGACY]) -> Self {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clip((v - min) * id + 0.5, 15));
        Self {
            d: f16_field_from(d),
            m: f16_field_from(min),
            qs: pack_nibbles(&q),
        }
    }
}

impl QuantizeBlock<QK_LEGACY> for BlockQ5_0 {
    fn quantize(x: &[f32; QK_LEGACY]) -> Self {
        let d = signed_absmax(x) / -16.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clip(v * id + 16.5, 31));
        Self {
            d: f16_field_from(d),
            qh: pack_fifth_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

impl QuantizeBlock<QK_LEGACY> for BlockQ5_1 {
    fn quantize(x: &[f32; QK_LEGACY]) -> Self {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clip((v - min) * id + 0.5, 31));
        Self {
            d: f16_field_from(d),
            m: f16_field_from(min),
            qh: pack_fifth_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

/// `round(x / d)` with `d = max|x| / 127`, rounding halves away from zero
/// (C's `roundf`, gguf-py's `np_roundf`).
fn quantize_q8(x: &[f32; QK_LEGACY]) -> (f32, [i8; QK_LEGACY]) {
    let amax = x.iter().fold(0.0f32, |amax, v| amax.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    (d, x.map(|v| (v * id).round() as i8))
}

impl QuantizeBlock<QK_LEGACY> for BlockQ8_0 {
    fn quantize(x: &[f32; QK_LEGACY]) -> Self {
        let (d, qs) = quantize_q8(x);
        Self {
            d: f16_field_from(d),
            qs,
        }
    }
}

impl QuantizeBlock<QK_LEGACY> for BlockQ8_1 {
    fn quantize(x: &[f32; QK_LEGACY]) -> Self {
        let (d, qs) = quantize_q8(x);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        Self {
            d: f16_field_from(d),
            s: f16_field_from(sum as f32 * d),
            qs,
        }
    }
}
