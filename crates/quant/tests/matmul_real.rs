//! The fused products on the weights of the two real test models: every
//! matrix of SmolLM2-135M (Q4_1, Q8_0) and Gemma 3 270M (Q5_0, Q8_0, Q4_K,
//! Q6_K), a slice of its rows against random activations, in both modes,
//! compared with dequantize-then-f64-dot.
//!
//! The models come from `scripts/fetch-models.sh` (`$WORKER_ORCD_MODELS`,
//! default `~/.cache/worker-orcd/models`); a missing model fails the test
//! with the script to run.

use std::path::PathBuf;

use gguf::GgufFile;
use quant::{Activations, MatmulInput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn model_path(file: &str) -> PathBuf {
    let dir = match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/models"),
    };
    let path = dir.join(file);
    assert!(
        path.exists(),
        "test model {} is missing: run scripts/fetch-models.sh (or set WORKER_ORCD_MODELS to the folder holding it)",
        path.display()
    );
    path
}

/// Rows taken from each matrix (the first ones; enough to cover every block layout).
const ROWS: usize = 96;
const TOKENS: usize = 3;

fn check_model(file: &str) {
    let model = GgufFile::open(model_path(file)).expect("open model");
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut checked = 0;
    for tensor in model.tensors() {
        let (cols, rows) = match tensor.dims[..] {
            [cols, rows] => (cols as usize, rows as usize),
            _ => continue, // norms and biases
        };
        let ty = tensor.ty;
        let rows = rows.min(ROWS);
        let row_bytes = cols / ty.block_size() * ty.type_size();
        let w = &model.tensor_data(tensor)[..rows * row_bytes];
        let w_values = quant::dequantize_to_vec(ty, w).unwrap();
        let x: Vec<f32> = (0..TOKENS * cols)
            .map(|_| rng.gen_range(-2.0f32..2.0))
            .collect();
        let input = MatmulInput::new(&x, TOKENS, cols).unwrap();
        // reference and Σ|w·x| per output
        let reference: Vec<(f64, f64)> = (0..TOKENS)
            .flat_map(|t| (0..rows).map(move |r| (t, r)))
            .map(|(t, r)| {
                let w = &w_values[r * cols..(r + 1) * cols];
                let x = &x[t * cols..(t + 1) * cols];
                w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| {
                    let p = f64::from(w) * f64::from(x);
                    (s + p, a + p.abs())
                })
            })
            .collect();

        let mut y = vec![0f32; TOKENS * rows];
        quant::matmul_input(ty, w, rows, &input, &mut y, Activations::F32).unwrap();
        for (i, (&y, &(expected, abs))) in y.iter().zip(&reference).enumerate() {
            let error = (f64::from(y) - expected).abs();
            assert!(
                error <= 1e-5 * abs + 1e-30,
                "{file} {}: F32 output {i}: {y:e} vs {expected:e}",
                tensor.name
            );
        }

        // 8-bit activations: the error of the whole output, relative to its size
        quant::matmul_input(ty, w, rows, &input, &mut y, Activations::Q8).unwrap();
        let (error, size) = y
            .iter()
            .zip(&reference)
            .fold((0.0, 0.0), |(e, s), (&y, &(r, _))| {
                (e + (f64::from(y) - r).powi(2), s + r * r)
            });
        let relative = (error / size).sqrt();
        assert!(
            relative < 1e-2,
            "{file} {}: Q8 relative error {relative:e}",
            tensor.name
        );
        checked += 1;
    }
    assert!(checked > 100, "{file}: only {checked} matrices");
}

#[test]
fn smollm2_matrices() {
    check_model("SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn gemma3_matrices() {
    check_model("gemma-3-270m-q4_k_m.gguf");
}
