//! The products against dequantize-then-f64-dot on random matrices of every
//! type, in both modes, for the selected (AVX2) and the portable kernels.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::{dequantize_to_vec, SUPPORTED_TYPES};

/// Byte offsets of the f16 scale fields in a block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
            &[0, 2]
        }
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows × cols` random weights of `ty`: random quant bits (every pattern,
/// extremes included) under scales of a realistic size, or random values
/// for the float types.
fn random_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let values = rows * cols;
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let x: Vec<f32> = (0..values).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            crate::quantize(ty, &x).unwrap()
        }
        _ => {
            let mut bytes = vec![0u8; values / ty.block_size() * ty.type_size()];
            rng.fill(&mut bytes[..]);
            for block in bytes.chunks_exact_mut(ty.type_size()) {
                if ty == GgmlType::Q8_K {
                    block[..4].copy_from_slice(&rng.gen_range(-1e-2f32..1e-2).to_le_bytes());
                }
                for &offset in f16_fields(ty) {
                    let scale = f16::from_f32(rng.gen_range(-1e-2f32..1e-2));
                    block[offset..offset + 2].copy_from_slice(&scale.to_le_bytes());
                }
            }
            bytes
        }
    }
}

/// Activations with varied magnitudes (a few large values, as real ones have).
fn random_activations(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v = rng.gen_range(-1.0f32..1.0);
            if rng.gen_bool(0.02) {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

/// `(Σ w·x, Σ |w·x|)` in f64 for every token and row: the reference and the
/// scale its rounding error is measured against.
fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n * rows);
    for t in 0..n {
        let x = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let w = &w[r * cols..(r + 1) * cols];
            let (sum, abs) = w.iter().zip(x).fold((0f64, 0f64), |(s, a), (&w, &x)| {
                let p = f64::from(w) * f64::from(x);
                (s + p, a + p.abs())
            });
            out.push((sum, abs));
        }
    }
    out
}

/// The activations a kernel that reads `needs` actually multiplies
/// (the 8-bit ones dequantized).
fn effective_activations(needs: Needs, input: &MatmulInput<'_>) -> Vec<f32> {
    match needs {
        Needs::Q8 => {
            let blocks = input.cols / QK_LEGACY;
            input
                .q8()
                .chunks_exact(pairs_per_row(input.cols))
                .flat_map(|row| {
                    row.iter()
                        .flat_map(|p| [p.block(0), p.block(1)])
                        .take(blocks)
                        .flat_map(|b| b.qs.map(|q| b.d * f32::from(q)))
                })
                .collect()
        }
        Needs::Q8K => input
            .q8k()
            .iter()
            .flat_map(|b| b.qs.map(|q| b.d * f32::from(q)))
            .collect(),
        Needs::X | Needs::XAndSums => input.x.to_vec(),
        Needs::XF16 => input.x_f16().to_vec(),
        Needs::XBf16 => input.x_bf16().to_vec(),
    }
}

const TOLERANCE: f64 = 1e-5;

/// Checks `y` against the reference: within [`TOLERANCE`] of Σ|w·x| (f32
/// rounding of a sum), plus `slack[t][r]` (quantization of the activations).
fn check(what: &str, y: &[f32], reference: &[(f64, f64)], slack: &[f64]) {
    for (i, (&y, &(expected, abs))) in y.iter().zip(reference).enumerate() {
        let allowed = TOLERANCE * abs + slack[i] + 1e-30;
        let error = (f64::from(y) - expected).abs();
        assert!(
            error <= allowed,
            "{what}: output {i}: {y:e} vs {expected:e} (error {error:e}, allowed {allowed:e})"
        );
    }
}

/// The column counts a type is tested with (whole blocks; odd lengths for floats).
fn col_counts(ty: GgmlType) -> Vec<usize> {
    match ty.block_size() {
        1 => vec![1, 15, 16, 37, 256, 583],
        32 => vec![32, 96, 576],
        _ => vec![256, 768],
    }
}

fn run(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    input: &MatmulInput<'_>,
    pick: impl FnOnce() -> (Kernel, Needs),
) -> Vec<f32> {
    let mut y = vec![f32::NAN; input.n * rows];
    matmul_using(ty, w, rows, input, &mut y, pick).unwrap();
    y
}

#[test]
fn every_type_matches_the_reference_in_both_modes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for ty in SUPPORTED_TYPES {
        for cols in col_counts(ty) {
            for (rows, n) in [(1, 1), (7, 1), (33, 2), (5, 3), (9, 4), (13, 9), (6, 15)] {
                let w = random_weights(ty, rows, cols, &mut rng);
                let w_values = dequantize_to_vec(ty, &w).unwrap();
                let x = random_activations(n * cols, &mut rng);
                let input = MatmulInput::new(&x, n, cols).unwrap();
                let exact = reference(&w_values, rows, cols, &x, n);
                let what = format!("{ty} {rows}×{cols}, {n} tokens");
                let no_slack = vec![0.0; n * rows];
                for act in [Activations::F32, Activations::Q8] {
                    for (name, kernel) in candidates(ty, act) {
                        let what = format!("{what}, {act:?}, {name} kernel");
                        let y = run(ty, &w, rows, &input, || kernel);
                        // exact against the activations it multiplies...
                        let x_used = effective_activations(kernel.1, &input);
                        let against_used = reference(&w_values, rows, cols, &x_used, n);
                        check(&what, &y, &against_used, &no_slack);
                        // ...and off the true result by no more than the rounding
                        // of the activations explains: |Σ w·(x - x̃)| ≤ Σ |w|·|x - x̃|
                        let moved: Vec<f64> = x
                            .iter()
                            .zip(&x_used)
                            .map(|(a, b)| f64::from((a - b).abs()))
                            .collect();
                        assert!(kernel.1 != Needs::X || moved.iter().all(|&m| m == 0.0));
                        let mut slack = Vec::with_capacity(n * rows);
                        for t in 0..n {
                            for r in 0..rows {
                                let bound: f64 = w_values[r * cols..(r + 1) * cols]
                                    .iter()
                                    .zip(&moved[t * cols..(t + 1) * cols])
                                    .map(|(&w, &m)| f64::from(w).abs() * m)
                                    .sum();
                                slack.push(bound * (1.0 + 1e-3));
                            }
                        }
                        check(&what, &y, &exact, &slack);
                    }
                }
            }
        }
    }
}

/// The Q8 activations are within half a step of the input (with the f16
/// rounding of the legacy blocks' scale), and the AVX2
/// quantizers give exactly the scalar ones' blocks.
#[test]
fn q8_activations_round_to_nearest() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut x = random_activations(4 * QK_K, &mut rng);
    x[QK_K..2 * QK_K].fill(0.0); // an all-zero block
    x[2 * QK_K] = -1e3; // a block dominated by one value
    let input = MatmulInput::new(&x, 1, x.len()).unwrap();
    let q8_blocks = input.q8().iter().flat_map(|p| [p.block(0), p.block(1)]);
    for (b, (block, x)) in q8_blocks.zip(x.chunks_exact(QK_LEGACY)).enumerate() {
        let scalar = portable::quantize_q8_block(x.try_into().unwrap());
        assert_eq!(
            (block.qs, block.d.to_bits(), block.s.to_bits()),
            (scalar.qs, scalar.d.to_bits(), scalar.s.to_bits()),
            "block {b}"
        );
        // Half a step, plus the f16 rounding of the scale over 127 steps.
        for (&q, &v) in block.qs.iter().zip(x) {
            assert!(
                (block.d * f32::from(q) - v).abs() <= block.d * (0.5001 + 127.0 / 2048.0),
                "block {b}"
            );
        }
    }
    for (b, (block, x)) in input.q8k().iter().zip(x.chunks_exact(QK_K)).enumerate() {
        let scalar = portable::quantize_q8k_block(x.try_into().unwrap());
        assert_eq!(block.qs, scalar.qs, "block {b}");
        assert_eq!(block.bsums, scalar.bsums, "block {b}");
        assert_eq!(block.d.to_bits(), scalar.d.to_bits(), "block {b}");
    }
}

/// Large enough to be split over the pool; weights, activations and output
/// at odd addresses; results equal to a single-threaded run.
#[test]
fn parallel_and_unaligned_runs_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::F16,
    ] {
        let (rows, cols, n) = (131, 1024, 6);
        let w = random_weights(ty, rows, cols, &mut rng);
        let mut w_shifted = vec![0u8; w.len() + 1];
        w_shifted[1..].copy_from_slice(&w);
        let x = random_activations(n * cols + 1, &mut rng);
        for act in [Activations::F32, Activations::Q8] {
            let mut y = vec![0f32; n * rows + 1];
            pool.install(|| {
                matmul(
                    ty,
                    &w_shifted[1..],
                    rows,
                    cols,
                    &x[1..],
                    n,
                    &mut y[1..],
                    act,
                )
            })
            .unwrap();
            let mut expected = vec![0f32; n * rows];
            single
                .install(|| matmul(ty, &w, rows, cols, &x[1..], n, &mut expected, act))
                .unwrap();
            assert_eq!(&y[1..], &expected[..], "{ty} {act:?}");
        }
    }
}

#[test]
fn shapes_are_checked() {
    let w = vec![0u8; 2 * 18];
    let x = vec![0f32; 32];
    let mut y = vec![0f32; 2];
    let act = Activations::F32;
    assert!(matmul(GgmlType::Q4_0, &w, 2, 32, &x, 1, &mut y, act).is_ok());
    assert!(matches!(
        matmul(GgmlType::Q4_0, &w, 3, 32, &x, 1, &mut [0.0; 3], act),
        Err(QuantError::MatmulShape { .. })
    ));
    assert!(matches!(
        matmul(
            GgmlType::Q4_0,
            &w[..18],
            1,
            16,
            &x[..16],
            1,
            &mut y[..1],
            act
        ),
        Err(QuantError::MatmulShape { .. })
    ));
    assert!(matches!(
        matmul(GgmlType::Q4_0, &w, 2, 32, &x, 2, &mut y, act),
        Err(QuantError::Activations { .. })
    ));
    assert!(matches!(
        matmul(GgmlType::Q4_0, &w, 2, 32, &x, 1, &mut [0.0; 3], act),
        Err(QuantError::MatmulShape { .. })
    ));
    assert!(matches!(
        matmul(GgmlType::IQ4_NL, &w, 2, 32, &x, 1, &mut y, act),
        Err(QuantError::Unsupported { .. })
    ));
    let mut empty_rows = [f32::NAN; 6];
    matmul(GgmlType::F32, &[], 3, 0, &[], 2, &mut empty_rows, act).unwrap();
    assert_eq!(empty_rows, [0.0; 6], "a sum of no values is zero");
    let message = matmul(GgmlType::Q4_0, &w, 3, 32, &x, 1, &mut [0.0; 3], act)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "Q4_0 matrix of 3×32: expected 54 bytes of weights, found 36"
    );
}

/// One input, several matrices: the quantized forms are made once and reused.
#[test]
fn an_input_serves_several_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (cols, n) = (512, 2);
    let x = random_activations(n * cols, &mut rng);
    let input = MatmulInput::new(&x, n, cols).unwrap();
    for ty in [
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let w = random_weights(ty, 3, cols, &mut rng);
        for act in [Activations::F32, Activations::Q8] {
            let mut shared = vec![0f32; n * 3];
            matmul_input(ty, &w, 3, &input, &mut shared, act).unwrap();
            let mut fresh = vec![0f32; n * 3];
            matmul(ty, &w, 3, cols, &x, n, &mut fresh, act).unwrap();
            assert_eq!(shared, fresh, "{ty} {act:?}");
        }
    }
}

/// Several products in one pass give what they give one at a time, and a
/// bad shape anywhere is refused before anything is computed.
#[test]
fn several_products_in_one_pass() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let (cols, n) = (1024, 3);
    let x = random_activations(n * cols, &mut rng);
    let input = MatmulInput::new(&x, n, cols).unwrap();
    let shapes = [
        (GgmlType::Q5_0, 96),
        (GgmlType::Q5_0, 32),
        (GgmlType::Q8_0, 7),
        (GgmlType::Q6_K, 50),
    ];
    let weights: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(ty, rows)| random_weights(ty, rows, cols, &mut rng))
        .collect();
    for act in [Activations::F32, Activations::Q8] {
        let mut outputs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(_, rows)| vec![0f32; n * rows])
            .collect();
        let mut products: Vec<Product<'_>> = shapes
            .iter()
            .zip(&weights)
            .zip(&mut outputs)
            .map(|((&(ty, rows), w), y)| Product { ty, w, rows, y })
            .collect();
        pool.install(|| matmul_many(&mut products, &input, act))
            .unwrap();
        for ((&(ty, rows), w), y) in shapes.iter().zip(&weights).zip(&outputs) {
            let mut alone = vec![0f32; n * rows];
            matmul_input(ty, w, rows, &input, &mut alone, act).unwrap();
            assert_eq!(y, &alone, "{ty} {act:?}");
        }
    }
    let mut good = vec![f32::NAN; n * 96];
    let mut bad = vec![0f32; n * 33];
    let mut products = [
        Product {
            ty: shapes[0].0,
            w: &weights[0],
            rows: 96,
            y: &mut good,
        },
        Product {
            ty: GgmlType::Q5_0,
            w: &weights[1],
            rows: 33,
            y: &mut bad,
        },
    ];
    assert!(matches!(
        matmul_many(&mut products, &input, Activations::Q8),
        Err(QuantError::MatmulShape { .. })
    ));
    assert!(
        good.iter().all(|v| v.is_nan()),
        "nothing is computed when a shape is wrong"
    );
}
