//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1 against f32 or [`Q8Pair`] activations.
//!
//! The quants are kept unsigned where the format has an offset (`q - 8`,
//! `q - 16`), which `vpmaddubsw` wants, and the offset is taken out
//! afterwards with the activation sums: `Σ(q - 8)·y = Σq·y - 8·Σy`.

use super::*;

/// The 32 unsigned quants of a Q5 block, in value order.
#[inline(always)]
unsafe fn q5(qh: [u8; 4], qs: &[u8; 16]) -> __m256i {
    _mm256_or_si256(nibbles(qs.as_ptr()), fifth_bits(qh))
}

/// The second lane.
#[inline(always)]
unsafe fn lane1(v: __m128) -> f32 {
    _mm_cvtss_f32(_mm_movehdup_ps(v))
}

/// The 32 quants of a Q4 block as f32 in value order, widened straight
/// from memory: each byte to an i32 lane, whose low and high nibbles are
/// values `j` and `j + 16`.
#[inline(always)]
unsafe fn q4_floats(qs: &[u8; 16]) -> [__m256; 4] {
    let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.as_ptr().cast()));
    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.as_ptr().add(8).cast()));
    let m4 = _mm256_set1_epi32(0x0f);
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(a, m4)),
        _mm256_cvtepi32_ps(_mm256_and_si256(b, m4)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(a)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b)),
    ]
}

/// The 32 signed quants of a Q8 block as f32, widened straight from memory.
#[inline(always)]
unsafe fn q8_floats(qs: &[i8; 32]) -> [__m256; 4] {
    std::array::from_fn(|i| {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
            qs.as_ptr().add(8 * i).cast(),
        )))
    })
}

/// `(d, m)` of a block that starts with them, or `(d, -offset·d)` of one
/// that starts with `d` (`offset` > 0), in the low two lanes.
#[inline(always)]
unsafe fn d_and_m<B: bytemuck::Pod>(block: &B, offset: f32) -> __m128 {
    let v = f16x2(head(block));
    if offset == 0.0 {
        v
    } else {
        _mm_mul_ps(_mm_broadcastss_ps(v), _mm_setr_ps(1.0, -offset, 0.0, 0.0))
    }
}

/// The F32 kernel of a format whose block is `d·q + m`, or `d·(q - offset)`
/// taken as `m = -offset·d` (`mins: true`, with `$dm` giving `(d, m)`), or
/// `d·q` (`mins: false`, the offset folded into the quants): `$weights`
/// gives the block's quants as four vectors of f32.
macro_rules! dot_f32 {
    ($block:ty, mins: $mins:expr, |$b:ident| $weights:expr, $dm:expr) => {
        impl DotF32 for $block {
            const NEEDS_SUMS: bool = $mins;
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
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
                let mut acc = [[_mm256_setzero_ps(); 2]; T];
                let mut mins = [_mm_setzero_ps(); T];
                each_block_2(blocks, |i, $b, k| {
                    let w: [__m256; 4] = $weights;
                    let dm: __m128 = $dm;
                    let d = _mm256_broadcastss_ps(dm);
                    for t in 0..T {
                        let s = dot32(&w, x[t].as_ptr().add(QK_LEGACY * i));
                        acc[t][k] = _mm256_fmadd_ps(d, s, acc[t][k]);
                        if $mins {
                            // lane 1: m·Σx
                            let sum = _mm_set1_ps(*sums[t].get_unchecked(i));
                            mins[t] = _mm_fmadd_ps(dm, sum, mins[t]);
                        }
                    }
                });
                std::array::from_fn(|t| {
                    let dot = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
                    if $mins {
                        dot + lane1(mins[t])
                    } else {
                        dot
                    }
                })
            }
        }
    };
}

dot_f32!(BlockQ4_0, mins: true, |b| q4_floats(&b.qs), d_and_m(b, 8.0));
dot_f32!(BlockQ4_1, mins: true, |b| q4_floats(&b.qs), d_and_m(b, 0.0));
dot_f32!(BlockQ5_0, mins: false,
    |b| bytes_to_f32::<true>(_mm256_sub_epi8(q5(b.qh, &b.qs), _mm256_set1_epi8(16))),
    d_and_m(b, 0.0));
dot_f32!(BlockQ5_1, mins: true, |b| bytes_to_f32::<false>(q5(b.qh, &b.qs)), d_and_m(b, 0.0));
dot_f32!(BlockQ8_0, mins: false, |b| q8_floats(&b.qs), d_and_m(b, 0.0));
dot_f32!(BlockQ8_1, mins: false, |b| q8_floats(&b.qs), d_and_m(b, 0.0));

/// The quants of blocks `a` and `b` in [`Q8Pair`] order: values 0..16 of
/// `a` then of `b`, and values 16..32 of `a` then of `b`.
#[inline(always)]
unsafe fn q4_pair(a: &[u8; 16], b: &[u8; 16]) -> (__m256i, __m256i) {
    split_nibbles(_mm256_loadu2_m128i(b.as_ptr().cast(), a.as_ptr().cast()))
}

/// [`q4_pair`] with the fifth bits.
#[inline(always)]
unsafe fn q5_pair(a_qh: [u8; 4], a: &[u8; 16], b_qh: [u8; 4], b: &[u8; 16]) -> (__m256i, __m256i) {
    let (lo, hi) = q4_pair(a, b);
    // both qh words in every 128-bit lane: bytes 0..4 are a's, 4..8 b's
    let bits = _mm256_set1_epi64x(
        i64::from(u32::from_le_bytes(a_qh)) | (i64::from(u32::from_le_bytes(b_qh)) << 32),
    );
    let byte = |k: i64| k * 0x0101_0101_0101_0101;
    let lo_pick = _mm256_set_epi64x(byte(5), byte(4), byte(1), byte(0));
    let hi_pick = _mm256_set_epi64x(byte(7), byte(6), byte(3), byte(2));
    (
        _mm256_or_si256(lo, spread_bits(bits, lo_pick)),
        _mm256_or_si256(hi, spread_bits(bits, hi_pick)),
    )
}

/// The f16 pairs at the heads of blocks `a` and `b` as `(a0, a1, b0, b1)`.
#[inline(always)]
unsafe fn f16x4(a: [u8; 4], b: [u8; 4]) -> __m128 {
    _mm_cvtph_ps(_mm_set_epi32(
        0,
        0,
        i32::from_le_bytes(b),
        i32::from_le_bytes(a),
    ))
}

/// `(d, m)` of two blocks that start with them, or `(d, -offset·d)` of
/// two that start with `d` (`offset` > 0): `(d_a, m_a, d_b, m_b)`.
#[inline(always)]
unsafe fn d_and_m_pair<B: bytemuck::Pod>(a: &B, b: &B, offset: f32) -> __m128 {
    let v = f16x4(head(a), head(b));
    if offset == 0.0 {
        v
    } else {
        _mm_mul_ps(_mm_moveldup_ps(v), _mm_setr_ps(1.0, -offset, 1.0, -offset))
    }
}

/// Lanes 0 and 2 of `v`, each spread over one 128-bit half: the scales of
/// the two blocks whose i32 sums sit in the low and high half.
#[inline(always)]
unsafe fn pair_scales(v: __m128) -> __m256 {
    _mm256_permutevar8x32_ps(
        _mm256_castps128_ps256(v),
        _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
    )
}

/// Lane 1 plus lane 3.
#[inline(always)]
unsafe fn lanes13(v: __m128) -> f32 {
    lane1(_mm_add_ps(v, _mm_movehl_ps(v, v)))
}

/// Calls `step(p, a, b, k)` for the blocks in pairs (`p` the pair, `b` a
/// zero block after an odd last one), `k` alternating between two
/// accumulator chains as in [`each_block_2`].
#[inline(always)]
fn each_pair<B: bytemuck::Pod>(blocks: &[B], mut step: impl FnMut(usize, &B, &B, usize)) {
    // two pairs per iteration, so that `k` is a constant in each call
    let mut quads = blocks.chunks_exact(4);
    for (q, quad) in quads.by_ref().enumerate() {
        step(2 * q, &quad[0], &quad[1], 0);
        step(2 * q + 1, &quad[2], &quad[3], 1);
    }
    let rest = quads.remainder();
    let p = blocks.len() / 4 * 2;
    let zero = B::zeroed();
    match rest {
        [] => {}
        [a] => step(p, a, &zero, 0),
        [a, b] => step(p, a, b, 0),
        [a, b, c] => {
            step(p, a, b, 0);
            step(p + 1, c, &zero, 1);
        }
        _ => unreachable!("chunks of 4 leave at most 3"),
    }
}

/// The Q8 kernel of a format with unsigned quants `q`: the block is
/// `d·q + m` (offset 0) or `d·(q - offset)`, so with `(d, m)` or
/// `(d, -offset·d)` from [`d_and_m_pair`], `Σ w·y = d·dy·Σq·y + m·sy`
/// either way. Two blocks at a time, their i32 sums in one register.
macro_rules! dot_q8_unsigned {
    ($block:ty, offset: $offset:expr, |$a:ident, $b:ident| $quants:expr) => {
        impl DotQ8 for $block {
            type Act = Q8Pair;
            const NEEDS: Needs = Needs::Q8;
            #[inline(always)]
            fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8Pair] {
                input.q8(t)
            }
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8Pair]; T]) -> [f32; T] {
                dot_q8_unsigned!(@body false, row, y, T, $block, $offset, |$a, $b| $quants)
            }
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            unsafe fn dot_vnni<const T: usize>(row: &[u8], y: &[&[Q8Pair]; T]) -> [f32; T] {
                dot_q8_unsigned!(@body true, row, y, T, $block, $offset, |$a, $b| $quants)
            }
        }
    };
    // Written out in each function, so that the closure takes on its target features.
    (@body $vnni:expr, $row:ident, $y:ident, $T:ident, $block:ty, $offset:expr, |$a:ident, $b:ident| $quants:expr) => {{
        let blocks: &[$block] = bytemuck::cast_slice($row);
        for y in $y {
            assert_eq!(y.len(), blocks.len().div_ceil(2), "activations do not match the row");
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; $T];
        let mut mins = [_mm_setzero_ps(); $T];
        each_pair(blocks, |p, $a, $b, k| {
            let (lo, hi) = $quants;
            let dm = d_and_m_pair($a, $b, $offset);
            for t in 0..$T {
                let y = $y[t].get_unchecked(p);
                let q8 = y.qs.as_ptr();
                let (y_lo, y_hi) = (
                    _mm256_loadu_si256(q8.cast()),
                    _mm256_loadu_si256(q8.add(32).cast()),
                );
                let sums = if $vnni {
                    dot_u8_i8_add::<true>(dot_u8_i8_add::<true>(_mm256_setzero_si256(), lo, y_lo), hi, y_hi)
                } else {
                    // pair sums of both blocks stay within i16 (at most 2·2·31·127)
                    let p16 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, y_lo),
                        _mm256_maddubs_epi16(hi, y_hi),
                    );
                    _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
                };
                // (d_a·dy_a, m_a·sy_a, d_b·dy_b, m_b·sy_b)
                let scales = _mm_mul_ps(dm, _mm_loadu_ps(y.ds.as_ptr()));
                acc[t][k] = _mm256_fmadd_ps(pair_scales(scales), _mm256_cvtepi32_ps(sums), acc[t][k]);
                mins[t] = _mm_add_ps(mins[t], scales);
            }
        });
        std::array::from_fn(|t| hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + lanes13(mins[t]))
    }};
}

dot_q8_unsigned!(BlockQ4_0, offset: 8.0, |a, b| q4_pair(&a.qs, &b.qs));
dot_q8_unsigned!(BlockQ4_1, offset: 0.0, |a, b| q4_pair(&a.qs, &b.qs));
dot_q8_unsigned!(BlockQ5_0, offset: 16.0, |a, b| q5_pair(a.qh, &a.qs, b.qh, &b.qs));
dot_q8_unsigned!(BlockQ5_1, offset: 0.0, |a, b| q5_pair(a.qh, &a.qs, b.qh, &b.qs));

/// The Q8 kernel of Q8_0 and Q8_1 weights: signed quants, `d·dy·Σq·y`.
macro_rules! dot_q8_signed {
    ($block:ty) => {
        impl DotQ8 for $block {
            type Act = Q8Pair;
            const NEEDS: Needs = Needs::Q8;
            #[inline(always)]
            fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8Pair] {
                input.q8(t)
            }
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8Pair]; T]) -> [f32; T] {
                dot_q8_signed!(@body false, row, y, T, $block)
            }
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            unsafe fn dot_vnni<const T: usize>(row: &[u8], y: &[&[Q8Pair]; T]) -> [f32; T] {
                dot_q8_signed!(@body true, row, y, T, $block)
            }
        }
    };
    (@body $vnni:expr, $row:ident, $y:ident, $T:ident, $block:ty) => {{
        let blocks: &[$block] = bytemuck::cast_slice($row);
        for y in $y {
            assert_eq!(y.len(), blocks.len().div_ceil(2), "activations do not match the row");
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; $T];
        each_pair(blocks, |p, a, b, k| {
            let lo = _mm256_loadu2_m128i(b.qs.as_ptr().cast(), a.qs.as_ptr().cast());
            let hi = _mm256_loadu2_m128i(b.qs.as_ptr().add(16).cast(), a.qs.as_ptr().add(16).cast());
            // |q| for the unsigned side; the signs go onto the activations
            let (lo_abs, hi_abs) = (_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(hi, hi));
            // (d_a, d_a, d_b, d_b)
            let d = _mm_moveldup_ps(f16x4(head(a), head(b)));
            for t in 0..$T {
                let y = $y[t].get_unchecked(p);
                let q8 = y.qs.as_ptr();
                let y_lo = _mm256_sign_epi8(_mm256_loadu_si256(q8.cast()), lo);
                let y_hi = _mm256_sign_epi8(_mm256_loadu_si256(q8.add(32).cast()), hi);
                // pair sums can reach 2·128·127: no adding in i16 here
                let sums = if $vnni {
                    dot_u8_i8_add::<true>(dot_u8_i8_add::<true>(_mm256_setzero_si256(), lo_abs, y_lo), hi_abs, y_hi)
                } else {
                    _mm256_add_epi32(dot_u8_i8(lo_abs, y_lo), dot_u8_i8(hi_abs, y_hi))
                };
                let scales = _mm_mul_ps(d, _mm_loadu_ps(y.ds.as_ptr()));
                acc[t][k] = _mm256_fmadd_ps(pair_scales(scales), _mm256_cvtepi32_ps(sums), acc[t][k]);
            }
        });
        std::array::from_fn(|t| hsum(_mm256_add_ps(acc[t][0], acc[t][1])))
    }};
}

dot_q8_signed!(BlockQ8_0);
dot_q8_signed!(BlockQ8_1);
