//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1 against f32 or [`Q8Block`] activations.
//!
//! The quants are kept unsigned where the format has an offset (`q - 8`,
//! `q - 16`), which `vpmaddubsw` wants, and the offset is taken out
//! afterwards with the activation sums: `Σ(q - 8)·y = Σq·y - 8·Σy`.

use super::*;

/// The 32 unsigned quants of a Q4 block, in value order.
#[inline(always)]
unsafe fn q4(qs: &[u8; 16]) -> __m256i {
    nibbles(qs.as_ptr())
}

/// The 32 unsigned quants of a Q5 block, in value order.
#[inline(always)]
unsafe fn q5(qh: [u8; 4], qs: &[u8; 16]) -> __m256i {
    _mm256_or_si256(nibbles(qs.as_ptr()), fifth_bits(qh))
}

/// `d` and `s` of an activation block as the low two lanes.
#[inline(always)]
unsafe fn d_and_s(a: &Q8Block) -> __m128 {
    // `d` and `s` are adjacent f32 fields
    _mm_castsi128_ps(_mm_loadl_epi64((&a.d as *const f32).cast()))
}

/// The second lane.
#[inline(always)]
unsafe fn lane1(v: __m128) -> f32 {
    _mm_cvtss_f32(_mm_movehdup_ps(v))
}

/// The F32 kernel of a format whose block is `d·(q - offset)` (or `d·q + m`
/// with `$min`): `$quants` gives the block's quants as 32 bytes.
macro_rules! dot_f32 {
    ($block:ty, signed: $signed:expr, mins: $mins:expr, |$b:ident| $quants:expr, $scale:expr, $min:expr) => {
        impl DotF32 for $block {
            const NEEDS_SUMS: bool = $mins;
            #[inline(always)]
            unsafe fn dot<const T: usize>(
                row: &[u8],
                x: &[&[f32]; T],
                sums: &[&[f32]; T],
            ) -> [f32; T] {
                let blocks: &[$block] = blocks_for(row, QK_LEGACY, x);
                if $mins {
                    for s in sums {
                        assert_eq!(s.len(), blocks.len());
                    }
                }
                let mut acc = [_mm256_setzero_ps(); T];
                let mut mins = [0f32; T];
                for (i, $b) in blocks.iter().enumerate() {
                    let w = bytes_to_f32::<$signed>($quants);
                    let d = _mm256_set1_ps($scale);
                    for t in 0..T {
                        let s = dot32(&w, x[t].as_ptr().add(QK_LEGACY * i));
                        acc[t] = _mm256_fmadd_ps(d, s, acc[t]);
                        if $mins {
                            mins[t] += $min * *sums[t].get_unchecked(i);
                        }
                    }
                }
                std::array::from_fn(|t| hsum(acc[t]) + mins[t])
            }
        }
    };
}

dot_f32!(BlockQ4_0, signed: true, mins: false,
    |b| _mm256_sub_epi8(q4(&b.qs), _mm256_set1_epi8(8)), f16(b.d), 0.0);
dot_f32!(BlockQ4_1, signed: false, mins: true, |b| q4(&b.qs), f16(b.d), f16(b.m));
dot_f32!(BlockQ5_0, signed: true, mins: false,
    |b| _mm256_sub_epi8(q5(b.qh, &b.qs), _mm256_set1_epi8(16)), f16(b.d), 0.0);
dot_f32!(BlockQ5_1, signed: false, mins: true, |b| q5(b.qh, &b.qs), f16(b.d), f16(b.m));
dot_f32!(BlockQ8_0, signed: true, mins: false,
    |b| _mm256_loadu_si256(b.qs.as_ptr().cast()), f16(b.d), 0.0);
dot_f32!(BlockQ8_1, signed: true, mins: false,
    |b| _mm256_loadu_si256(b.qs.as_ptr().cast()), f16(b.d), 0.0);

/// The Q8 kernel of a format with unsigned quants `q`: the block is
/// `d·q + m` (`$dm` gives `(d, m)` as two lanes) or `d·(q - offset)`
/// (`$dm` gives `(d, -offset·d)`), so `Σ w·y = d·dy·Σq·y + m·sy` either way.
macro_rules! dot_q8_unsigned {
    ($block:ty, |$b:ident| $quants:expr, $dm:expr) => {
        impl DotQ8 for $block {
            type Act = Q8Block;
            const NEEDS: Needs = Needs::Q8;
            #[inline(always)]
            fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8Block] {
                input.q8(t)
            }
            #[inline(always)]
            unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8Block]; T]) -> [f32; T] {
                let blocks: &[$block] = blocks_for(row, 1, y);
                let mut acc = [_mm256_setzero_ps(); T];
                let mut mins = [_mm_setzero_ps(); T];
                for (i, $b) in blocks.iter().enumerate() {
                    let q = $quants;
                    let dm = $dm;
                    for t in 0..T {
                        let a = y[t].get_unchecked(i);
                        let p = dot_u8_i8(q, _mm256_loadu_si256(a.qs.as_ptr().cast()));
                        // (d·dy, m·sy)
                        let scales = _mm_mul_ps(dm, d_and_s(a));
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_broadcastss_ps(scales),
                            _mm256_cvtepi32_ps(p),
                            acc[t],
                        );
                        mins[t] = _mm_add_ps(mins[t], scales);
                    }
                }
                std::array::from_fn(|t| hsum(acc[t]) + lane1(mins[t]))
            }
        }
    };
}

/// `(d, -offset·d)` from an f16 scale.
#[inline(always)]
unsafe fn d_and_offset(d: [u8; 2], offset: f32) -> __m128 {
    let d = f16(d);
    _mm_setr_ps(d, -offset * d, 0.0, 0.0)
}

/// `(d, m)` from adjacent f16 fields.
#[inline(always)]
unsafe fn d_and_m(d: [u8; 2], m: [u8; 2]) -> __m128 {
    f16_pair([d[0], d[1], m[0], m[1]])
}

dot_q8_unsigned!(BlockQ4_0, |b| q4(&b.qs), d_and_offset(b.d, 8.0));
dot_q8_unsigned!(BlockQ4_1, |b| q4(&b.qs), d_and_m(b.d, b.m));
dot_q8_unsigned!(BlockQ5_0, |b| q5(b.qh, &b.qs), d_and_offset(b.d, 16.0));
dot_q8_unsigned!(BlockQ5_1, |b| q5(b.qh, &b.qs), d_and_m(b.d, b.m));

/// The Q8 kernel of Q8_0 and Q8_1 weights: signed quants, `d·dy·Σq·y`.
macro_rules! dot_q8_signed {
    ($block:ty) => {
        impl DotQ8 for $block {
            type Act = Q8Block;
            const NEEDS: Needs = Needs::Q8;
            #[inline(always)]
            fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8Block] {
                input.q8(t)
            }
            #[inline(always)]
            unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8Block]; T]) -> [f32; T] {
                let blocks: &[$block] = blocks_for(row, 1, y);
                let mut acc = [_mm256_setzero_ps(); T];
                for (i, b) in blocks.iter().enumerate() {
                    let q = _mm256_loadu_si256(b.qs.as_ptr().cast());
                    let d = f16(b.d);
                    for t in 0..T {
                        let a = y[t].get_unchecked(i);
                        let p = dot_i8_i8(q, _mm256_loadu_si256(a.qs.as_ptr().cast()));
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p), acc[t]);
                    }
                }
                std::array::from_fn(|t| hsum(acc[t]))
            }
        }
    };
}

dot_q8_signed!(BlockQ8_0);
dot_q8_signed!(BlockQ8_1);
