//! The decode mat-vec kernels (`kernels/matvec.cu`) against the CPU, and
//! their speed against the bytes-over-bandwidth floor. Both need an NVIDIA
//! GPU and are `#[ignore]`d (run them as gpu.rs says). Lines starting with
//! `gpu-check:` are the summary that gpu-check.sh prints.

use cuda::cudarc::driver::result as driver;
use cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cuda::{CudaDevice, DeviceBuffer, DeviceMatrix, DeviceOptions, Kernels, MatvecOut};
use gguf::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn open_device() -> CudaDevice {
    CudaDevice::open(&DeviceOptions::default())
        .unwrap_or_else(|e| panic!("this test needs an NVIDIA GPU and its driver: {e}"))
}

/// Every type the weights may come in that `quant` can also quantize
/// (random but valid blocks come from quantizing random values): all of
/// `quant`'s but the activation-only Q8_1 and Q8_K.
fn weight_types() -> impl Iterator<Item = GgmlType> {
    quant::SUPPORTED_TYPES
        .into_iter()
        .filter(|t| !matches!(t, GgmlType::Q8_1 | GgmlType::Q8_K))
}

fn upload<T: Copy>(device: &CudaDevice, data: &[T], what: &str) -> DeviceBuffer {
    let buffer = DeviceBuffer::new(device, std::mem::size_of_val(data), what).unwrap();
    // SAFETY: the buffer holds size_of_val(data) bytes.
    unsafe { driver::memcpy_htod_sync(buffer.ptr(), data) }.unwrap();
    buffer
}

fn download(buffer: &DeviceBuffer, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    // SAFETY: the buffer holds at least n f32 (the callers size it so).
    unsafe { driver::memcpy_dtoh_sync(&mut out, buffer.ptr()) }.unwrap();
    out
}

/// A random `rows × cols` matrix of type `ty` on the device, and its values as the CPU reads them.
fn matrix(
    device: &CudaDevice,
    rng: &mut ChaCha8Rng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
) -> (DeviceMatrix, DeviceBuffer, Vec<f32>) {
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let bytes = quant::quantize(ty, &values).unwrap();
    let dequantized = quant::dequantize_to_vec(ty, &bytes).unwrap();
    let buffer = upload(device, &bytes, "weights");
    let m = DeviceMatrix {
        ty,
        rows,
        cols,
        row_bytes: bytes.len() / rows,
        ptr: buffer.ptr(),
    };
    (m, buffer, dequantized)
}

/// `rstd(x) · x · norm` per row, as the CPU backend's RMSNorm.
fn rms_norm(x: &[f32], cols: usize, norm: &[f32], eps: f32) -> Vec<f32> {
    x.chunks_exact(cols)
        .flat_map(|row| {
            let mean = row.iter().map(|v| (v * v) as f64).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (mean + eps as f64).sqrt();
            row.iter()
                .zip(norm)
                .map(move |(v, w)| (*v as f64 * rstd) as f32 * w)
        })
        .collect()
}

/// `W · x[t]` for each token row, in f64.
fn product(w: &[f32], cols: usize, x: &[f32]) -> Vec<Vec<f64>> {
    x.chunks_exact(cols)
        .map(|xt| {
            w.chunks_exact(cols)
                .map(|row| row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum())
                .collect()
        })
        .collect()
}

fn rel_l2(gpu: &[f32], cpu: &[f64]) -> f64 {
    let num: f64 = gpu
        .iter()
        .zip(cpu)
        .map(|(g, c)| (*g as f64 - c).powi(2))
        .sum();
    let den: f64 = cpu.iter().map(|c| c * c).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matvec_every_format_matches_cpu() {
    let device = open_device();
    let kernels = Kernels::load(&device).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let eps = 1e-6f32;
    // Short rows (a warp per row) and long ones (a block per row); token
    // counts on both sides of the kernels' 8-row blocks.
    for &(cols, tokens) in &[(512usize, [1usize, 3, 8, 11]), (2304, [1, 2, 8, 9])] {
        let norm: Vec<f32> = (0..cols).map(|_| rng.gen_range(0.5..1.5)).collect();
        let norm_dev = upload(&device, &norm, "norm");
        for ty in weight_types() {
            // Q, K and V shaped: three matrices of one type stacked.
            let shapes = [72usize, 24, 24];
            let mats: Vec<_> = shapes
                .iter()
                .map(|&r| matrix(&device, &mut rng, ty, r, cols))
                .collect();
            for &n in &tokens {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let x_dev = upload(&device, &x, "x");
                let normed = rms_norm(&x, cols, &norm, eps);
                let outs: Vec<DeviceBuffer> = shapes
                    .iter()
                    .map(|&r| upload(&device, &vec![0.5f32; n * r], "y"))
                    .collect();
                for (fused, accumulate) in [(true, false), (false, true)] {
                    let stacked: Vec<MatvecOut<'_>> = mats
                        .iter()
                        .zip(&outs)
                        .map(|((m, _, _), y)| MatvecOut {
                            w: m,
                            y: y.ptr(),
                            ldy: m.rows,
                        })
                        .collect();
                    let norm_arg = fused.then_some((norm_dev.ptr(), eps));
                    // SAFETY: x holds n × cols f32, each y n × rows, norm cols.
                    unsafe {
                        kernels.matvec_stacked(&stacked, x_dev.ptr(), n, norm_arg, accumulate)
                    }
                    .unwrap();
                    device.synchronize().unwrap();
                    for (((m, _, values), y), &rows) in mats.iter().zip(&outs).zip(&shapes) {
                        let gpu = download(y, n * rows);
                        let input = if fused { &normed } else { &x };
                        let mut cpu: Vec<f64> = product(values, cols, input).concat();
                        if accumulate {
                            // On top of the fused run's output, still in y.
                            let before: Vec<f64> = product(values, cols, &normed).concat();
                            cpu.iter_mut().zip(before).for_each(|(c, b)| *c += b);
                        }
                        let err = rel_l2(&gpu, &cpu);
                        assert!(
                            err < 1e-5,
                            "{ty} {}×{cols}, {n} tokens, fused norm {fused}, accumulate {accumulate}: rel-L2 {err:.2e}",
                            m.rows
                        );
                    }
                }
                // The FFN's first half: gate and up of the first shape.
                let (gate, up) = (&mats[0], &matrix(&device, &mut rng, ty, shapes[0], cols));
                for gelu in [false, true] {
                    let y = upload(&device, &vec![0f32; n * shapes[0]], "gated");
                    // SAFETY: as above; y holds n × rows f32.
                    unsafe {
                        kernels.matvec_gated(
                            &gate.0,
                            &up.0,
                            x_dev.ptr(),
                            n,
                            Some((norm_dev.ptr(), eps)),
                            y.ptr(),
                            gelu,
                        )
                    }
                    .unwrap();
                    device.synchronize().unwrap();
                    let g = product(&gate.2, cols, &normed).concat();
                    let u = product(&up.2, cols, &normed).concat();
                    let cpu: Vec<f64> = g
                        .iter()
                        .zip(&u)
                        .map(|(&g, &u)| {
                            if gelu {
                                0.5 * g
                                    * (1.0 + (0.7978845608 * g * (1.0 + 0.044715 * g * g)).tanh())
                                    * u
                            } else {
                                g / (1.0 + (-g).exp()) * u
                            }
                        })
                        .collect();
                    let err = rel_l2(&download(&y, n * shapes[0]), &cpu);
                    assert!(
                        err < 1e-5,
                        "{ty} gated (gelu {gelu}) {}×{cols}, {n} tokens: rel-L2 {err:.2e}",
                        shapes[0]
                    );
                }
            }
        }
        println!("gpu-check: matvec, every format, {cols} columns: fused RMSNorm, Q/K/V stacked, accumulate and gated all within 1e-5 of the CPU");
    }
}

/// Time per product of one decode row through `w`, µs: `reps` launches
/// captured in a CUDA graph (as decode steps run), median of 7 replays.
fn time_matvec(
    device: &CudaDevice,
    kernels: &Kernels,
    w: &DeviceMatrix,
    x: u64,
    y: u64,
    reps: usize,
) -> f64 {
    let stream = device.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    for _ in 0..reps {
        // SAFETY: x holds w.cols f32, y w.rows.
        unsafe { kernels.matvec(w, x, 1, y, w.rows, false) }.unwrap();
    }
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .unwrap();
    graph.launch().unwrap();
    device.synchronize().unwrap();
    let ctx = device.context();
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let start = ctx
                .new_event(Some(
                    cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
                ))
                .unwrap();
            let end = ctx
                .new_event(Some(
                    cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
                ))
                .unwrap();
            start.record(stream).unwrap();
            graph.launch().unwrap();
            end.record(stream).unwrap();
            end.synchronize().unwrap();
            start.elapsed_ms(&end).unwrap() as f64 * 1e3 / reps as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[test]
#[ignore = "needs an NVIDIA GPU; a benchmark"]
fn matvec_speed() {
    let device = open_device();
    let kernels = Kernels::load(&device).unwrap();
    let peak = device.peak_bandwidth().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    println!(
        "gpu-check: matvec speed, one decode row, CUDA-graph replay of 200 launches; peak bandwidth {:.2} TB/s",
        peak / 1e12
    );
    // Qwen2.5-0.5B's FFN down projection (896 × 4864) and its gate/up shape
    // (4864 × 896, not for the K-quants' 256-value blocks).
    for (rows, cols) in [(896usize, 4864usize), (4864, 896), (151_936, 896)] {
        for ty in weight_types() {
            if cols % ty.block_size() != 0
                || (rows > 100_000 && ty != GgmlType::Q8_0 && ty != GgmlType::Q5_0)
            {
                continue;
            }
            let (w, _buffer, _) = matrix(&device, &mut rng, ty, rows, cols);
            let x = upload(&device, &vec![0.25f32; cols], "x");
            let y = DeviceBuffer::new(&device, 4 * rows, "y").unwrap();
            let reps = if rows > 100_000 { 20 } else { 200 };
            let us = time_matvec(&device, &kernels, &w, x.ptr(), y.ptr(), reps);
            let bytes = (w.row_bytes * rows) as f64;
            let floor_us = bytes / peak * 1e6;
            println!(
                "gpu-check:   {:<5} {rows:>6}×{cols:<5} {:8.1} KiB {us:7.2} µs = {:6.0} GB/s, {:4.1}% of peak (floor {floor_us:.2} µs)",
                ty.to_string(),
                bytes / 1024.0,
                bytes / us / 1e3,
                100.0 * floor_us / us
            );
        }
    }
}
