//! K-quant quantizers: llama.cpp's reference algorithms (`quantize_row_*_ref`,
//! what `llama-quantize` runs when it has no importance matrix).
//!
//! Each sub-block gets a scale (and for Q2_K/Q4_K/Q5_K a min) from a small
//! search that minimises a weighted error; the sub-block scales are then
//! quantized against the super-block scale and every value is re-quantized
//! with the scale it will really be decoded with. The float operations are
//! done in llama.cpp's order, so, compiled without FMA contraction, the
//! blocks match llama.cpp's byte for byte.

use crate::float::{f16_field, f16_field_from};
use crate::kernel::QuantizeBlock;
use crate::kquants::{
    scale_min_k4, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, K_SCALE_SIZE, QK_K,
};

/// Below this a group's largest magnitude counts as zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round half to even for |value| < 2^22, by adding 1.5 * 2^23 so the
/// integer lands in the mantissa (ggml's `nearest_int`; out of range it
/// gives the same garbage ggml does instead of failing).
#[inline(always)]
fn nearest_int(value: f32) -> i32 {
    let biased = value + 12_582_912.0;
    (biased.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Search for the scale and min of one sub-block in `0..=nmax` levels
/// (`x ≈ scale * l - min`), minimising the `weights`-weighted squared (or,
/// with `use_mad`, absolute) error over `nstep + 1` trial scales spread by
/// `rmin`, `rdelta` around `nmax / (max - min)`. Returns `(scale, min)` with
/// `min >= 0` and writes the levels to `levels` (ggml's `make_qkx2_quants`).
#[allow(clippy::too_many_arguments)]
#[inline(always)] // so `N`, `nmax` and `use_mad` are constants in the loops
fn make_qkx2_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    weights: &[f32; N],
    levels: &mut [u8; N],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = N;
    let error = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        best_error += weights[i] * error(scale * l as f32 + min - x[i]);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut trial = [0u8; N];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut this_error = 0.0f32;
            for i in 0..n {
                this_error +=
                    weights[i] * error(this_scale * f32::from(trial[i]) + this_min - x[i]);
            }
            if this_error < best_error {
                *levels = trial;
                best_error = this_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Symmetric search for the scale of one sub-block in `-nmax..nmax` levels,
/// weighting each value by `x²` (ggml's `make_qx_quants` with `rmse_type = 1`
/// and no importance weights). Writes `l + nmax` to `levels`.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Σ w·x·l and Σ w·l² for one trial scale
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let (w, l) = (v * v, level(iscale, v) as f32);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmax_f / max;
    for (out, &v) in levels.iter_mut().zip(x) {
        *out = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&step| step != 0) {
        iscale = -(nmax_f + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (out, &v) in levels.iter_mut().zip(x) {
                *out = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q3_K's sub-block search: start from `-nmax / max` and move single levels
/// while that lowers the `x²`-weighted error (ggml's `make_q3_quants` with
/// `do_rmse`). Writes `l + nmax` to `levels`.
fn make_q3_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    let mut l_of = [0i32; 16];
    let l_of = &mut l_of[..x.len()];
    for (l_out, &v) in l_of.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *l_out = l;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let current = l_of[i] as f32;
            let mut slx = sumlx - w * v * current;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * current * current;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l_of[i] {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_of[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (out, &l) in levels.iter_mut().zip(l_of.iter()) {
        *out = (l + nmax) as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Packs 2-bit levels as [`BlockQ2K::qs`] (also Q3_K's low bits).
fn pack_2bit(levels: &[u8; QK_K]) -> [u8; QK_K / 4] {
    std::array::from_fn(|i| {
        let (h, l) = (i / 32, i % 32);
        let base = 128 * h + l;
        levels[base]
            | (levels[base + 32] << 2)
            | (levels[base + 64] << 4)
            | (levels[base + 96] << 6)
    })
}

/// Packs 8 6-bit scales and mins the way [`scale_min_k4`] unpacks them.
fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut packed = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    packed
}

/// The part Q4_K and Q5_K share: per 32-value sub-block a scale and min from
/// [`make_qkx2_quants`] weighted by `rms + |x|`, both quantized to 6 bits
/// against the largest, then every value re-quantized to `0..=nmax` with the
/// decoded scales. Returns `(d, dmin, packed scales, levels)`.
fn quantize_scale_min_k4(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([u8; 2], [u8; 2], [u8; K_SCALE_SIZE], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for (j, (x, levels)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let x: &[f32; 32] = x.try_into().expect("32-value sub-blocks");
        let levels: &mut [u8; 32] = levels.try_into().expect("32-value sub-blocks");
        let mut sum_x2 = 0.0f32;
        for &v in x {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + x[l].abs());
        (scales[j], mins[j]) =
            make_qkx2_quants(nmax, x, &weights, levels, rmin, rdelta, nstep, false);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // `as u8` truncates like C's conversion to uint8_t
    let ls = scales.map(|s| (nearest_int(inv_scale * s) as u8).min(63));
    let lm = mins.map(|m| (nearest_int(inv_min * m) as u8).min(63));
    let packed = pack_scale_min_k4(&ls, &lm);
    let d = f16_field_from(max_scale / 63.0);
    let dmin = f16_field_from(max_min / 63.0);

    for (j, (x, levels)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = f16_field(d) * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = f16_field(dmin) * f32::from(m);
        for (level, &v) in levels.iter_mut().zip(x) {
            *level = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

impl QuantizeBlock<QK_K> for BlockQ4K {
    fn quantize(x: &[f32; QK_K]) -> Self {
        let (d, dmin, scales, levels) = quantize_scale_min_k4(x, 15, -1.0, 0.1, 20);
        let qs = std::array::from_fn(|i| {
            let (chunk, l) = (i / 32, i % 32);
            levels[64 * chunk + l] | (levels[64 * chunk + 32 + l] << 4)
        });
        Self {
            d,
            dmin,
            scales,
            qs,
        }
    }
}

impl QuantizeBlock<QK_K> for BlockQ5K {
    fn quantize(x: &[f32; QK_K]) -> Self {
        let (d, dmin, scales, levels) = quantize_scale_min_k4(x, 31, -0.5, 0.1, 15);
        let mut qh = [0u8; QK_K / 8];
        let mut qs = [0u8; QK_K / 2];
        for chunk in 0..4 {
            for l in 0..32 {
                let low = levels[64 * chunk + l];
                let high = levels[64 * chunk + 32 + l];
                qh[l] |= ((low >> 4) << (2 * chunk)) | ((high >> 4) << (2 * chunk + 1));
                qs[32 * chunk + l] = (low & 0x0f) | ((high & 0x0f) << 4);
            }
        }
        Self {
            d,
            dmin,
            scales,
            qh,
            qs,
        }
    }
}

impl QuantizeBlock<QK_K> for BlockQ6K {
    fn quantize(x: &[f32; QK_K]) -> Self {
        let mut levels = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for (scale, (x, levels)) in scales
            .iter_mut()
            .zip(x.chunks_exact(16).zip(levels.chunks_exact_mut(16)))
        {
            *scale = make_qx_quants(32, x, levels);
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = *scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            return bytemuck::Zeroable::zeroed();
        }

        let iscale = -128.0 / max_scale;
        let d = f16_field_from(1.0 / iscale);
        // `as i8` truncates like C's conversion to int8_t (the value is in -128..=127)
        let quantized_scales = scales.map(|s| nearest_int(iscale * s).min(127) as i8);
        for (j, (x, levels)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let d = f16_field(d) * f32::from(quantized_scales[j]);
            if d == 0.0 {
                continue;
            }
            for (level, &v) in levels.iter_mut().zip(x) {
                *level = (nearest_int(v / d).clamp(-32, 31) + 32) as i8;
            }
        }

        let levels = levels.map(|l| l as u8);
        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        for h in 0..2 {
            for l in 0..32 {
                let base = 128 * h + l;
                let [q0, q1, q2, q3] = [
                    levels[base],
                    levels[base + 32],
                    levels[base + 64],
                    levels[base + 96],
                ];
                ql[64 * h + l] = (q0 & 0x0f) | ((q2 & 0x0f) << 4);
                ql[64 * h + 32 + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
                qh[32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
            }
        }
        Self {
            ql,
            qh,
            scales: quantized_scales,
            d,
        }
    }
}

impl QuantizeBlock<QK_K> for BlockQ2K {
    fn quantize(x: &[f32; QK_K]) -> Self {
        const Q4SCALE: f32 = 15.0;
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let mut mins = [0f32; QK_K / 16];
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for (j, (x, levels)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let x: &[f32; 16] = x.try_into().expect("16-value sub-blocks");
            let levels: &mut [u8; 16] = levels.try_into().expect("16-value sub-blocks");
            let weights: [f32; 16] = std::array::from_fn(|l| x[l].abs());
            (scales[j], mins[j]) = make_qkx2_quants(3, x, &weights, levels, -0.5, 0.1, 15, true);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }

        let mut packed = [0u8; QK_K / 16];
        let mut d = f16_field_from(0.0);
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for (packed, &s) in packed.iter_mut().zip(&scales) {
                *packed = nearest_int(iscale * s) as u8;
            }
            d = f16_field_from(max_scale / Q4SCALE);
        }
        let mut dmin = f16_field_from(0.0);
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for (packed, &m) in packed.iter_mut().zip(&mins) {
                *packed |= (nearest_int(iscale * m) << 4) as u8;
            }
            dmin = f16_field_from(max_min / Q4SCALE);
        }

        for (j, (x, levels)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let dl = f16_field(d) * f32::from(packed[j] & 0x0f);
            if dl == 0.0 {
                continue;
            }
            let ml = f16_field(dmin) * f32::from(packed[j] >> 4);
            for (level, &v) in levels.iter_mut().zip(x) {
                *level = nearest_int((v + ml) / dl).clamp(0, 3) as u8;
            }
        }
        Self {
            scales: packed,
            qs: pack_2bit(&levels),
            d,
            dmin,
        }
    }
}

impl QuantizeBlock<QK_K> for BlockQ3K {
    fn quantize(x: &[f32; QK_K]) -> Self {
        let mut levels = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
        for (scale, (x, levels)) in scales
            .iter_mut()
            .zip(x.chunks_exact(16).zip(levels.chunks_exact_mut(16)))
        {
            *scale = make_q3_quants(4, x, levels);
            if scale.abs() > amax {
                amax = scale.abs();
                max_scale = *scale;
            }
        }

        let mut packed = [0u8; 12];
        let mut d = f16_field_from(0.0);
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &s) in scales.iter().enumerate() {
                // C stores nearest_int's result in an int8_t before clamping
                let l = ((nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    packed[j] = l & 0x0f;
                } else {
                    packed[j - 8] |= (l & 0x0f) << 4;
                }
                packed[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
            }
            d = f16_field_from(1.0 / iscale);
        }

        let signed_scales = crate::kquants::q3k_scales(&packed);
        for (j, (x, levels)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let dl = f16_field(d) * f32::from(signed_scales[j]);
            if dl == 0.0 {
                continue;
            }
            for (level, &v) in levels.iter_mut().zip(x) {
                *level = (nearest_int(v / dl).clamp(-4, 3) + 4) as i8;
            }
        }

        // the high bit goes, inverted, to hmask; value j is bit j / 32 of byte j % 32
        let mut hmask = [0u8; QK_K / 8];
        let mut low = [0u8; QK_K];
        for (j, &level) in levels.iter().enumerate() {
            let mut level = level as u8;
            if level > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                level -= 4;
            }
            low[j] = level;
        }
        Self {
            hmask,
            qs: pack_2bit(&low),
            scales: packed,
            d,
        }
    }
}

impl QuantizeBlock<QK_K> for BlockQ8K {
    fn quantize(x: &[f32; QK_K]) -> Self {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            return bytemuck::Zeroable::zeroed();
        }
        let iscale = -127.0 / max;
        let qs = x.map(|v| nearest_int(iscale * v).min(127) as i8);
        let bsums = std::array::from_fn(|j| {
            let sum: i32 = qs[16 * j..][..16].iter().map(|&q| i32::from(q)).sum();
            (sum as i16).to_le_bytes()
        });
        Self {
            d: (1.0 / iscale).to_le_bytes(),
            qs,
            bsums,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.4999), -2);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(-4_194_303.0), -4_194_303);
    }

    #[test]
    fn scale_min_packing_round_trips() {
        let scales = [0, 1, 31, 32, 63, 17, 48, 5];
        let mins = [63, 0, 33, 62, 1, 40, 15, 16];
        let packed = pack_scale_min_k4(&scales, &mins);
        for j in 0..8 {
            assert_eq!(
                scale_min_k4(j, &packed),
                (scales[j], mins[j]),
                "sub-block {j}"
            );
        }
    }
}
