//! Q4_K, Q5_K and Q6_K against f32 or [`Q8KBlock`] activations, and Q8_K
//! against [`Q8KBlock`].
//!
//! In Q8 mode the sub-block scales are applied in the integer domain
//! (`vpmaddwd` of the i16 pair sums with the scales), so a super-block
//! costs one conversion to float; the mins (Q4_K, Q5_K) and the `-32`
//! offset (Q6_K) come from the activations' 16-value sums.

use super::*;

/// The 6-bit scales and mins of the 8 sub-blocks of a Q4_K/Q5_K block, as
/// [`crate::kquants::scale_min_k4`] reads them, unpacked a word at a time
/// (llama.cpp's `utmp` trick): the low 6 bits of bytes 0..4 are scales
/// 0..4 and of bytes 4..8 mins 0..4; byte `8 + i` holds the low nibbles of
/// scale and min `4 + i`, whose top two bits are those of bytes `i` and `4 + i`.
#[inline(always)]
fn scales_and_mins(scales: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes(scales[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let (w0, w1, w2) = (word(0), word(1), word(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const NIBBLE: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let sc_low = w0 & LOW6;
    let sc_high = (w2 & NIBBLE) | (((w0 >> 6) & TOP2) << 4);
    let min_low = w1 & LOW6;
    let min_high = ((w2 >> 4) & NIBBLE) | (((w1 >> 6) & TOP2) << 4);
    let join = |low: u32, high: u32| (u64::from(low) | (u64::from(high) << 32)).to_le_bytes();
    (join(sc_low, sc_high), join(min_low, min_high))
}

/// The 8 scales of [`scales_and_mins`] as i16 in both 128-bit halves, and
/// the two of chunk `c` (sub-blocks `2c` and `2c + 1`) picked out of them,
/// each over all 16 lanes.
#[inline(always)]
unsafe fn chunk_scales(scales16: __m256i, c: usize) -> (__m256i, __m256i) {
    let pick = |j: usize| {
        let pair = (2 * j as i64) | ((2 * j as i64 + 1) << 8);
        _mm256_set1_epi16(pair as i16)
    };
    (
        _mm256_shuffle_epi8(scales16, pick(2 * c)),
        _mm256_shuffle_epi8(scales16, pick(2 * c + 1)),
    )
}

/// 8 unsigned bytes as f32.
#[inline(always)]
unsafe fn bytes8_to_f32(bytes: [u8; 8]) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(
        bytes,
    ))))
}

/// Bit `bit` of every byte of `bits`, as 0x10 where set.
#[inline(always)]
unsafe fn bit_as_16(bits: __m256i, bit: u32) -> __m256i {
    let mask = _mm256_set1_epi8((1u8 << bit) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bits, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The quants of chunk `c` (values `64c..64c+32` and `64c+32..64c+64`) of a
/// Q4_K block, or of a Q5_K block when `qh` is given.
#[inline(always)]
unsafe fn q45_chunk(qs: &[u8; 128], qh: Option<__m256i>, c: usize) -> (__m256i, __m256i) {
    let (lo, hi) = split_nibbles(_mm256_loadu_si256(qs.as_ptr().add(32 * c).cast()));
    match qh {
        None => (lo, hi),
        Some(qh) => (
            _mm256_or_si256(lo, bit_as_16(qh, 2 * c as u32)),
            _mm256_or_si256(hi, bit_as_16(qh, 2 * c as u32 + 1)),
        ),
    }
}

/// [`q45_chunk`] as f32: for Q4_K widened straight from memory (each byte
/// to an i32 lane, whose low and high nibbles belong to the two halves).
#[inline(always)]
unsafe fn q45_chunk_floats(
    qs: &[u8; 128],
    qh: Option<__m256i>,
    c: usize,
) -> ([__m256; 4], [__m256; 4]) {
    match qh {
        None => {
            let m4 = _mm256_set1_epi32(0x0f);
            let bytes: [__m256i; 4] = std::array::from_fn(|k| {
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.as_ptr().add(32 * c + 8 * k).cast()))
            });
            (
                bytes.map(|v| _mm256_cvtepi32_ps(_mm256_and_si256(v, m4))),
                bytes.map(|v| _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v))),
            )
        }
        Some(_) => {
            let (lo, hi) = q45_chunk(qs, qh, c);
            (bytes_to_f32::<false>(lo), bytes_to_f32::<false>(hi))
        }
    }
}

/// The F32 kernel of Q4_K and Q5_K: `Σ_j d·sc_j·Σq·x - dmin·m_j·Σx_j`.
macro_rules! dot_f32_q45k {
    ($block:ty, |$b:ident| $qh:expr) => {
        impl DotF32 for $block {
            const NEEDS_SUMS: bool = true;
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot<const T: usize>(
                row: &[u8],
                x: &[&[f32]; T],
                sums: &[&[f32]; T],
            ) -> [f32; T] {
                let blocks: &[$block] = blocks_for(row, QK_K, x);
                for s in sums {
                    assert_eq!(s.len(), blocks.len() * 8);
                }
                // two chains: the low and the high half of each chunk
                let mut acc = [[_mm256_setzero_ps(); 2]; T];
                let mut mins = [_mm256_setzero_ps(); T];
                for (i, $b) in blocks.iter().enumerate() {
                    let d_dmin = f16x2(head($b));
                    let (sc, mn) = scales_and_mins(&$b.scales);
                    // d·sc_j for the 8 sub-blocks, converted together
                    let mut dl = [0f32; 8];
                    _mm256_storeu_ps(
                        dl.as_mut_ptr(),
                        _mm256_mul_ps(_mm256_broadcastss_ps(d_dmin), bytes8_to_f32(sc)),
                    );
                    let qh: Option<__m256i> = $qh;
                    for c in 0..4 {
                        let (wl, wh) = q45_chunk_floats(&$b.qs, qh, c);
                        let dl_c = _mm256_set1_ps(dl[2 * c]);
                        let dh = _mm256_set1_ps(dl[2 * c + 1]);
                        for t in 0..T {
                            let x = x[t].as_ptr().add(QK_K * i + 64 * c);
                            acc[t][0] = _mm256_fmadd_ps(dl_c, dot32(&wl, x), acc[t][0]);
                            acc[t][1] = _mm256_fmadd_ps(dh, dot32(&wh, x.add(32)), acc[t][1]);
                        }
                    }
                    // dmin·m_j for the 8 sub-blocks, against their Σx
                    let m = _mm256_mul_ps(
                        _mm256_broadcastss_ps(_mm_movehdup_ps(d_dmin)),
                        bytes8_to_f32(mn),
                    );
                    for t in 0..T {
                        let s = _mm256_loadu_ps(sums[t].as_ptr().add(8 * i));
                        mins[t] = _mm256_fmadd_ps(m, s, mins[t]);
                    }
                }
                std::array::from_fn(|t| {
                    hsum(_mm256_sub_ps(_mm256_add_ps(acc[t][0], acc[t][1]), mins[t]))
                })
            }
        }
    };
}

dot_f32_q45k!(BlockQ4K, |b| None);
dot_f32_q45k!(BlockQ5K, |b| Some(_mm256_loadu_si256(b.qh.as_ptr().cast())));

/// The Q8 kernel of Q4_K and Q5_K.
macro_rules! dot_q8_q45k {
    ($block:ty, |$b:ident| $qh:expr) => {
        impl DotQ8 for $block {
            type Act = Q8KBlock;
            const NEEDS: Needs = Needs::Q8K;
            #[inline(always)]
            fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8KBlock] {
                input.q8k(t)
            }
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8KBlock]; T]) -> [f32; T] {
                let blocks: &[$block] = blocks_for(row, 1, y);
                let mut acc = [_mm256_setzero_ps(); T];
                let mut mins = [_mm_setzero_ps(); T];
                for (i, $b) in blocks.iter().enumerate() {
                    let (sc, mn) = scales_and_mins(&$b.scales);
                    let scales16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(
                        _mm_cvtsi64_si128(i64::from_le_bytes(sc)),
                    ));
                    let qh: Option<__m256i> = $qh;
                    let mut sumi = [_mm256_setzero_si256(); T];
                    for c in 0..4 {
                        let (lo, hi) = q45_chunk(&$b.qs, qh, c);
                        let (sl, sh) = chunk_scales(scales16, c);
                        for t in 0..T {
                            let q8 = y[t].get_unchecked(i).qs.as_ptr().add(64 * c);
                            let pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(q8.cast()));
                            let ph =
                                _mm256_maddubs_epi16(hi, _mm256_loadu_si256(q8.add(32).cast()));
                            let p = _mm256_add_epi32(
                                _mm256_madd_epi16(sl, pl),
                                _mm256_madd_epi16(sh, ph),
                            );
                            sumi[t] = _mm256_add_epi32(sumi[t], p);
                        }
                    }
                    let d_dmin = f16x2(head($b));
                    let (d, dmin) = (
                        _mm_cvtss_f32(d_dmin),
                        _mm_cvtss_f32(_mm_movehdup_ps(d_dmin)),
                    );
                    let mins16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(mn)));
                    for t in 0..T {
                        let a = y[t].get_unchecked(i);
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * a.d),
                            _mm256_cvtepi32_ps(sumi[t]),
                            acc[t],
                        );
                        // Σ_j m_j · (Σy over sub-block j): the 16-value sums added in pairs
                        let bsums = _mm256_loadu_si256(a.bsums.as_ptr().cast());
                        let sums32 = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bsums),
                            _mm256_extracti128_si256::<1>(bsums),
                        );
                        let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins16, sums32));
                        mins[t] = _mm_fmadd_ps(_mm_set1_ps(dmin * a.d), m, mins[t]);
                    }
                }
                std::array::from_fn(|t| hsum(acc[t]) - hsum128(mins[t]))
            }
        }
    };
}

dot_q8_q45k!(BlockQ4K, |b| None);
dot_q8_q45k!(BlockQ5K, |b| Some(_mm256_loadu_si256(b.qh.as_ptr().cast())));

/// The unsigned 6-bit quants (`q + 32`) of half `h` of a Q6_K block, in
/// four runs of 32 values: `128h + 32k ..`.
#[inline(always)]
unsafe fn q6_half(b: &BlockQ6K, h: usize) -> [__m256i; 4] {
    let (lo1, hi1) = split_nibbles(_mm256_loadu_si256(b.ql.as_ptr().add(64 * h).cast()));
    let (lo2, hi2) = split_nibbles(_mm256_loadu_si256(b.ql.as_ptr().add(64 * h + 32).cast()));
    let qh = _mm256_loadu_si256(b.qh.as_ptr().add(32 * h).cast());
    let m2 = _mm256_set1_epi8(3);
    // bits 2k..2k+2 of each qh byte, moved to bits 4..6 (the shifts stay within bytes after the mask)
    let high = |k: i32| -> __m256i {
        let bits = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), m2);
        _mm256_slli_epi16::<4>(bits)
    };
    [
        _mm256_or_si256(lo1, high(0)),
        _mm256_or_si256(lo2, high(1)),
        _mm256_or_si256(hi1, high(2)),
        _mm256_or_si256(hi2, high(3)),
    ]
}

impl DotF32 for BlockQ6K {
    const NEEDS_SUMS: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<const T: usize>(row: &[u8], x: &[&[f32]; T], _sums: &[&[f32]; T]) -> [f32; T] {
        let blocks: &[BlockQ6K] = blocks_for(row, QK_K, x);
        let mut acc = [_mm256_setzero_ps(); T];
        for (i, b) in blocks.iter().enumerate() {
            // `d` is the block's last field
            let d = _mm256_broadcastss_ps(_mm_movehdup_ps(f16x2(tail(b))));
            // d·sc_g for the 16 groups, converted together
            let scales = _mm_loadu_si128(b.scales.as_ptr().cast());
            let mut dl = [0f32; 16];
            for half in 0..2 {
                let sc = if half == 0 {
                    scales
                } else {
                    _mm_unpackhi_epi64(scales, scales)
                };
                let sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc));
                _mm256_storeu_ps(dl.as_mut_ptr().add(8 * half), _mm256_mul_ps(d, sc));
            }
            for h in 0..2 {
                let q = q6_half(b, h);
                for (k, q) in q.into_iter().enumerate() {
                    let w = bytes_to_f32::<true>(_mm256_sub_epi8(q, _mm256_set1_epi8(32)));
                    let g = 8 * h + 2 * k;
                    let d0 = _mm256_set1_ps(dl[g]);
                    let d1 = _mm256_set1_ps(dl[g + 1]);
                    for t in 0..T {
                        let x = x[t].as_ptr().add(QK_K * i + 128 * h + 32 * k);
                        acc[t] = _mm256_fmadd_ps(d0, dot16(&[w[0], w[1]], x), acc[t]);
                        acc[t] = _mm256_fmadd_ps(d1, dot16(&[w[2], w[3]], x.add(16)), acc[t]);
                    }
                }
            }
        }
        std::array::from_fn(|t| hsum(acc[t]))
    }
}

impl DotQ8 for BlockQ6K {
    type Act = Q8KBlock;
    const NEEDS: Needs = Needs::Q8K;
    #[inline(always)]
    fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8KBlock] {
        input.q8k(t)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8KBlock]; T]) -> [f32; T] {
        let blocks: &[BlockQ6K] = blocks_for(row, 1, y);
        let mut acc = [_mm256_setzero_ps(); T];
        for (i, b) in blocks.iter().enumerate() {
            let scales = _mm_loadu_si128(b.scales.as_ptr().cast());
            let mut sumi = [_mm256_setzero_si256(); T];
            for h in 0..2 {
                let q = q6_half(b, h);
                for (k, q) in q.into_iter().enumerate() {
                    // scales of the two 16-value groups, each over 8 i16 lanes
                    let g = (8 * h + 2 * k) as i64;
                    let pick =
                        _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
                    let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                    for t in 0..T {
                        let q8 = y[t].get_unchecked(i).qs.as_ptr().add(128 * h + 32 * k);
                        let p = _mm256_maddubs_epi16(q, _mm256_loadu_si256(q8.cast()));
                        sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(s, p));
                    }
                }
            }
            // the quants above are q + 32: take 32·Σ_g sc_g·Σy_g back out
            let sc16 = _mm256_cvtepi8_epi16(scales);
            // `d` is the block's last field
            let d = _mm_cvtss_f32(_mm_movehdup_ps(f16x2(tail(b))));
            for t in 0..T {
                let a = y[t].get_unchecked(i);
                let offset = _mm256_madd_epi16(sc16, _mm256_loadu_si256(a.bsums.as_ptr().cast()));
                let total = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(offset));
                acc[t] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(total), acc[t]);
            }
        }
        std::array::from_fn(|t| hsum(acc[t]))
    }
}

impl DotQ8 for BlockQ8K {
    type Act = Q8KBlock;
    const NEEDS: Needs = Needs::Q8K;
    #[inline(always)]
    fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Q8KBlock] {
        input.q8k(t)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Q8KBlock]; T]) -> [f32; T] {
        let blocks: &[BlockQ8K] = blocks_for(row, 1, y);
        let mut acc = [_mm256_setzero_ps(); T];
        for (i, b) in blocks.iter().enumerate() {
            let d = f32::from_le_bytes(b.d);
            let mut sumi = [_mm256_setzero_si256(); T];
            for c in 0..QK_K / 32 {
                let q = _mm256_loadu_si256(b.qs.as_ptr().add(32 * c).cast());
                for t in 0..T {
                    let q8 = y[t].get_unchecked(i).qs.as_ptr().add(32 * c);
                    sumi[t] =
                        _mm256_add_epi32(sumi[t], dot_i8_i8(q, _mm256_loadu_si256(q8.cast())));
                }
            }
            for t in 0..T {
                let a = y[t].get_unchecked(i);
                acc[t] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            }
        }
        std::array::from_fn(|t| hsum(acc[t]))
    }
}
