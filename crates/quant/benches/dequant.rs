//! Dequantization throughput of every type, to f32 and to f16, on one thread
//! and on the whole rayon pool.
//!
//! Throughput is reported in bytes of *input* (the quantized blocks) per
//! second; each benchmark decodes `VALUES` values, so values/s is
//! `VALUES / time`. Run with `cargo bench -p quant --bench dequant`
//! (add `-- --quick` for a short run, or a filter such as `Q4_K`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quant::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Values per iteration: a 1024×1024 tensor (4 MiB of f32 out).
const VALUES: usize = 1 << 20;

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

/// Random blocks with scales of a realistic size (decoding cost does not
/// depend on the quants, but NaN or huge scales would not be representative).
fn blocks(ty: GgmlType) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from(ty.id()));
    let mut bytes = vec![0u8; VALUES / ty.block_size() * ty.type_size()];
    rng.fill(&mut bytes[..]);
    match ty {
        GgmlType::F32 => {
            for value in bytes.chunks_exact_mut(4) {
                value.copy_from_slice(&rng.gen_range(-1.0f32..1.0).to_le_bytes());
            }
        }
        GgmlType::Q8_K => {
            for block in bytes.chunks_exact_mut(ty.type_size()) {
                block[..4].copy_from_slice(&rng.gen_range(1e-4f32..1e-2).to_le_bytes());
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

fn dequantize(c: &mut Criterion) {
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("1-thread pool");
    let all = rayon::ThreadPoolBuilder::new()
        .build()
        .expect("default pool");
    let pools = [("1-thread", &single), ("all-threads", &all)];

    let inputs: Vec<(GgmlType, Vec<u8>)> = quant::SUPPORTED_TYPES
        .iter()
        .map(|&ty| (ty, blocks(ty)))
        .collect();
    let mut out_f32 = vec![0f32; VALUES];
    let mut out_f16 = vec![f16::ZERO; VALUES];

    for (threads, pool) in pools {
        let mut group = c.benchmark_group(format!("dequantize_f32/{threads}"));
        for (ty, src) in &inputs {
            group.throughput(Throughput::BytesDecimal(src.len() as u64));
            group.bench_function(BenchmarkId::from_parameter(ty), |b| {
                b.iter(|| pool.install(|| quant::dequantize(*ty, src, &mut out_f32).unwrap()))
            });
        }
        group.finish();

        let mut group = c.benchmark_group(format!("dequantize_f16/{threads}"));
        for (ty, src) in &inputs {
            group.throughput(Throughput::BytesDecimal(src.len() as u64));
            group.bench_function(BenchmarkId::from_parameter(ty), |b| {
                b.iter(|| pool.install(|| quant::dequantize_f16(*ty, src, &mut out_f16).unwrap()))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = dequantize
}
criterion_main!(benches);
