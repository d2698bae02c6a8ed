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
    time_launches(device, reps, |_| {
        // SAFETY: x holds w.cols f32, y w.rows.
        unsafe { kernels.matvec(w, x, 1, y, w.rows, false) }.unwrap();
    })
}

/// Time per call of `launch(i)` for i in 0..reps, µs: the launches captured
/// in a CUDA graph, median of 7 replays.
fn time_launches(device: &CudaDevice, reps: usize, launch: impl Fn(usize)) -> f64 {
    let stream = device.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    for i in 0..reps {
        launch(i);
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

/// A `rows × cols` matrix of type `ty` in `copies` device copies (2,048
/// random rows quantized on the CPU, repeated to the matrix's rows: a 7B
/// matrix quantized whole would take the CPU minutes).
fn large_matrix_copies(
    device: &CudaDevice,
    rng: &mut ChaCha8Rng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    copies: impl Fn(usize) -> usize,
) -> (Vec<DeviceBuffer>, Vec<DeviceMatrix>, usize) {
    let sample = rows.min(2_048);
    let values: Vec<f32> = (0..sample * cols)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let block = quant::quantize(ty, &values).unwrap();
    let bytes: Vec<u8> = block
        .iter()
        .copied()
        .cycle()
        .take(block.len() / sample * rows)
        .collect();
    let buffers: Vec<DeviceBuffer> = (0..copies(bytes.len()))
        .map(|_| upload(device, &bytes, "weights"))
        .collect();
    let mats = buffers
        .iter()
        .map(|b| DeviceMatrix {
            ty,
            rows,
            cols,
            row_bytes: bytes.len() / rows,
            ptr: b.ptr(),
        })
        .collect();
    (buffers, mats, bytes.len())
}

/// One `bytes`-sized matrix's copies, enough that cycling through them
/// reads from DRAM rather than the 50 MB L2 (H100/H200).
fn copies_beyond_l2(bytes: usize) -> usize {
    (256usize << 20).div_ceil(bytes).max(2)
}

#[test]
#[ignore = "needs an NVIDIA GPU; a benchmark"]
fn matvec_speed_large() {
    // Qwen2.5-7B's decode products in llama.cpp's Q4_K_M mix, one and four
    // decode rows, each launch on another copy of the matrices so that the
    // weights come from DRAM as in a real step.
    let device = open_device();
    let mut kernels = Kernels::load(&device).unwrap();
    let peak = device.peak_bandwidth().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!(
        "gpu-check: matvec speed, Qwen2.5-7B shapes from DRAM (copies beyond L2), CUDA-graph replay; peak {:.2} TB/s",
        peak / 1e12
    );
    let cases: [(&str, GgmlType, usize, usize, bool); 5] = [
        ("gate+up", GgmlType::Q4_K, 18_944, 3_584, true),
        ("down", GgmlType::Q6_K, 3_584, 18_944, false),
        ("down", GgmlType::Q4_K, 3_584, 18_944, false),
        ("attn_output", GgmlType::Q4_K, 3_584, 3_584, false),
        ("lm_head", GgmlType::Q6_K, 152_064, 3_584, false),
    ];
    for (name, ty, rows, cols, gated) in cases {
        let mats_per = if gated { 2 } else { 1 };
        let (_buffers, mats, bytes) = large_matrix_copies(&device, &mut rng, ty, rows, cols, |b| {
            copies_beyond_l2(b * mats_per) * mats_per
        });
        let copies = mats.len();
        for (n, persist) in [(1usize, 0u32), (1, 4), (1, 8), (4, 0)] {
            kernels.set_matvec_persist(persist, 0);
            let kernels = &kernels;
            let x = upload(&device, &vec![0.25f32; n * cols], "x");
            let y = DeviceBuffer::new(&device, 4 * n * rows, "y").unwrap();
            let sets = copies / mats_per;
            let reps = sets * (1 + 40 / sets);
            let us = time_launches(&device, reps, |i| {
                let k = (i % sets) * mats_per;
                // SAFETY: x holds n × cols f32, y n × rows.
                unsafe {
                    if gated {
                        kernels.matvec_gated(
                            &mats[k],
                            &mats[k + 1],
                            x.ptr(),
                            n,
                            None,
                            y.ptr(),
                            false,
                        )
                    } else {
                        kernels.matvec(&mats[k], x.ptr(), n, y.ptr(), rows, false)
                    }
                }
                .unwrap();
            });
            let read = (bytes * mats_per) as f64;
            println!(
                "gpu-check:   {name:<11} {:<5} {rows:>6}×{cols:<6} n={n} persist {persist} {:7.1} MiB {us:8.2} µs = {:6.0} GB/s, {:4.1}% of peak",
                ty.to_string(),
                read / (1 << 20) as f64,
                read / us / 1e3,
                100.0 * read / us * 1e6 / peak
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matvec_persistent_grid_matches_cpu() {
    // A persistent grid of one block an SM: every block loops over many row
    // groups (short rows a warp each; long rows a block each), its next
    // group's rows copied while it computes the current one.
    let device = open_device();
    let mut kernels = Kernels::load(&device).unwrap();
    kernels.set_matvec_persist(1, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (rows, cols) in [(2_000usize, 512usize), (600, 2_304)] {
        for ty in weight_types().filter(|t| t.block_size() > 1) {
            let (w, _b, values) = matrix(&device, &mut rng, ty, rows, cols);
            let (up, _ub, up_values) = matrix(&device, &mut rng, ty, rows, cols);
            let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let x_dev = upload(&device, &x, "x");
            let y = upload(&device, &vec![0.5f32; rows], "y");
            // SAFETY: x holds cols f32, y rows.
            unsafe { kernels.matvec(&w, x_dev.ptr(), 1, y.ptr(), rows, false) }.unwrap();
            device.synchronize().unwrap();
            let cpu = product(&values, cols, &x).concat();
            let err = rel_l2(&download(&y, rows), &cpu);
            assert!(
                err < 1e-5,
                "{ty} {rows}×{cols} persistent: rel-L2 {err:.2e}"
            );
            // SAFETY: as above.
            unsafe { kernels.matvec_gated(&w, &up, x_dev.ptr(), 1, None, y.ptr(), false) }.unwrap();
            device.synchronize().unwrap();
            let u = product(&up_values, cols, &x).concat();
            let cpu: Vec<f64> = cpu
                .iter()
                .zip(&u)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let err = rel_l2(&download(&y, rows), &cpu);
            assert!(
                err < 1e-5,
                "{ty} gated {rows}×{cols} persistent: rel-L2 {err:.2e}"
            );
        }
        println!("gpu-check: matvec, persistent grid (one block an SM), every block format, {rows}×{cols}: plain and gated within 1e-5 of the CPU");
    }
}

/// `n` rows of x rounded to f16, as f32 (what the tensor-core product reads).
fn f16_rounded(x: &[f32]) -> (Vec<half::f16>, Vec<f32>) {
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let back = h.iter().map(|v| v.to_f32()).collect();
    (h, back)
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matmul_q_every_format_matches_cpu() {
    // The tensor-core product of a few rows: short rows in one block column,
    // long ones split over several (partial sums reduced), token counts on
    // both sides of its 8-token tiles, accumulate on and off.
    let device = open_device();
    let mut kernels = Kernels::load(&device).unwrap();
    kernels.set_matmul_q(true);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let partial = DeviceBuffer::new(&device, 64 << 20, "partial").unwrap();
    for (rows, cols) in [(200usize, 512usize), (72, 4_608), (1_000, 896)] {
        for ty in weight_types().filter(|t| t.block_size() > 1) {
            if cols % ty.block_size() != 0 {
                continue;
            }
            let (w, _b, values) = matrix(&device, &mut rng, ty, rows, cols);
            for n in [1usize, 3, 8, 17, 64] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let (xh, xr) = f16_rounded(&x);
                let x_dev = upload(&device, &xh, "x");
                for accumulate in [false, true] {
                    let y = upload(&device, &vec![0.5f32; n * rows], "y");
                    // SAFETY: x holds n × cols f16, y n × rows f32, partial 64 MiB.
                    let ran = unsafe {
                        kernels.matmul_q(
                            &w,
                            x_dev.ptr(),
                            n,
                            y.ptr(),
                            rows,
                            accumulate,
                            partial.ptr(),
                            64 << 20,
                        )
                    }
                    .unwrap();
                    assert!(ran, "{ty} {rows}×{cols}: matmul_q did not take it");
                    device.synchronize().unwrap();
                    // The weights rounded to f16 as the kernel rounds them.
                    let wr: Vec<f32> = values
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_f32())
                        .collect();
                    let mut cpu = product(&wr, cols, &xr).concat();
                    if accumulate {
                        cpu.iter_mut().for_each(|c| *c += 0.5);
                    }
                    let err = rel_l2(&download(&y, n * rows), &cpu);
                    // f32 sums of exact f16 products, in the tensor cores' order.
                    assert!(
                        err < 1e-4,
                        "{ty} {rows}×{cols}, {n} rows, accumulate {accumulate}: rel-L2 {err:.2e}"
                    );
                }
            }
        }
        println!("gpu-check: matmul_q, every block format, {rows}×{cols}, 1 to 64 rows: within 1e-4 of the CPU on the f16-rounded operands");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; a benchmark"]
fn matmul_q_speed_large() {
    // Qwen2.5-7B's products for 16 and 64 rows (the multi-sequence decode
    // step), weights from DRAM, beside the cuBLAS path's f16 conversion alone.
    let device = open_device();
    let mut kernels = Kernels::load(&device).unwrap();
    kernels.set_matmul_q(true);
    let peak = device.peak_bandwidth().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let partial = DeviceBuffer::new(&device, 64 << 20, "partial").unwrap();
    println!(
        "gpu-check: matmul_q speed, Qwen2.5-7B shapes from DRAM; peak {:.2} TB/s",
        peak / 1e12
    );
    for (name, ty, rows, cols) in [
        ("gate", GgmlType::Q4_K, 18_944usize, 3_584usize),
        ("down", GgmlType::Q6_K, 3_584, 18_944),
        ("attn_q", GgmlType::Q4_K, 3_584, 3_584),
        ("attn_k", GgmlType::Q4_K, 512, 3_584),
    ] {
        let (_buffers, mats, bytes) =
            large_matrix_copies(&device, &mut rng, ty, rows, cols, copies_beyond_l2);
        let copies = mats.len();
        let f16_out = DeviceBuffer::new(&device, 2 * rows * cols, "f16").unwrap();
        for n in [16usize, 64] {
            let xh: Vec<half::f16> = (0..n * cols).map(|_| half::f16::from_f32(0.25)).collect();
            let x = upload(&device, &xh, "x");
            let y = DeviceBuffer::new(&device, 4 * n * rows, "y").unwrap();
            let reps = copies * (1 + 20 / copies);
            let us = time_launches(&device, reps, |i| {
                // SAFETY: x holds n × cols f16, y n × rows, partial 64 MiB.
                unsafe {
                    kernels.matmul_q(
                        &mats[i % copies],
                        x.ptr(),
                        n,
                        y.ptr(),
                        rows,
                        false,
                        partial.ptr(),
                        64 << 20,
                    )
                }
                .unwrap();
            });
            let read = bytes as f64;
            println!(
                "gpu-check:   {name:<7} {:<5} {rows:>6}×{cols:<6} n={n:<3} {us:8.2} µs = {:6.0} GB/s of weights, {:4.1}% of peak",
                ty.to_string(),
                read / us / 1e3,
                100.0 * read / us * 1e6 / peak
            );
        }
        let us = time_launches(&device, copies * (1 + 20 / copies), |i| {
            // SAFETY: f16_out holds rows × cols f16.
            assert!(
                unsafe { kernels.rows_to_f16(&mats[i % copies], 0, rows, f16_out.ptr()) }.unwrap()
            );
        });
        println!(
            "gpu-check:   {name:<7} rows_to_f16 alone (the cuBLAS path's conversion): {us:8.2} µs"
        );
    }
}
