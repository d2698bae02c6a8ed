//! Properties that need no reference implementation: error reporting, the
//! parallel split, f16 output, and how well the quantizers reconstruct data.

use half::f16;
use quant::{GgmlType, QuantError, SUPPORTED_TYPES};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_bytes(len: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    bytes
}

/// Roughly normal values with standard deviation `sigma`.
fn normal_values(n: usize, sigma: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    // the sum of 4 uniforms on [-1, 1) has variance 4/3
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * sigma / 1.154_700_5)
        .collect()
}

/// Equal bits, or both NaN.
fn same_value(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn dequantize(ty: GgmlType, blocks: &[u8]) -> Vec<f32> {
    quant::dequantize_to_vec(ty, blocks).unwrap()
}

#[test]
fn support_is_reported_consistently() {
    for ty in GgmlType::ALL {
        let supported = SUPPORTED_TYPES.contains(&ty);
        assert_eq!(quant::can_dequantize(ty), supported, "{ty}");
        assert_eq!(quant::can_quantize(ty), supported, "{ty}");
        if !supported {
            let err = quant::dequantize(ty, &[], &mut []).unwrap_err();
            assert!(matches!(err, QuantError::Unsupported { .. }), "{ty}: {err}");
            assert!(quant::dequantize_f16(ty, &[], &mut []).is_err(), "{ty}");
            assert!(quant::quantize(ty, &[]).is_err(), "{ty}");
        }
    }
}

#[test]
fn errors_say_what_is_wrong() {
    let err = quant::dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut [0.0; 256]).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("cannot dequantize IQ2_XXS: not implemented"),
        "{message}"
    );
    assert!(
        message.contains("Q4_K") && message.contains("BF16"),
        "lists what is supported: {message}"
    );
    assert_eq!(
        quant::quantize(GgmlType::TQ1_0, &[0.0; 256])
            .unwrap_err()
            .to_string()
            .split(':')
            .next(),
        Some("cannot quantize TQ1_0")
    );

    let err = quant::dequantize(GgmlType::Q4_K, &[0; 145], &mut [0.0; 256]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Q4_K data of 145 bytes is not a whole number of 144-byte blocks"
    );

    let err = quant::dequantize(GgmlType::Q4_K, &[0; 288], &mut [0.0; 500]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Q4_K data of 288 bytes holds 512 values, but the output has room for 500"
    );
    let err = quant::dequantize_f16(GgmlType::Q8_0, &[0; 34], &mut [f16::ZERO; 33]).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::Length {
                values: 32,
                output_len: 33,
                ..
            }
        ),
        "{err}"
    );

    let err = quant::quantize(GgmlType::Q6_K, &[0.0; 300]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot quantize 300 values to Q6_K: the count must be a multiple of its block size 256"
    );
}

#[test]
fn empty_input_is_fine() {
    for ty in SUPPORTED_TYPES {
        quant::dequantize(ty, &[], &mut []).unwrap();
        quant::dequantize_f16(ty, &[], &mut []).unwrap();
        assert!(quant::quantize(ty, &[]).unwrap().is_empty());
    }
}

/// The rayon split must not change a value: dequantizing a large input in one
/// call equals dequantizing it block by block (each call then serial), and
/// blocks at an odd address decode like aligned ones.
#[test]
fn parallel_split_and_alignment_do_not_change_results() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for ty in SUPPORTED_TYPES {
        let n_blocks = 200_000 / ty.block_size() + 1; // past the parallel threshold, ragged end
        let mut storage = random_bytes(n_blocks * ty.type_size() + 1, &mut rng);
        let blocks = &storage[1..]; // odd address
        let whole = dequantize(ty, blocks);
        let stride = 7 * ty.type_size();
        let pieces: Vec<f32> = blocks
            .chunks(stride)
            .flat_map(|piece| dequantize(ty, piece))
            .collect();
        assert_eq!(whole.len(), pieces.len());
        for (i, (a, b)) in whole.iter().zip(&pieces).enumerate() {
            assert!(
                same_value(*a, *b),
                "{ty} value {i}: whole {a:e}, block by block {b:e}"
            );
        }
        storage.remove(0);
        let aligned = dequantize(ty, &storage);
        assert!(
            whole.iter().zip(&aligned).all(|(a, b)| same_value(*a, *b)),
            "{ty}: alignment matters"
        );
    }
}

#[test]
fn quantize_parallel_split_does_not_change_results() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let values = normal_values(3 * 4096 + 5 * 256, 1.0, &mut rng);
    for ty in SUPPORTED_TYPES {
        let whole = quant::quantize(ty, &values).unwrap();
        let pieces: Vec<u8> = values
            .chunks(ty.block_size())
            .flat_map(|block| quant::quantize(ty, block).unwrap())
            .collect();
        assert!(
            whole == pieces,
            "{ty}: quantizing in one call differs from block by block"
        );
    }
}

/// Weights with NaN or infinity are garbage in, but must not panic
/// (overflow checks are on in tests) or produce the wrong length.
#[test]
fn quantizing_non_finite_values_does_not_panic() {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        0.0,
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut values = normal_values(256 * 16, 1.0, &mut rng);
    for (i, v) in values.iter_mut().enumerate() {
        if i % 7 == 0 || i / 256 == 3 {
            *v = specials[(i / 7) % specials.len()];
        }
    }
    values[256 * 5..256 * 6].fill(f32::NAN);
    values[256 * 6..256 * 7].fill(f32::INFINITY);
    for ty in SUPPORTED_TYPES {
        let blocks = quant::quantize(ty, &values).unwrap();
        assert_eq!(
            blocks.len(),
            values.len() / ty.block_size() * ty.type_size(),
            "{ty}"
        );
        assert_eq!(dequantize(ty, &blocks).len(), values.len(), "{ty}");
    }
}

#[test]
fn f16_output_is_the_f32_output_rounded_to_nearest() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for ty in SUPPORTED_TYPES {
        for n_blocks in [1, 3, 100_000 / ty.block_size() + 1] {
            let blocks = random_bytes(n_blocks * ty.type_size(), &mut rng);
            let wide = dequantize(ty, &blocks);
            let mut narrow = vec![f16::ZERO; wide.len()];
            quant::dequantize_f16(ty, &blocks, &mut narrow).unwrap();
            for (i, (w, n)) in wide.iter().zip(&narrow).enumerate() {
                let expected = f16::from_f32(*w);
                assert!(
                    n.to_bits() == expected.to_bits() || (n.is_nan() && expected.is_nan()),
                    "{ty} value {i}: f32 {w:e} → {n}, expected {expected}"
                );
            }
        }
    }
}

/// Reconstruction error relative to the data's standard deviation, for
/// normally distributed data (what weights look like). The bounds are about
/// 10% above what the quantizers achieve; llama.cpp's reference quantizers,
/// which these reproduce, achieve the same.
#[test]
fn round_trip_error_of_normal_data_is_bounded() {
    let bounds = [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 0.000_25),
        (GgmlType::BF16, 0.002),
        (GgmlType::Q4_0, 0.090),
        (GgmlType::Q4_1, 0.084),
        (GgmlType::Q5_0, 0.045),
        (GgmlType::Q5_1, 0.041),
        (GgmlType::Q8_0, 0.0056),
        (GgmlType::Q8_1, 0.0056),
        (GgmlType::Q2_K, 0.32),
        (GgmlType::Q3_K, 0.16),
        (GgmlType::Q4_K, 0.076),
        (GgmlType::Q5_K, 0.038),
        (GgmlType::Q6_K, 0.019),
        (GgmlType::Q8_K, 0.0069),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let sigma = 0.02;
    let values = normal_values(256 * 256, sigma, &mut rng);
    for (ty, bound) in bounds {
        let decoded = dequantize(ty, &quant::quantize(ty, &values).unwrap());
        let mse = values
            .iter()
            .zip(&decoded)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / values.len() as f64;
        let relative = mse.sqrt() / f64::from(sigma);
        assert!(
            relative <= bound,
            "{ty}: relative RMSE {relative:.5} > {bound}"
        );
    }
}

/// llama.cpp's own check (tests/test-quantize-fns.cpp): 4096 values of
/// `0.1 + 2 cos(i)`, error `sqrt(Σ(x - y)²) / n` under 0.002, or 0.0075 for
/// 2-bit and 0.004 for 3-bit types.
#[test]
fn round_trip_error_passes_llama_cpp_test_quantize_fns() {
    let n = 4096;
    let values: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    for ty in SUPPORTED_TYPES {
        let bound = match ty {
            GgmlType::Q2_K => 0.0075,
            GgmlType::Q3_K => 0.004,
            _ => 0.002,
        };
        let decoded = dequantize(ty, &quant::quantize(ty, &values).unwrap());
        let sum: f64 = values
            .iter()
            .zip(&decoded)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let error = sum.sqrt() / n as f64;
        assert!(error < bound, "{ty}: error {error:.6} ≥ {bound}");
    }
}

/// Data a format can represent comes back unchanged: quantizing dequantized
/// values and decoding again gives the same values. The K-quants' scale
/// search is not idempotent for Q2_K, Q3_K, Q5_K and Q8_K (it can trade a
/// scale for a min, or land one rounding step away); for those the second
/// round trip must move values much less than the first did.
#[test]
fn requantizing_representable_data_is_stable() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut values = normal_values(256 * 64, 0.02, &mut rng);
    // blocks with an offset, a constant block and an all-zero block
    values[..256].iter_mut().for_each(|v| *v += 0.05);
    values[256..512].fill(0.375);
    values[512..768].fill(0.0);
    for ty in SUPPORTED_TYPES {
        let first = dequantize(ty, &quant::quantize(ty, &values).unwrap());
        let second = dequantize(ty, &quant::quantize(ty, &first).unwrap());
        let moved = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        match ty {
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q5_K | GgmlType::Q8_K => {
                let (quantization, requantization) =
                    (moved(&values, &first), moved(&first, &second));
                assert!(
                    requantization < 0.25 * quantization,
                    "{ty}: requantizing moved values by {requantization:e}, quantizing by {quantization:e}"
                );
            }
            _ => {
                // `==`, not bits: an all-zero Q4_0/Q5_0 block decodes to -0.0 and then to +0.0,
                // as in gguf-py (the scale's sign comes from `max / -8`)
                if let Some(i) = first.iter().zip(&second).position(|(a, b)| a != b) {
                    panic!(
                        "{ty}: value {i} was {} and became {} when requantized",
                        first[i], second[i]
                    );
                }
            }
        }
    }
}

#[test]
fn activation_formats_carry_consistent_sums() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let values = normal_values(1024, 1.0, &mut rng);

    // `s` is `d * Σq` with the f32 scale, before `d` is rounded to f16
    let q8_1 = quant::quantize(GgmlType::Q8_1, &values).unwrap();
    for block in bytemuck::cast_slice::<u8, quant::BlockQ8_1>(&q8_1) {
        let d = f16::from_le_bytes(block.d).to_f32();
        let sum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
        let s = f16::from_le_bytes(block.s).to_f32();
        assert!(
            (s - sum as f32 * d).abs() <= 2e-3 * s.abs().max(d),
            "s {s}, d·Σq {}",
            sum as f32 * d
        );
    }

    let q8_k = quant::quantize(GgmlType::Q8_K, &values).unwrap();
    for block in bytemuck::cast_slice::<u8, quant::BlockQ8K>(&q8_k) {
        for (group, bsum) in block.qs.chunks(16).zip(&block.bsums) {
            let sum: i32 = group.iter().map(|&q| i32::from(q)).sum();
            assert_eq!(i32::from(i16::from_le_bytes(*bsum)), sum);
        }
    }
}
