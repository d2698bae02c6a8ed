//! Plain float formats (F32, F16, BF16) and the half-precision conversions
//! every block format uses for its scales.
//!
//! The reference for bit patterns is numpy, which gguf-py (and so most GGUF
//! files) is built on: f16 → f32 keeps a NaN's payload *and* its signalling
//! bit, which hardware F16C and the `half` crate do not (they quiet it), so
//! the conversion here is done on the bits.

use half::f16;

use crate::kernel::{lanes, Dequantize, Quantize, Store};

/// f16 bits → f32, exactly as numpy's `astype(np.float32)` does it
/// (every value, including signalling NaNs, keeps its bits).
///
/// Branch-free, so that it vectorizes when inlined into a kernel's lanes.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    // exponent and mantissa moved into f32 position, exponent still biased by 15
    let exp_man = (h & 0x7fff) << 13;
    let exponent = h & 0x7c00;
    let normal = exp_man + ((127 - 15) << 23);
    // inf / NaN: maximum exponent, payload kept as it is
    let inf_nan = exp_man + ((255 - 31) << 23);
    // zero / subnormal: 2^-14 * (1 + m/1024) - 2^-14 is exact and leaves m * 2^-24
    let subnormal = (f32::from_bits(exp_man + (113 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let is_inf_nan = 0u32.wrapping_sub(u32::from(exponent == 0x7c00));
    let is_subnormal = 0u32.wrapping_sub(u32::from(exponent == 0));
    let magnitude = (normal & !(is_inf_nan | is_subnormal))
        | (inf_nan & is_inf_nan)
        | (subnormal & is_subnormal);
    f32::from_bits(magnitude | sign)
}

/// Little-endian f16 field of a block → f32.
#[inline(always)]
pub(crate) fn f16_field(bytes: [u8; 2]) -> f32 {
    f16_to_f32(u16::from_le_bytes(bytes))
}

/// f32 → little-endian f16 field, round to nearest even (ggml's
/// `GGML_FP32_TO_FP16` and numpy's `astype(np.float16)` agree on every
/// non-NaN value; scales are never NaN for finite input).
#[inline(always)]
pub(crate) fn f16_field_from(value: f32) -> [u8; 2] {
    f16::from_f32(value).to_bits().to_le_bytes()
}

/// f32 → f16 bits as numpy's `astype(np.float16)` does it: round to nearest
/// even, and a NaN keeps its sign, its signalling bit and the top of its
/// payload (a payload that would vanish becomes 1, so it stays a NaN).
#[inline(always)]
pub(crate) fn f32_to_f16_numpy(value: f32) -> u16 {
    if value.is_nan() {
        let bits = value.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let payload = ((bits & 0x007f_ffff) >> 13) as u16;
        sign | 0x7c00 | payload.max(1)
    } else {
        f16::from_f32(value).to_bits()
    }
}

/// f32 → bf16 bits as gguf-py (and ggml's `ggml_compute_fp32_to_bf16`) do it:
/// a NaN becomes a quiet NaN with its sign, everything else rounds to
/// nearest even (overflow goes to infinity).
#[inline(always)]
pub(crate) fn f32_to_bf16(value: f32) -> u16 {
    let mut bits = value.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        bits = (bits & 0xffff_0000) | (64 << 16);
    }
    ((u64::from(bits) + u64::from(0x7fff + ((bits >> 16) & 1))) >> 16) as u16
}

/// bf16 bits → f32 (exact: bf16 is the top half of an f32).
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Marker types for the plain float formats' kernels.
pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;

/// Dequantizes `src`, `SIZE`-byte little-endian values, with `decode`.
#[inline(always)]
fn dequantize_scalars<const SIZE: usize, S: Store>(
    src: &[u8],
    dst: &mut [S::Elem],
    decode: impl Fn([u8; SIZE]) -> f32,
) {
    let value = |bytes: &[u8]| decode(bytes.try_into().expect("chunks of SIZE bytes"));
    let mut src_chunks = src.chunks_exact(8 * SIZE);
    let mut dst_chunks = dst.chunks_exact_mut(8);
    for (src, dst) in (&mut src_chunks).zip(&mut dst_chunks) {
        S::put8(dst, lanes(|i| value(&src[SIZE * i..SIZE * (i + 1)])));
    }
    for (src, dst) in src_chunks
        .remainder()
        .chunks_exact(SIZE)
        .zip(dst_chunks.into_remainder())
    {
        *dst = S::put1(value(src));
    }
}

impl Dequantize for F32 {
    #[inline(always)]
    fn dequantize<S: Store>(src: &[u8], dst: &mut [S::Elem]) {
        dequantize_scalars::<4, S>(src, dst, f32::from_le_bytes);
    }
}

impl Dequantize for F16 {
    #[inline(always)]
    fn dequantize<S: Store>(src: &[u8], dst: &mut [S::Elem]) {
        dequantize_scalars::<2, S>(src, dst, |bytes| f16_to_f32(u16::from_le_bytes(bytes)));
    }
}

impl Dequantize for BF16 {
    #[inline(always)]
    fn dequantize<S: Store>(src: &[u8], dst: &mut [S::Elem]) {
        dequantize_scalars::<2, S>(src, dst, |bytes| bf16_to_f32(u16::from_le_bytes(bytes)));
    }
}

impl Quantize for F32 {
    fn quantize(src: &[f32], dst: &mut [u8]) {
        for (bytes, value) in dst.chunks_exact_mut(4).zip(src) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
    }
}

impl Quantize for F16 {
    fn quantize(src: &[f32], dst: &mut [u8]) {
        for (bytes, value) in dst.chunks_exact_mut(2).zip(src) {
            bytes.copy_from_slice(&f32_to_f16_numpy(*value).to_le_bytes());
        }
    }
}

impl Quantize for BF16 {
    fn quantize(src: &[f32], dst: &mut [u8]) {
        for (bytes, value) in dst.chunks_exact_mut(2).zip(src) {
            bytes.copy_from_slice(&f32_to_bf16(*value).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_to_f32_matches_half_on_every_non_nan_value() {
        for bits in 0..=u16::MAX {
            let ours = f16_to_f32(bits);
            let reference = f16::from_bits(bits);
            if reference.is_nan() {
                assert!(ours.is_nan(), "{bits:#06x}");
                // numpy keeps the payload and the (un)quiet bit as they are
                let payload = u32::from(bits & 0x3ff) << 13;
                assert_eq!(ours.to_bits() & 0x007f_ffff, payload, "{bits:#06x}");
                assert_eq!(ours.is_sign_negative(), bits & 0x8000 != 0);
            } else {
                assert_eq!(ours.to_bits(), reference.to_f32().to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn f32_to_f16_numpy_nan_rules() {
        // values checked against numpy 2.4 `astype(np.float16)`
        assert_eq!(f32_to_f16_numpy(f32::from_bits(0x7f80_0001)), 0x7c01);
        assert_eq!(f32_to_f16_numpy(f32::from_bits(0x7fc0_0001)), 0x7e00);
        assert_eq!(f32_to_f16_numpy(f32::from_bits(0xffa0_0000)), 0xfd00);
        assert_eq!(f32_to_f16_numpy(65520.0), 0x7c00, "rounds up to infinity");
        assert_eq!(f32_to_f16_numpy(65519.0), 0x7bff);
        assert_eq!(f32_to_f16_numpy(-0.0), 0x8000);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f80_8000)),
            0x3f80,
            "tie to even"
        );
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f81_8000)),
            0x3f82,
            "tie to even"
        );
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16(f32::from_bits(0xff80_0001)), 0xffc0);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "overflow to infinity");
        assert_eq!(bf16_to_f32(0xc040).to_bits(), (-3.0f32).to_bits());
    }
}
