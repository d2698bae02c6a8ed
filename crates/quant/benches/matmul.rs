//! Matrix-vector products (decode, one token) of SmolLM2-135M- and Gemma 3
//! 270M-shaped matrices, per weight type: the fused kernels with f32 and
//! with 8-bit activations against the old path (dequantize each row to f32,
//! then a dot product), on one thread and on two.
//!
//! * `matvec/{threads}/{type}/{matrix}/{mode}`: throughput in bytes of
//!   *weights* per second.
//! * `decode/{threads}/{model}/{mode}`: every matrix product of one decode
//!   step of the model (all layers and the output matrix, random weights
//!   of the file's types), so elements/s is the tokens/s those products
//!   allow — an upper bound on the model's decode speed on this machine.
//!
//! Run with `cargo bench -p quant --bench matmul` (add `-- --quick`, or a
//! filter such as `matvec/1-thread/Q4_1`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quant::{Activations, GgmlType, MatmulInput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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

/// `rows × cols` weights of `ty`: random quants under realistic scales
/// (the cost does not depend on the values; NaN scales would not be representative).
fn weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut bytes = vec![0u8; rows * cols / ty.block_size() * ty.type_size()];
    rng.fill(&mut bytes[..]);
    match ty {
        GgmlType::F32 => {
            for value in bytes.chunks_exact_mut(4) {
                value.copy_from_slice(&rng.gen_range(-1.0f32..1.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for value in bytes.chunks_exact_mut(2) {
                value.copy_from_slice(&f16::from_f32(rng.gen_range(-1.0f32..1.0)).to_le_bytes());
            }
        }
        _ => {
            for block in bytes.chunks_exact_mut(ty.type_size()) {
                for &offset in f16_fields(ty) {
                    let scale = f16::from_f32(rng.gen_range(1e-4f32..1e-2));
                    block[offset..offset + 2].copy_from_slice(&scale.to_le_bytes());
                }
            }
        }
    }
    bytes
}

/// The product as the CPU backend computed it before the fused kernels:
/// each row dequantized to f32, then a dot product, rows over the pool.
fn dequantize_then_dot(ty: GgmlType, w: &[u8], rows: usize, x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    let row_bytes = w.len() / rows;
    let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(16, 1024);
    y.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
        let mut row = vec![0f32; cols];
        for (i, o) in out.iter_mut().enumerate() {
            let r = c * chunk + i;
            quant::dequantize(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut row).unwrap();
            let mut acc = [0f32; 8];
            for (a, b) in row.chunks_exact(8).zip(x.chunks_exact(8)) {
                for i in 0..8 {
                    acc[i] += a[i] * b[i];
                }
            }
            *o = acc.iter().sum();
        }
    });
}

/// One matrix of a model: name, rows (outputs), cols (inputs).
type Shape = (&'static str, usize, usize);

const SMOLLM2: [Shape; 3] = [
    ("576x1536", 1536, 576),   // ffn_gate/ffn_up
    ("1536x576", 576, 1536),   // ffn_down
    ("576x49152", 49152, 576), // output (tied embedding)
];
const GEMMA3: [Shape; 2] = [
    ("2048x640", 640, 2048), // ffn_down
    ("1024x640", 640, 1024), // attn_output
];

#[derive(Clone, Copy, Debug)]
enum Mode {
    Old,
    Fused(Activations),
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Old => "dequantize+dot",
            Mode::Fused(Activations::F32) => "f32",
            Mode::Fused(Activations::Q8) => "q8",
        }
    }
}

const MODES: [Mode; 3] = [
    Mode::Old,
    Mode::Fused(Activations::F32),
    Mode::Fused(Activations::Q8),
];

fn run(mode: Mode, ty: GgmlType, w: &[u8], rows: usize, x: &[f32], y: &mut [f32]) {
    match mode {
        Mode::Old => dequantize_then_dot(ty, w, rows, x, y),
        Mode::Fused(act) => quant::matmul(ty, w, rows, x.len(), x, 1, y, act).unwrap(),
    }
}

fn pools() -> [(&'static str, rayon::ThreadPool); 2] {
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .expect("thread pool")
    };
    [("1-thread", pool(1)), ("2-threads", pool(2))]
}

fn matvec(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F16,
        GgmlType::F32,
    ];
    for (threads, pool) in pools() {
        for ty in types {
            let mut group = c.benchmark_group(format!("matvec/{threads}/{ty}"));
            for (name, rows, cols) in SMOLLM2.into_iter().chain(GEMMA3) {
                if cols % ty.block_size() != 0 {
                    continue; // K-quants need rows of whole 256-value blocks
                }
                let w = weights(ty, rows, cols, &mut rng);
                let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let mut y = vec![0f32; rows];
                group.throughput(Throughput::BytesDecimal(w.len() as u64));
                for mode in MODES {
                    let id = BenchmarkId::new(name, mode.name());
                    group.bench_function(id, |b| {
                        b.iter(|| pool.install(|| run(mode, ty, &w, rows, &x, &mut y)))
                    });
                }
            }
            group.finish();
        }
    }
}

/// The matrices of one decode step: (type, rows, cols, count per step).
type Step = Vec<(GgmlType, usize, usize, usize)>;

fn smollm2_step() -> Step {
    use GgmlType::*;
    let layers = 30;
    vec![
        (Q4_1, 576, 576, 2 * layers),  // attn_q, attn_output
        (Q4_1, 192, 576, 2 * layers),  // attn_k, attn_v
        (Q4_1, 1536, 576, 2 * layers), // ffn_gate, ffn_up
        (Q4_1, 576, 1536, layers),     // ffn_down
        (Q8_0, 49152, 576, 1),         // output
    ]
}

fn gemma3_step() -> Step {
    use GgmlType::*;
    let layers = 18;
    vec![
        (Q5_0, 1024, 640, layers),     // attn_q
        (Q5_0, 256, 640, layers),      // attn_k
        (Q8_0, 256, 640, layers),      // attn_v
        (Q4_K, 640, 1024, layers),     // attn_output
        (Q5_0, 2048, 640, 2 * layers), // ffn_gate, ffn_up
        (Q6_K, 640, 2048, layers),     // ffn_down
        (Q8_0, 262144, 640, 1),        // output
    ]
}

fn decode(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (model, step) in [
        ("smollm2-135m-q4_1", smollm2_step()),
        ("gemma3-270m-q4_k_m", gemma3_step()),
    ] {
        // one weight matrix per product, as in the model (they do not fit in cache)
        let matrices: Vec<(GgmlType, usize, usize, Vec<u8>)> = step
            .iter()
            .flat_map(|&(ty, rows, cols, count)| std::iter::repeat_n((ty, rows, cols), count))
            .map(|(ty, rows, cols)| (ty, rows, cols, weights(ty, rows, cols, &mut rng)))
            .collect();
        let widest = matrices.iter().map(|m| m.1.max(m.2)).max().unwrap_or(0);
        let x: Vec<f32> = (0..widest).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut y = vec![0f32; widest];
        for (threads, pool) in pools() {
            let mut group = c.benchmark_group(format!("decode/{threads}"));
            group.throughput(Throughput::Elements(1));
            group.sample_size(10);
            for mode in MODES {
                group.bench_function(BenchmarkId::new(model, mode.name()), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            for (ty, rows, cols, w) in &matrices {
                                let (rows, cols) = (*rows, *cols);
                                match mode {
                                    Mode::Old => dequantize_then_dot(
                                        *ty,
                                        w,
                                        rows,
                                        &x[..cols],
                                        &mut y[..rows],
                                    ),
                                    Mode::Fused(act) => {
                                        let input = MatmulInput::new(&x[..cols], 1, cols).unwrap();
                                        quant::matmul_input(
                                            *ty,
                                            w,
                                            rows,
                                            &input,
                                            &mut y[..rows],
                                            act,
                                        )
                                        .unwrap()
                                    }
                                }
                            }
                        })
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = matvec, decode
}
criterion_main!(benches);
