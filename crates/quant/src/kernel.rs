//! The per-type kernel traits and the serial drivers that run them.
//!
//! Every format's dequantizer is written once, as scalar Rust that computes
//! 8 neighbouring values at a time (see [`lanes`]) so the compiler turns each
//! group into vector instructions. The drivers compile it twice: for the
//! baseline target and, on x86-64, inside a function with AVX2 and F16C
//! enabled, picked at run time. Neither build may change a result: Rust
//! never contracts `a * b + c` into a fused multiply-add, so the vector code
//! does the same IEEE operations in the same order as the scalar code (and
//! as gguf-py's numpy code, which is what the results are tested against).

use bytemuck::Pod;
use half::f16;

/// Dequantizing one block of `N` values, 8 at a time into a [`Store`].
pub(crate) trait DequantizeBlock<const N: usize>: Pod {
    fn dequantize<S: Store>(&self, out: &mut [S::Elem; N]);
}

/// How dequantized values are written: as f32, or converted to f16.
///
/// Kernels hand over 8 values at a time as an array; once inlined the array
/// lives in one vector register, so the f16 conversion happens in registers
/// instead of in a second pass over memory.
pub(crate) trait Store {
    type Elem: Copy;
    /// Writes `values` to `dst[..8]`.
    fn put8(dst: &mut [Self::Elem], values: [f32; 8]);
    fn put1(value: f32) -> Self::Elem;
}

/// f32 output.
pub(crate) struct StoreF32;

impl Store for StoreF32 {
    type Elem = f32;
    #[inline(always)]
    fn put8(dst: &mut [f32], values: [f32; 8]) {
        dst[..8].copy_from_slice(&values);
    }
    #[inline(always)]
    fn put1(value: f32) -> f32 {
        value
    }
}

/// f16 output through `half` (no F16C).
pub(crate) struct StoreF16;

impl Store for StoreF16 {
    type Elem = f16;
    #[inline(always)]
    fn put8(dst: &mut [f16], values: [f32; 8]) {
        for (d, v) in dst[..8].iter_mut().zip(values) {
            *d = f16::from_f32(v);
        }
    }
    #[inline(always)]
    fn put1(value: f32) -> f16 {
        f16::from_f32(value)
    }
}

/// Eight values computed lane by lane; written so the compiler turns the
/// lanes into one vector operation.
#[inline(always)]
pub(crate) fn lanes(f: impl Fn(usize) -> f32) -> [f32; 8] {
    std::array::from_fn(f)
}

/// Quantizing `N` values into one block.
pub(crate) trait QuantizeBlock<const N: usize>: Pod {
    fn quantize(values: &[f32; N]) -> Self;
}

/// One ggml type's dequantization of a run of whole blocks
/// (`src.len()` a multiple of the type size, `dst.len()` the matching number of values).
pub(crate) trait Dequantize {
    fn dequantize<S: Store>(src: &[u8], dst: &mut [S::Elem]);
}

/// One ggml type's quantization of a run of whole blocks.
pub(crate) trait Quantize {
    fn quantize(src: &[f32], dst: &mut [u8]);
}

/// The loop every block format shares. `inline(always)` so that it, and the
/// block code it calls, is compiled again inside each target-feature driver.
#[inline(always)]
pub(crate) fn dequantize_blocks<const N: usize, B: DequantizeBlock<N>, S: Store>(
    src: &[u8],
    dst: &mut [S::Elem],
) {
    let blocks: &[B] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(N)) {
        let out: &mut [S::Elem; N] = out.try_into().expect("chunks_exact_mut yields N values");
        block.dequantize::<S>(out);
    }
}

pub(crate) fn quantize_blocks<const N: usize, B: QuantizeBlock<N>>(src: &[f32], dst: &mut [u8]) {
    let blocks: &mut [B] = bytemuck::cast_slice_mut(dst);
    for (block, values) in blocks.iter_mut().zip(src.chunks_exact(N)) {
        let values: &[f32; N] = values.try_into().expect("chunks_exact yields N values");
        *block = B::quantize(values);
    }
}

/// Implements [`Dequantize`] and [`Quantize`] for a block struct of `$n` values.
macro_rules! block_kernels {
    ($block:ty, $n:expr) => {
        impl $crate::kernel::Dequantize for $block {
            #[inline(always)]
            fn dequantize<S: $crate::kernel::Store>(src: &[u8], dst: &mut [S::Elem]) {
                $crate::kernel::dequantize_blocks::<{ $n }, $block, S>(src, dst)
            }
        }
        impl $crate::kernel::Quantize for $block {
            fn quantize(src: &[f32], dst: &mut [u8]) {
                $crate::kernel::quantize_blocks::<{ $n }, $block>(src, dst)
            }
        }
    };
}
pub(crate) use block_kernels;

/// Dequantizes whole blocks of `K` into f32, on the best instruction set this CPU has.
pub(crate) fn dequantize_serial<K: Dequantize>(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_f16c() {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        unsafe { x86::dequantize_avx2::<K, x86::StoreF32Avx>(src, dst) };
        return;
    }
    K::dequantize::<StoreF32>(src, dst);
}

/// Dequantizes whole blocks of `K` into f16 (the f32 result rounded to nearest even).
pub(crate) fn dequantize_f16_serial<K: Dequantize>(src: &[u8], dst: &mut [f16]) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_f16c() {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        unsafe { x86::dequantize_avx2::<K, x86::StoreF16C>(src, dst) };
        return;
    }
    K::dequantize::<StoreF16>(src, dst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Dequantize, Store};
    use half::f16;
    use std::arch::x86_64::{
        __m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_storeu_si128,
    };

    #[inline]
    pub(super) fn has_avx2_f16c() -> bool {
        // std caches the CPUID result; this is two loads and a branch.
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }

    /// The kernels compiled again with AVX2 and F16C: everything below is
    /// `inline(always)`, so it takes on these target features.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dequantize_avx2<K: Dequantize, S: Store>(src: &[u8], dst: &mut [S::Elem]) {
        K::dequantize::<S>(src, dst);
    }

    /// f32 output as one 8-lane store. Storing a vector (rather than 8
    /// floats) keeps LLVM's loop vectorizer off the kernels' loops, which it
    /// would otherwise vectorize across blocks or sub-blocks with gathers,
    /// and leaves each 8-value group to the straight-line (SLP) vectorizer.
    /// Only used inside [`dequantize_avx2`].
    pub(super) struct StoreF32Avx;

    impl Store for StoreF32Avx {
        type Elem = f32;
        #[inline(always)]
        fn put8(dst: &mut [f32], values: [f32; 8]) {
            let dst = &mut dst[..8];
            // SAFETY: only reached from `dequantize_avx2`, so AVX is present;
            // `values` and `dst` are 8 f32 each, accessed unaligned.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_loadu_ps(values.as_ptr())) };
        }
        #[inline(always)]
        fn put1(value: f32) -> f32 {
            value
        }
    }

    /// f16 output through F16C, round to nearest even: the same results as
    /// `half::f16::from_f32` (both quiet a NaN and keep its payload's top bits).
    /// Only used inside [`dequantize_avx2`].
    pub(super) struct StoreF16C;

    impl Store for StoreF16C {
        type Elem = f16;
        #[inline(always)]
        fn put8(dst: &mut [f16], values: [f32; 8]) {
            let dst = &mut dst[..8];
            // SAFETY: only reached from `dequantize_avx2`, so F16C is present;
            // `values` is 8 f32 and `dst` 8 f16 (16 bytes), accessed unaligned.
            unsafe {
                let packed = _mm256_cvtps_ph::<0>(_mm256_loadu_ps(values.as_ptr()));
                _mm_storeu_si128(dst.as_mut_ptr().cast::<__m128i>(), packed);
            }
        }
        #[inline(always)]
        fn put1(value: f32) -> f16 {
            f16::from_f32(value)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// `put8` checked against `half` in an F16C context.
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn convert(values: &[f32], out: &mut [f16]) {
            for (v, o) in values.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                StoreF16C::put8(o, v.try_into().unwrap());
            }
        }

        #[test]
        fn f16c_conversion_matches_half() {
            if !has_avx2_f16c() {
                return; // nothing to compare on this CPU
            }
            // every 65,537th f32 bit pattern plus the neighbourhood of every
            // f16 value (rounding boundaries), NaNs and infinities included
            let mut values: Vec<f32> = (0..=u32::MAX).step_by(65_537).map(f32::from_bits).collect();
            for h in 0..=u16::MAX {
                let exact = f16::from_bits(h).to_f32().to_bits();
                for delta in [0u32, 1, 0x0fff, 0x1000, 0x1001] {
                    values.push(f32::from_bits(exact.wrapping_add(delta)));
                    values.push(f32::from_bits(exact.wrapping_sub(delta)));
                }
            }
            values.truncate(values.len() / 8 * 8);
            let mut hardware = vec![f16::ZERO; values.len()];
            // SAFETY: AVX2 and F16C are present (checked above).
            unsafe { convert(&values, &mut hardware) };
            for (v, h) in values.iter().zip(&hardware) {
                assert_eq!(
                    h.to_bits(),
                    f16::from_f32(*v).to_bits(),
                    "{:#010x}",
                    v.to_bits()
                );
            }
        }
    }
}
