//! Bit-exactness against gguf-py, the reference most GGUF files are made with.

mod gguf_py;

use quant::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Types gguf-py 0.19.0 can dequantize (it has no Q8_1 or Q8_K).
const DEQUANTIZE_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Types gguf-py 0.19.0 can quantize (of those this crate supports).
const QUANTIZE_TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Byte offsets of the f16 scale fields in a block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// `n_blocks` random blocks of `ty` whose f16 scales are finite (a NaN scale
/// makes every output NaN, and which NaN payload survives a multiply is the
/// CPU's business, not the format's). Quants, and F16/BF16 values, are
/// arbitrary bytes, NaNs included.
fn random_blocks(ty: GgmlType, n_blocks: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut bytes = vec![0u8; n_blocks * ty.type_size()];
    rng.fill(&mut bytes[..]);
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        for &offset in f16_fields(ty) {
            let bits = u16::from_le_bytes([block[offset], block[offset + 1]]);
            let finite = if bits & 0x7c00 == 0x7c00 {
                bits & !0x4000
            } else {
                bits
            };
            block[offset..offset + 2].copy_from_slice(&finite.to_le_bytes());
        }
    }
    bytes
}

/// Asserts equal bit patterns, naming the first difference's block.
fn assert_same_bits(ty: GgmlType, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{ty}: value count");
    let mismatches = ours
        .iter()
        .zip(reference)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    if let Some(i) = ours
        .iter()
        .zip(reference)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!(
            "{ty}: {mismatches} of {} values differ from gguf-py; first at value {i} (block {}): ours {} ({:#010x}), gguf-py {} ({:#010x})",
            ours.len(),
            i / ty.block_size(),
            ours[i],
            ours[i].to_bits(),
            reference[i],
            reference[i].to_bits()
        );
    }
}

#[test]
fn dequantize_matches_gguf_py_for_every_type() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0001);
    for ty in DEQUANTIZE_TYPES {
        // enough values to take the parallel path (2^16) with a ragged last task
        let n_blocks = (70_000 + 3 * ty.block_size()) / ty.block_size();
        let blocks = random_blocks(ty, n_blocks, &mut rng);
        let reference = gguf_py::dequantize(ty, &blocks);
        let ours = quant::dequantize_to_vec(ty, &blocks).unwrap();
        assert_same_bits(ty, &ours, &reference);
    }
}

#[test]
fn f16_dequantize_matches_gguf_py_on_every_bit_pattern() {
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    let reference = gguf_py::dequantize(GgmlType::F16, &bytes);
    let ours = quant::dequantize_to_vec(GgmlType::F16, &bytes).unwrap();
    assert_same_bits(GgmlType::F16, &ours, &reference);
}

/// Blocks of 32 (a multiple of every quantized type's block size divides into
/// them) that probe the edge cases, followed by random data over many scales.
fn quantize_input(rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut blocks: Vec<[f32; 32]> = vec![
        [0.0; 32],
        [1.0; 32],
        [-3.25; 32],
        [1e-3; 32],
        std::array::from_fn(|i| i as f32 - 16.0), // exact levels and ties
        std::array::from_fn(|i| (i as f32 - 16.0) / 2.0), // halves: rounding ties
        std::array::from_fn(|i| if i == 7 { 50.0 } else { 0.01 * i as f32 }), // one outlier
        std::array::from_fn(|i| if i % 2 == 0 { 1e4 } else { -3e4 }),
        std::array::from_fn(|i| 6e4 * (i as f32 / 31.0 - 0.5)), // near the f16 limit
        std::array::from_fn(|i| 1e6 * (i as f32 - 5.0)),        // scales overflow f16
        std::array::from_fn(|i| 1e-20 * (i as f32 + 1.0)),      // scales underflow f16
        std::array::from_fn(|i| -1e-30 * (i as f32 + 1.0)),
    ];
    // every multiple of 8 blocks is a K-size run; pad to 256-value alignment
    while !blocks.len().is_multiple_of(8) {
        blocks.push([0.5; 32]);
    }
    for _ in 0..2_048 {
        let magnitude = 10f32.powf(rng.gen_range(-12.0..5.0));
        let offset = if rng.gen_bool(0.2) {
            rng.gen_range(-2.0..2.0) * magnitude
        } else {
            0.0
        };
        blocks.push(std::array::from_fn(|_| {
            // roughly normal: sum of uniforms
            let normal: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum();
            normal * magnitude + offset
        }));
    }
    blocks.concat()
}

#[test]
fn quantize_matches_gguf_py() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0002);
    let values = quantize_input(&mut rng);
    for ty in QUANTIZE_TYPES {
        let reference = gguf_py::quantize(ty, &values);
        let ours = quant::quantize(ty, &values).unwrap();
        assert_eq!(ours.len(), reference.len(), "{ty}: byte count");
        if let Some(i) = ours.iter().zip(&reference).position(|(a, b)| a != b) {
            let block = i / ty.type_size();
            let range = block * ty.type_size()..(block + 1) * ty.type_size();
            let inputs = &values[block * ty.block_size()..(block + 1) * ty.block_size()];
            panic!(
                "{ty}: block {block} differs from gguf-py at byte {}:\n ours    {:02x?}\n gguf-py {:02x?}\n input {inputs:?}",
                i - range.start,
                &ours[range.clone()],
                &reference[range],
            );
        }
    }
}

#[test]
fn float_quantize_matches_gguf_py_on_special_values() {
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN, payload lost in f16
        f32::from_bits(0x7fa0_0000), // signalling NaN, payload kept
        f32::from_bits(0xffc0_1234),
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        65504.0,
        65519.99,
        65520.0,
        5.960_464_5e-8, // smallest f16 subnormal
        2.980_232_2e-8, // half of it: ties to even, to zero
        f32::MAX,
    ];
    // every 65,537th bit pattern, NaNs included
    values.extend((0..=u32::MAX).step_by(65_537).map(f32::from_bits));
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let reference = gguf_py::quantize(ty, &values);
        let ours = quant::quantize(ty, &values).unwrap();
        let size = ty.type_size();
        if let Some(i) = ours
            .chunks(size)
            .zip(reference.chunks(size))
            .position(|(a, b)| a != b)
        {
            panic!(
                "{ty}: value {i} ({:#010x}) → ours {:02x?}, gguf-py {:02x?}",
                values[i].to_bits(),
                &ours[i * size..][..size],
                &reference[i * size..][..size]
            );
        }
    }
}
