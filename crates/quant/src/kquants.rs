//! The K-quants: super-blocks of [`QK_K`] = 256 values split into 16 or 8
//! sub-blocks, each with its own quantized scale (and min), under one or two
//! f16 super-block scales.
//!
//! Dequantization follows gguf-py's numpy code operation by operation (the
//! sub-block scale `d * sc` is rounded to f32 first, then multiplied by the
//! quant, then the min is subtracted), which is also ggml's order. The
//! quantizers live in `kquantize.rs`.

use bytemuck::{Pod, Zeroable};

use crate::float::f16_field;
use crate::kernel::{block_kernels, lanes, DequantizeBlock, Store};
pub use gguf::QK_K;

/// Bytes of packed 6-bit scales and mins in Q4_K and Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// 2.625 bits per value: 16 sub-blocks of 16, `x = d * sc * q - dmin * m`
/// with 4-bit `sc`, `m` and 2-bit `q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ2K {
    /// per sub-block: scale in the low nibble, min in the high nibble
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants: value `128*h + 32*s + l` is bits `2s..2s+2` of byte `32*h + l`
    pub qs: [u8; QK_K / 4],
    /// super-block scale for the scales, f16 little-endian
    pub d: [u8; 2],
    /// super-block scale for the mins, f16 little-endian
    pub dmin: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);

/// 3.4375 bits per value: 16 sub-blocks of 16, `x = d * (sc - 32) * q`
/// with 6-bit `sc` and `q` in -4..=3.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ3K {
    /// high bit of the quants, *inverted* (set means q >= 0): value `32*b + l` is bit `b` of byte `l`
    pub hmask: [u8; QK_K / 8],
    /// low 2 bits of the quants, laid out as in [`BlockQ2K::qs`]
    pub qs: [u8; QK_K / 4],
    /// 16 6-bit scales: low nibbles in bytes 0..8 (sub-block `i` in byte `i % 8`,
    /// nibble `i / 8`), high 2 bits in bytes 8..12 (byte `8 + i % 4`, bits `2 * (i / 4)`)
    pub scales: [u8; 12],
    /// super-block scale, f16 little-endian
    pub d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);

/// 4.5 bits per value: 8 sub-blocks of 32, `x = d * sc * q - dmin * m`
/// with 6-bit `sc`, `m` and 4-bit `q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4K {
    /// super-block scale for the scales, f16 little-endian
    pub d: [u8; 2],
    /// super-block scale for the mins, f16 little-endian
    pub dmin: [u8; 2],
    /// 8 6-bit scales and 8 6-bit mins, packed as [`scale_min_k4`] reads them
    pub scales: [u8; K_SCALE_SIZE],
    /// 4-bit quants: value `64*c + l` in the low nibble of byte `32*c + l`, value `64*c + 32 + l` in its high nibble
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// 5.5 bits per value: [`BlockQ4K`] plus a fifth bit per quant.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5K {
    /// super-block scale for the scales, f16 little-endian
    pub d: [u8; 2],
    /// super-block scale for the mins, f16 little-endian
    pub dmin: [u8; 2],
    /// 8 6-bit scales and 8 6-bit mins, packed as [`scale_min_k4`] reads them
    pub scales: [u8; K_SCALE_SIZE],
    /// fifth bit of the quants: value `32*b + l` is bit `b` of byte `l`
    pub qh: [u8; QK_K / 8],
    /// low 4 bits of the quants, laid out as in [`BlockQ4K::qs`]
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// 6.5625 bits per value: 16 sub-blocks of 16, `x = d * sc * (q - 32)`
/// with 8-bit signed `sc` and 6-bit `q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ6K {
    /// low 4 bits of the quants: value `128*h + 64*n + k` in nibble `n` of byte `64*h + k`
    pub ql: [u8; QK_K / 2],
    /// high 2 bits of the quants: value `128*h + 32*s + l` in bits `2s..2s+2` of byte `32*h + l`
    pub qh: [u8; QK_K / 4],
    /// signed 8-bit scale per sub-block
    pub scales: [i8; QK_K / 16],
    /// super-block scale, f16 little-endian
    pub d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// 9.125 bits per value, used for activations in the K-quant dot products:
/// `x = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8K {
    /// scale, f32 little-endian
    pub d: [u8; 4],
    /// signed quants in order
    pub qs: [i8; QK_K],
    /// sum of each 16 quants, i16 little-endian
    pub bsums: [[u8; 2]; QK_K / 16],
}
const _: () = assert!(size_of::<BlockQ8K>() == 292);

block_kernels!(BlockQ2K, QK_K);
block_kernels!(BlockQ3K, QK_K);
block_kernels!(BlockQ4K, QK_K);
block_kernels!(BlockQ5K, QK_K);
block_kernels!(BlockQ6K, QK_K);
block_kernels!(BlockQ8K, QK_K);

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block: for `j < 4`
/// the low 6 bits of bytes `j` and `j + 4`; above that a nibble of byte
/// `j + 4` plus the top two bits of bytes `j - 4` and `j`.
#[inline(always)]
pub fn scale_min_k4(j: usize, scales: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// The 16 signed scales of a Q3_K block (`sc - 32`).
#[inline(always)]
pub fn q3k_scales(scales: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let low = (scales[i % 8] >> (4 * (i / 8))) & 0x0f;
        let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

// The kernels write 8 values at a time (see `kernel::Store`); the loops have
// constant bounds so they unroll and every index is a constant.

impl DequantizeBlock<QK_K> for BlockQ2K {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_K]) {
        let d = f16_field(self.d);
        let dmin = f16_field(self.dmin);
        for h in 0..2 {
            for s in 0..4 {
                for half in 0..2 {
                    let sc = self.scales[8 * h + 2 * s + half];
                    let dl = d * f32::from(sc & 0x0f);
                    let ml = dmin * f32::from(sc >> 4);
                    for k in 0..2 {
                        let q = &self.qs[32 * h + 16 * half + 8 * k..][..8];
                        let at = 128 * h + 32 * s + 16 * half + 8 * k;
                        S::put8(
                            &mut out[at..],
                            lanes(|i| dl * f32::from((q[i] >> (2 * s)) & 3) - ml),
                        );
                    }
                }
            }
        }
    }
}

impl DequantizeBlock<QK_K> for BlockQ3K {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_K]) {
        let d = f16_field(self.d);
        let scales = q3k_scales(&self.scales);
        for h in 0..2 {
            for s in 0..4 {
                let bit = 4 * h + s;
                for half in 0..2 {
                    let dl = d * f32::from(scales[8 * h + 2 * s + half]);
                    for k in 0..2 {
                        let q = &self.qs[32 * h + 16 * half + 8 * k..][..8];
                        let hm = &self.hmask[16 * half + 8 * k..][..8];
                        let at = 128 * h + 32 * s + 16 * half + 8 * k;
                        S::put8(
                            &mut out[at..],
                            lanes(|i| {
                                let low = ((q[i] >> (2 * s)) & 3) as i8;
                                let missing_high = (((hm[i] >> bit) & 1) ^ 1) as i8;
                                dl * f32::from(low - (missing_high << 2))
                            }),
                        );
                    }
                }
            }
        }
    }
}

impl DequantizeBlock<QK_K> for BlockQ4K {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_K]) {
        let d = f16_field(self.d);
        let dmin = f16_field(self.dmin);
        for chunk in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * chunk, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &self.scales);
            let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for k in 0..4 {
                let q = &self.qs[32 * chunk + 8 * k..][..8];
                S::put8(
                    &mut out[64 * chunk + 8 * k..],
                    lanes(|i| d1 * f32::from(q[i] & 0x0f) - min1),
                );
                S::put8(
                    &mut out[64 * chunk + 32 + 8 * k..],
                    lanes(|i| d2 * f32::from(q[i] >> 4) - min2),
                );
            }
        }
    }
}

impl DequantizeBlock<QK_K> for BlockQ5K {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_K]) {
        let d = f16_field(self.d);
        let dmin = f16_field(self.dmin);
        for chunk in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * chunk, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &self.scales);
            let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for k in 0..4 {
                let q = &self.qs[32 * chunk + 8 * k..][..8];
                let qh = &self.qh[8 * k..][..8];
                let low = |i: usize| (q[i] & 0x0f) | (((qh[i] >> (2 * chunk)) & 1) << 4);
                let high = |i: usize| (q[i] >> 4) | (((qh[i] >> (2 * chunk + 1)) & 1) << 4);
                S::put8(
                    &mut out[64 * chunk + 8 * k..],
                    lanes(|i| d1 * f32::from(low(i)) - min1),
                );
                S::put8(
                    &mut out[64 * chunk + 32 + 8 * k..],
                    lanes(|i| d2 * f32::from(high(i)) - min2),
                );
            }
        }
    }
}

impl DequantizeBlock<QK_K> for BlockQ6K {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_K]) {
        let d = f16_field(self.d);
        let dl: [f32; QK_K / 16] = std::array::from_fn(|g| d * f32::from(self.scales[g]));
        let q = |low: u8, high: u8| f32::from((low | (high << 4)) as i8 - 32);
        for h in 0..2 {
            for k in 0..4 {
                // values 128h + 8k + i and +32, +64, +96 share these bytes
                let a = &self.ql[64 * h + 8 * k..][..8];
                let b = &self.ql[64 * h + 32 + 8 * k..][..8];
                let hb = &self.qh[32 * h + 8 * k..][..8];
                let (g, at) = (8 * h + k / 2, 128 * h + 8 * k);
                S::put8(&mut out[at..], lanes(|i| dl[g] * q(a[i] & 0x0f, hb[i] & 3)));
                S::put8(
                    &mut out[at + 32..],
                    lanes(|i| dl[g + 2] * q(b[i] & 0x0f, (hb[i] >> 2) & 3)),
                );
                S::put8(
                    &mut out[at + 64..],
                    lanes(|i| dl[g + 4] * q(a[i] >> 4, (hb[i] >> 4) & 3)),
                );
                S::put8(
                    &mut out[at + 96..],
                    lanes(|i| dl[g + 6] * q(b[i] >> 4, hb[i] >> 6)),
                );
            }
        }
    }
}

impl DequantizeBlock<QK_K> for BlockQ8K {
    #[inline(always)]
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; QK_K]) {
        let d = f32::from_le_bytes(self.d);
        for k in 0..QK_K / 8 {
            let q = &self.qs[8 * k..][..8];
            S::put8(&mut out[8 * k..], lanes(|i| d * f32::from(q[i])));
        }
    }
}
