//! The AVX2 + FMA + F16C kernels (x86-64 v3), picked at run time.
//!
//! Each format implements [`DotF32`] (decode a block to f32 lanes, FMA into
//! the activations, one scale per block) and, where an integer kernel
//! exists, [`DotQ8`] (`vpmaddubsw` of unsigned weight quants with signed
//! activation quants, `vpmaddwd` to i32, one float FMA per block). Both
//! compute one weight row against a tile of `T` tokens, so a block is
//! decoded once per tile. The kernels are `inline(always)` and are compiled
//! only inside the `target_feature` drivers below.

mod float;
mod kquants;
mod legacy;

use std::arch::x86_64::*;
use std::ops::Range;

use super::portable::{self, q8_scale};
use super::{Activations, Kernel, Needs, Prepared, Q8Block, Q8KBlock, Q8Pair, Weights, TOKEN_TILE};
use crate::float::{BF16, F16, F32};
use crate::kernel::Dequantize;
use crate::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType, QK_K, QK_LEGACY,
};

/// Whether this CPU runs these kernels (std caches the CPUID answer).
#[inline]
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU has `vpdpbusd` on 256-bit registers (AVX-512 VNNI and
/// VL: Ice Lake and later Intel server cores, AMD Zen 4 and later), which
/// the Q8 kernels of the legacy formats use in place of `vpmaddubsw` + `vpmaddwd`.
#[inline]
pub(super) fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// The AVX2 kernel for `ty` and `act`, if this CPU has AVX2, FMA and F16C.
pub(super) fn select(ty: GgmlType, act: Activations) -> Option<(Kernel, Needs)> {
    select_for(ty, act, true)
}

/// [`select`], with the VNNI builds of the Q8 kernels only if `vnni` (and the CPU has it).
pub(super) fn select_for(ty: GgmlType, act: Activations, vnni: bool) -> Option<(Kernel, Needs)> {
    use GgmlType as G;
    if !available() {
        return None;
    }
    let vnni = vnni && has_vnni();
    let q8 = act == Activations::Q8;
    Some(match ty {
        G::Q4_0 if q8 => q8_kernel::<BlockQ4_0>(vnni),
        G::Q4_1 if q8 => q8_kernel::<BlockQ4_1>(vnni),
        G::Q5_0 if q8 => q8_kernel::<BlockQ5_0>(vnni),
        G::Q5_1 if q8 => q8_kernel::<BlockQ5_1>(vnni),
        G::Q8_0 if q8 => q8_kernel::<BlockQ8_0>(vnni),
        G::Q8_1 if q8 => q8_kernel::<BlockQ8_1>(vnni),
        G::Q4_K if q8 => q8_kernel::<BlockQ4K>(vnni),
        G::Q5_K if q8 => q8_kernel::<BlockQ5K>(vnni),
        G::Q6_K if q8 => q8_kernel::<BlockQ6K>(vnni),
        G::Q8_K if q8 => q8_kernel::<BlockQ8K>(vnni),
        G::F32 => f32_kernel::<F32>(),
        G::F16 => f32_kernel::<F16>(),
        G::BF16 => f32_kernel::<BF16>(),
        G::Q4_0 => f32_kernel::<BlockQ4_0>(),
        G::Q4_1 => f32_kernel::<BlockQ4_1>(),
        G::Q5_0 => f32_kernel::<BlockQ5_0>(),
        G::Q5_1 => f32_kernel::<BlockQ5_1>(),
        G::Q8_0 => f32_kernel::<BlockQ8_0>(),
        G::Q8_1 => f32_kernel::<BlockQ8_1>(),
        G::Q4_K => f32_kernel::<BlockQ4K>(),
        G::Q5_K => f32_kernel::<BlockQ5K>(),
        G::Q6_K => f32_kernel::<BlockQ6K>(),
        G::Q2_K => generic_kernel::<BlockQ2K>(),
        G::Q3_K => generic_kernel::<BlockQ3K>(),
        G::Q8_K => generic_kernel::<BlockQ8K>(),
        _ => return None,
    })
}

/// One format's F32-mode row kernel.
pub(super) trait DotF32 {
    /// Whether [`DotF32::dot`] reads `sums` (Σx per 32 values).
    const NEEDS_SUMS: bool;
    /// `Σ_c row[c] · x[t][c]` for each of the `T` tokens. `row` is whole
    /// blocks, every `x[t]` exactly the row's values, every `sums[t]` (when
    /// read) a value per 32 of them.
    ///
    /// # Safety
    /// Only call with AVX2, FMA and F16C present.
    unsafe fn dot<const T: usize>(row: &[u8], x: &[&[f32]; T], sums: &[&[f32]; T]) -> [f32; T];
}

/// One format's Q8-mode row kernel.
pub(super) trait DotQ8 {
    /// The activation blocks it reads ([`Q8Pair`] or [`Q8KBlock`]).
    type Act: 'static;
    const NEEDS: Needs;
    fn acts<'a>(input: &Prepared<'a>, t: usize) -> &'a [Self::Act];
    /// `Σ_c row[c] · y[t][c]` for each of the `T` tokens; `row` is whole
    /// blocks, every `y[t]` holds the row's values (padded to whole pairs).
    ///
    /// # Safety
    /// Only call with AVX2, FMA and F16C present.
    unsafe fn dot<const T: usize>(row: &[u8], y: &[&[Self::Act]; T]) -> [f32; T];

    /// [`DotQ8::dot`] built with VNNI (the same code where a format has
    /// nothing to gain from it).
    ///
    /// # Safety
    /// Only call with AVX2, FMA, F16C, AVX-512 VNNI and AVX-512 VL present.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn dot_vnni<const T: usize>(row: &[u8], y: &[&[Self::Act]; T]) -> [f32; T] {
        Self::dot::<T>(row, y)
    }
}

fn f32_kernel<K: DotF32>() -> (Kernel, Needs) {
    let needs = if K::NEEDS_SUMS {
        Needs::XAndSums
    } else {
        Needs::X
    };
    (
        |w, input, rows, out| {
            // SAFETY: `select` hands this out only when `available()`.
            unsafe { f32_rows::<K>(w, input, rows, out) }
        },
        needs,
    )
}

fn q8_kernel<K: DotQ8>(vnni: bool) -> (Kernel, Needs) {
    let kernel: Kernel = if vnni {
        |w, input, rows, out| {
            // SAFETY: `select_for` hands this out only when `available()` and `has_vnni()`.
            unsafe { q8_rows_vnni::<K>(w, input, rows, out) }
        }
    } else {
        |w, input, rows, out| {
            // SAFETY: `select_for` hands this out only when `available()`.
            unsafe { q8_rows::<K>(w, input, rows, out) }
        }
    };
    (kernel, K::NEEDS)
}

fn generic_kernel<K: Dequantize>() -> (Kernel, Needs) {
    (
        |w, input, rows, out| {
            // SAFETY: `select` hands this out only when `available()`.
            unsafe { generic_rows::<K>(w, input, rows, out) }
        },
        Needs::X,
    )
}

/// Calls `tile(t0, T)` for token tiles of up to [`TOKEN_TILE`] tokens
/// (`wide`: up to [`WIDE_TILE`]), each the largest power of two left.
macro_rules! for_each_tile {
    ($n:expr, $wide:expr, |$t0:ident, $T:ident| $body:expr) => {{
        let n = $n;
        let most = if $wide { WIDE_TILE } else { TOKEN_TILE };
        let mut $t0 = 0;
        while $t0 < n {
            let left = (n - $t0).min(most);
            let tile = if left >= 8 {
                const $T: usize = 8;
                $body;
                $T
            } else if left >= 4 {
                const $T: usize = 4;
                $body;
                $T
            } else if left >= 2 {
                const $T: usize = 2;
                $body;
                $T
            } else {
                const $T: usize = 1;
                $body;
                $T
            };
            $t0 += tile;
        }
    }};
}

/// Tokens per tile of the 8-bit kernels on CPUs with AVX-512 VNNI, whose 32
/// vector registers hold twice the accumulators.
const WIDE_TILE: usize = 8;
const _: () = assert!(TOKEN_TILE == 4 && WIDE_TILE == 8);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_rows<K: DotF32>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    for_each_tile!(out.len(), false, |t0, T| {
        let x: [&[f32]; T] = std::array::from_fn(|i| input.x(t0 + i));
        let sums: [&[f32]; T] = std::array::from_fn(|i| {
            if K::NEEDS_SUMS {
                input.sums(t0 + i)
            } else {
                &[]
            }
        });
        for r in rows.clone() {
            // SAFETY: this function's target features are the kernels' requirement.
            let y = unsafe { K::dot::<T>(w.row(r), &x, &sums) };
            for (i, y) in y.into_iter().enumerate() {
                out[t0 + i][r - rows.start] = y;
            }
        }
    });
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_rows<K: DotQ8>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    q8_tiles::<K, false>(w, input, rows, out)
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn q8_rows_vnni<K: DotQ8>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    q8_tiles::<K, true>(w, input, rows, out)
}

/// The body of [`q8_rows`] and [`q8_rows_vnni`].
#[inline(always)]
unsafe fn q8_tiles<K: DotQ8, const VNNI: bool>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    for_each_tile!(out.len(), VNNI, |t0, T| {
        let y: [&[K::Act]; T] = std::array::from_fn(|i| K::acts(input, t0 + i));
        for r in rows.clone() {
            let v = if VNNI {
                K::dot_vnni::<T>(w.row(r), &y)
            } else {
                K::dot::<T>(w.row(r), &y)
            };
            for (i, v) in v.into_iter().enumerate() {
                out[t0 + i][r - rows.start] = v;
            }
        }
    });
}

/// The portable kernel compiled with AVX2, for the formats without their own.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn generic_rows<K: Dequantize>(
    w: Weights<'_>,
    input: &Prepared<'_>,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    for_each_tile!(out.len(), false, |t0, T| {
        portable::tile_rows::<K, T>(w, input, rows.clone(), out, t0)
    });
}

/// Quantizes one row `x` to [`Q8Pair`]s; each block exactly as
/// [`portable::quantize_q8_block`] does it.
pub(super) fn quantize_q8(x: &[f32], out: &mut [Q8Pair]) {
    assert!(available());
    // SAFETY: AVX2, FMA and F16C are present (asserted above).
    unsafe { quantize_q8_avx2(x, out) }
}

/// Quantizes `x` to [`Q8KBlock`]s exactly as [`portable::quantize_q8k_block`] does.
pub(super) fn quantize_q8k(x: &[f32], out: &mut [Q8KBlock]) {
    assert!(available());
    // SAFETY: AVX2, FMA and F16C are present (asserted above).
    unsafe { quantize_q8k_avx2(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_avx2(x: &[f32], out: &mut [Q8Pair]) {
    let block = |x: &[f32]| {
        let x: &[f32; QK_LEGACY] = x.try_into().expect("32 values");
        let (d, id) = q8_scale(abs_max32(x));
        let (qs, sum) = round32(x, id);
        portable::q8_block(qs, d, sum)
    };
    for (x, out) in x.chunks(2 * QK_LEGACY).zip(out) {
        let (a, b) = x.split_at(QK_LEGACY);
        let b = if b.is_empty() {
            Q8Block::ZERO
        } else {
            block(b)
        };
        *out = Q8Pair::new(&block(a), &b);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8k_avx2(x: &[f32], out: &mut [Q8KBlock]) {
    for (x, out) in x.chunks_exact(QK_K).zip(out) {
        let amax = x
            .chunks_exact(QK_LEGACY)
            .map(|x| abs_max32(x.try_into().expect("32 values")))
            .fold(0f32, f32::max);
        let (d, id) = q8_scale(amax);
        for (g, x) in x.chunks_exact(16).enumerate() {
            let (lo, hi) = x.split_at(8);
            // SAFETY: AVX2 is enabled here; the loads read 8 floats each.
            let q = unsafe { [round8(lo.as_ptr(), id), round8(hi.as_ptr(), id)] };
            let sum = unsafe { hsum_i32(_mm256_add_epi32(q[0], q[1])) };
            out.bsums[g] = sum as i16;
            let bytes = pack_i32_to_i8_16(q);
            out.qs[16 * g..16 * (g + 1)].copy_from_slice(&bytes);
        }
        out.d = d;
    }
}

/// max |x| of 32 values.
#[inline(always)]
fn abs_max32(x: &[f32; QK_LEGACY]) -> f32 {
    // SAFETY: only inlined into AVX2 functions; reads 32 floats of `x`.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let p = x.as_ptr();
        let v: [__m256; 4] =
            std::array::from_fn(|i| _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))));
        let m = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }
}

/// `round(x · id)` of 8 values as i32 lanes (`vcvtps2dq` rounds to nearest even).
#[inline(always)]
unsafe fn round8(x: *const f32, id: f32) -> __m256i {
    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(id)))
}

/// 32 values rounded to i8, and their sum.
#[inline(always)]
fn round32(x: &[f32; QK_LEGACY], id: f32) -> ([i8; QK_LEGACY], i32) {
    // SAFETY: only inlined into AVX2 functions; reads 32 floats of `x`.
    unsafe {
        let p = x.as_ptr();
        let q: [__m256i; 4] = std::array::from_fn(|i| round8(p.add(8 * i), id));
        let sum = hsum_i32(_mm256_add_epi32(
            _mm256_add_epi32(q[0], q[1]),
            _mm256_add_epi32(q[2], q[3]),
        ));
        // the packs work within 128-bit lanes; the permutation puts the dwords back in order
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0i8; QK_LEGACY];
        _mm256_storeu_si256(qs.as_mut_ptr().cast(), packed);
        (qs, sum)
    }
}

/// 16 i32 values (each within i8) packed to bytes, in order.
#[inline(always)]
fn pack_i32_to_i8_16(q: [__m256i; 2]) -> [i8; 16] {
    // SAFETY: only inlined into AVX2 functions.
    unsafe {
        let words = _mm256_packs_epi32(q[0], q[1]); // lanes: q0[0..4] q1[0..4] | q0[4..8] q1[4..8]
        let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(words);
        let bytes = _mm_packs_epi16(
            _mm256_castsi256_si128(words),
            _mm256_extracti128_si256::<1>(words),
        );
        let mut out = [0i8; 16];
        _mm_storeu_si128(out.as_mut_ptr().cast(), bytes);
        out
    }
}

// ---- helpers shared by the kernels (all inlined into AVX2 code) ----

/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    hsum128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

/// Sum of the 4 lanes.
#[inline(always)]
unsafe fn hsum128(v: __m128) -> f32 {
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// Sum of the 8 i32 lanes.
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01>(v));
    _mm_cvtsi128_si32(v)
}

/// The two little-endian f16 values in `bytes` as lanes 0 and 1 (lanes 2
/// and 3 zero). F16C quiets a signalling NaN, which no product can tell.
///
/// Scales are read 4 bytes at a time on purpose: a 2-byte read becomes
/// `vpinsrw` into whatever register is free, often the accumulator, and
/// chains every block to the previous block's FMA; `vmovd` zeroes the rest.
#[inline(always)]
unsafe fn f16x2(bytes: [u8; 4]) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(bytes)))
}

/// The first 4 bytes of a block (which starts with an f16 scale).
#[inline(always)]
fn head<B: bytemuck::Pod>(block: &B) -> [u8; 4] {
    bytemuck::bytes_of(block)[..4]
        .try_into()
        .expect("blocks are longer than 4 bytes")
}

/// The last 4 bytes of a block (which ends with an f16 scale).
#[inline(always)]
fn tail<B: bytemuck::Pod>(block: &B) -> [u8; 4] {
    let bytes = bytemuck::bytes_of(block);
    bytes[bytes.len() - 4..]
        .try_into()
        .expect("blocks are longer than 4 bytes")
}

/// Calls `step(i, block, k)` for every block, `k` alternating between 0 and
/// 1: two accumulator chains, so that one block's FMA need not wait for the
/// previous one's.
#[inline(always)]
fn each_block_2<B>(blocks: &[B], mut step: impl FnMut(usize, &B, usize)) {
    let pairs = blocks.len() / 2;
    for p in 0..pairs {
        step(2 * p, &blocks[2 * p], 0);
        step(2 * p + 1, &blocks[2 * p + 1], 1);
    }
    if blocks.len() % 2 == 1 {
        step(blocks.len() - 1, &blocks[blocks.len() - 1], 0);
    }
}

/// 16 bytes of packed nibbles as 32 bytes: the low nibbles first (values
/// 0..16 of a legacy block), then the high ones (values 16..32).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// The low and high nibbles of 32 bytes.
#[inline(always)]
unsafe fn split_nibbles(v: __m256i) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(v, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
    )
}

/// Fifth bits as 0x10 bytes: each 8-byte group of the result takes the byte
/// of `bits` that `pick` names (per 128-bit lane) and turns its bit `j` into
/// byte `j` of the group.
#[inline(always)]
unsafe fn spread_bits(bits: __m256i, pick: __m256i) -> __m256i {
    let spread = _mm256_shuffle_epi8(bits, pick);
    // every bit but bit j of byte j set: the byte is all ones iff bit j was set
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Bit `j` of the little-endian u32 `bits` as byte `j`: 0x10 where set, 0 elsewhere.
#[inline(always)]
unsafe fn fifth_bits(bits: [u8; 4]) -> __m256i {
    let pick = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    spread_bits(_mm256_set1_epi32(i32::from_le_bytes(bits)), pick)
}

/// Σ u·s over groups of 4 bytes, as 8 i32 lanes: `u` unsigned, `s` signed,
/// and each pair of products within i16 (true for every caller: `u` ≤ 128).
#[inline(always)]
unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// `acc` plus Σ u·s over groups of 4 bytes, as [`dot_u8_i8`]; with `VNNI`
/// one `vpdpbusd` (only inside functions built with AVX-512 VNNI and VL).
#[inline(always)]
unsafe fn dot_u8_i8_add<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, u, s)
    } else {
        _mm256_add_epi32(acc, dot_u8_i8(u, s))
    }
}

/// Σ a·b over groups of 4 bytes, both signed (`|a|` moved onto `b`'s sign).
#[inline(always)]
unsafe fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

/// 32 bytes → four vectors of 8 f32, sign- or zero-extended.
#[inline(always)]
unsafe fn bytes_to_f32<const SIGNED: bool>(v: __m256i) -> [__m256; 4] {
    let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)];
    std::array::from_fn(|i| {
        let h = halves[i / 2];
        let eight = if i % 2 == 0 {
            h
        } else {
            _mm_unpackhi_epi64(h, h)
        };
        let wide = if SIGNED {
            _mm256_cvtepi8_epi32(eight)
        } else {
            _mm256_cvtepu8_epi32(eight)
        };
        _mm256_cvtepi32_ps(wide)
    })
}

/// Σ w·x over 32 values at `x` as 8 lanes, in two FMA chains.
#[inline(always)]
unsafe fn dot32(w: &[__m256; 4], x: *const f32) -> __m256 {
    let a = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    let b = _mm256_mul_ps(w[1], _mm256_loadu_ps(x.add(8)));
    let a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), a);
    let b = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), b);
    _mm256_add_ps(a, b)
}

/// Σ w·x over 16 values at `x` as 8 lanes.
#[inline(always)]
unsafe fn dot16(w: &[__m256; 2], x: *const f32) -> __m256 {
    let a = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), a)
}

/// `row` viewed as blocks, with the token slices checked to match it (the
/// kernels then read them through raw pointers).
#[inline(always)]
fn blocks_for<'a, B: bytemuck::Pod, A, const T: usize>(
    row: &'a [u8],
    per_block: usize,
    acts: &[&[A]; T],
) -> &'a [B] {
    let blocks: &[B] = bytemuck::cast_slice(row);
    for a in acts {
        assert_eq!(
            a.len(),
            blocks.len() * per_block,
            "activations do not match the row"
        );
    }
    blocks
}
