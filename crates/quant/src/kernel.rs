//! The per-type kernel traits and the serial drivers that run them.
//!
//! Every format's code is written once as plain scalar Rust, shaped so the
//! compiler vectorizes it. The drivers compile it twice: for the baseline
//! target and, on x86-64, inside a function with AVX2 and F16C enabled,
//! picked at run time. Neither build may change a result: Rust never
//! contracts `a * b + c` into a fused multiply-add, so the vector code does
//! the same IEEE operations in the same order as the scalar code (and as
//! gguf-py's numpy code, which is what the results are tested against).

use bytemuck::Pod;
use half::f16;

/// Dequantizing one block of `N` values.
pub(crate) trait DequantizeBlock<const N: usize>: Pod {
    fn dequantize(&self, out: &mut [f32; N]);
}

/// Quantizing `N` values into one block.
pub(crate) trait QuantizeBlock<const N: usize>: Pod {
    fn quantize(values: &[f32; N]) -> Self;
}

/// One ggml type's dequantization of a run of whole blocks
/// (`src.len()` a multiple of the type size, `dst.len()` the matching number of values).
pub(crate) trait Dequantize {
    fn dequantize(src: &[u8], dst: &mut [f32]);
}

/// One ggml type's quantization of a run of whole blocks.
pub(crate) trait Quantize {
    fn quantize(src: &[f32], dst: &mut [u8]);
}

/// The loop every block format shares. `inline(always)` so that it, and the
/// block code it calls, is compiled again inside each target-feature driver.
#[inline(always)]
pub(crate) fn dequantize_blocks<const N: usize, B: DequantizeBlock<N>>(src: &[u8], dst: &mut [f32]) {
    let blocks: &[B] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(N)) {
        let out: &mut [f32; N] = out.try_into().expect("chunks_exact_mut yields N values");
        block.dequantize(out);
    }
}

pub(crate) fn quantize_blocks<const N: usize, B: QuantizeBlock<N>>(src: &[f32], dst: &mut [u8]) {
    let blocks: &mut [B] = bytemuck::cast_slice_mut(dst);
    for (block, values) in blocks.iter_mut().zip(src.chunks_exact(N)) {
        let values: &[f32; N] = values.try_into().expect("chunks_exact yields N values");
        *block = B::quantize(values);
    }
}

/// Implements [`Dequantize`] (and [`Quantize`] when asked) for a block struct.
macro_rules! block_kernels {
    ($block:ty, $n:expr) => {
        impl $crate::kernel::Dequantize for $block {
            #[inline(always)]
            fn dequantize(src: &[u8], dst: &mut [f32]) {
                $crate::kernel::dequantize_blocks::<{ $n }, $block>(src, dst)
            }
        }
    };
    ($block:ty, $n:expr, quantize) => {
        $crate::kernel::block_kernels!($block, $n);
        impl $crate::kernel::Quantize for $block {
            fn quantize(src: &[f32], dst: &mut [u8]) {
                $crate::kernel::quantize_blocks::<{ $n }, $block>(src, dst)
            }
        }
    };
}
pub(crate) use block_kernels;

/// Values converted to f16 per step of the f16 drivers: a multiple of every
/// block size, small enough that the f32 staging buffer stays in L1.
const F16_STAGE: usize = 256;

/// Dequantizes whole blocks of `K` into f32, on the best instruction set this CPU has.
pub(crate) fn dequantize_serial<K: Dequantize>(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_f16c() {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        unsafe { x86::dequantize_avx2::<K>(src, dst) };
        return;
    }
    K::dequantize(src, dst);
}

/// Dequantizes whole blocks of `K` into f16 (f32 result rounded to nearest even).
/// `bytes_per_stage` is the size of the blocks that make `F16_STAGE` values.
pub(crate) fn dequantize_f16_serial<K: Dequantize>(src: &[u8], dst: &mut [f16], bytes_per_stage: usize) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_f16c() {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        unsafe { x86::dequantize_f16_avx2::<K>(src, dst, bytes_per_stage) };
        return;
    }
    let mut stage = [0f32; F16_STAGE];
    for (src, dst) in src.chunks(bytes_per_stage).zip(dst.chunks_mut(F16_STAGE)) {
        let stage = &mut stage[..dst.len()];
        K::dequantize(src, stage);
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, stage);
    }
}

/// Bytes of `ty` that hold `F16_STAGE` values.
pub(crate) fn bytes_per_f16_stage(ty: gguf::GgmlType) -> usize {
    F16_STAGE / ty.block_size() * ty.type_size()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Dequantize, F16_STAGE};
    use half::f16;
    use std::arch::x86_64::{__m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128};

    #[inline]
    pub(super) fn has_avx2_f16c() -> bool {
        // std caches the CPUID result; this is two loads and a branch.
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dequantize_avx2<K: Dequantize>(src: &[u8], dst: &mut [f32]) {
        K::dequantize(src, dst);
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dequantize_f16_avx2<K: Dequantize>(src: &[u8], dst: &mut [f16], bytes_per_stage: usize) {
        let mut stage = [0f32; F16_STAGE];
        for (src, dst) in src.chunks(bytes_per_stage).zip(dst.chunks_mut(F16_STAGE)) {
            let stage = &mut stage[..dst.len()];
            K::dequantize(src, stage);
            f32_to_f16_f16c(stage, dst);
        }
    }

    /// Round-to-nearest-even f32 → f16 with F16C; the same results as
    /// `half::f16::from_f32` (both quiet a NaN and keep its payload's top bits).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(super) unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [f16]) {
        let mut src_chunks = src.chunks_exact(8);
        let mut dst_chunks = dst.chunks_exact_mut(8);
        for (s, d) in (&mut src_chunks).zip(&mut dst_chunks) {
            // SAFETY: `s` holds 8 f32 and `d` 8 f16 (16 bytes); both accesses are unaligned ones.
            unsafe {
                let packed = _mm256_cvtps_ph::<0>(_mm256_loadu_ps(s.as_ptr()));
                _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), packed);
            }
        }
        for (s, d) in src_chunks.remainder().iter().zip(dst_chunks.into_remainder()) {
            *d = f16::from_f32(*s);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn f16c_conversion_matches_half_on_every_bit_pattern_class() {
            if !has_avx2_f16c() {
                return; // nothing to compare on this CPU
            }
            // every 2^-16th f32 bit pattern plus the neighbourhood of each f16
            // rounding boundary and every NaN/inf class
            let mut values: Vec<f32> = (0..=u32::MAX).step_by(65_537).map(f32::from_bits).collect();
            for h in 0..=u16::MAX {
                let exact = f16::from_bits(h).to_f32().to_bits();
                for delta in [0u32, 1, 0x0fff, 0x1000, 0x1001] {
                    values.push(f32::from_bits(exact.wrapping_add(delta)));
                    values.push(f32::from_bits(exact.wrapping_sub(delta)));
                }
            }
            values.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::from_bits(0x7f80_0001), f32::from_bits(0xffa0_0000)]);
            let mut hardware = vec![f16::ZERO; values.len()];
            // SAFETY: AVX2 and F16C are present (checked above).
            unsafe { f32_to_f16_f16c(&values, &mut hardware) };
            for (v, h) in values.iter().zip(&hardware) {
                assert_eq!(h.to_bits(), f16::from_f32(*v).to_bits(), "{:#010x}", v.to_bits());
            }
        }
    }
}
