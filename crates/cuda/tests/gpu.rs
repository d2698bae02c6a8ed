//! Tests that need an NVIDIA GPU. They are `#[ignore]`d, so `cargo test`
//! skips them; on a GPU machine run them with
//! `cargo test -p cuda --release -- --include-ignored --test-threads=1`, or
//! run the built test binary through `scripts/gpu-check.sh`. Asked for, they
//! fail loudly when there is no GPU.
//!
//! The model tests read every `*.gguf` in `$WORKER_ORCD_MODELS` (default
//! `~/.cache/worker-orcd/models`): the real SmolLM2 and Gemma 3 files on a
//! developer's machine, synthetic ones (`worker-orcd synth`) elsewhere.
//! Lines starting with `gpu-check:` are the summary that gpu-check.sh prints.

use std::path::PathBuf;

use cuda::cudarc::driver::CudaStream;
use cuda::{CudaDevice, CudaError, Dequantizer, DeviceOptions, UploadOptions, DEQUANTIZE_TYPES};
use gguf::{GgmlType, GgufFile};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn open_device() -> CudaDevice {
    CudaDevice::open(&DeviceOptions::default())
        .unwrap_or_else(|e| panic!("this test needs an NVIDIA GPU and its driver: {e}"))
}

/// Poison for outputs, so that an unwritten value shows: f16 85.3125 / bf16 1.47e13.
const POISON: u16 = 0x5555;

fn f16_is_nan(bits: u16) -> bool {
    bits & 0x7c00 == 0x7c00 && bits & 0x03ff != 0
}

fn bf16_is_nan(bits: u16) -> bool {
    bits & 0x7f80 == 0x7f80 && bits & 0x007f != 0
}

/// Compares bit patterns; a NaN matches any NaN (the CPU and the GPU make
/// different NaNs out of arithmetic on NaN or infinite scales: x86 returns
/// the operand's or a negative default NaN, the GPU a canonical one).
/// Returns the number of NaNs.
fn assert_same_bits(what: &str, gpu: &[u16], cpu: &[u16], is_nan: fn(u16) -> bool) -> usize {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let mut nans = 0;
    let mut mismatches = Vec::new();
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if is_nan(c) && is_nan(g) {
            nans += 1;
        } else if g != c {
            mismatches.push(format!("value {i}: GPU {g:#06x}, CPU {c:#06x}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {} values differ; first: {}",
        mismatches.len(),
        cpu.len(),
        mismatches
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    nans
}

fn cpu_f16(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<u16> {
    let mut out = vec![f16::ZERO; n];
    quant::dequantize_f16(ty, bytes, &mut out).unwrap();
    out.iter().map(|h| h.to_bits()).collect()
}

fn cpu_bf16(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<u16> {
    let mut out = vec![0f32; n];
    quant::dequantize(ty, bytes, &mut out).unwrap();
    out.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// Dequantizes `src` (on the device) to f16 and to bf16 on the GPU, into
/// poisoned buffers offset by `offset` values (1 = not 16-byte aligned).
fn gpu_both(
    stream: &std::sync::Arc<CudaStream>,
    dequantizer: &Dequantizer,
    ty: GgmlType,
    src: &cuda::cudarc::driver::CudaView<'_, u8>,
    n: usize,
    offset: usize,
) -> (Vec<u16>, Vec<u16>) {
    let poison = vec![POISON; n + offset];
    let mut out_f16 = stream.clone_htod(&poison).unwrap();
    let mut out_bf16 = stream.clone_htod(&poison).unwrap();
    {
        // SAFETY (transmute): u16 and f16/bf16 have the same size and any bits are valid.
        let mut view = unsafe { out_f16.transmute_mut::<f16>(n + offset) }.unwrap();
        let mut dst = view.slice_mut(offset..offset + n);
        dequantizer
            .dequantize_f16(stream, ty, src, &mut dst)
            .unwrap();
        let mut view = unsafe { out_bf16.transmute_mut::<bf16>(n + offset) }.unwrap();
        let mut dst = view.slice_mut(offset..offset + n);
        dequantizer
            .dequantize_bf16(stream, ty, src, &mut dst)
            .unwrap();
    }
    let f16_bits = stream.clone_dtoh(&out_f16).unwrap();
    let bf16_bits = stream.clone_dtoh(&out_bf16).unwrap();
    stream.synchronize().unwrap();
    assert!(
        f16_bits[..offset]
            .iter()
            .chain(&bf16_bits[..offset])
            .all(|&b| b == POISON),
        "{ty}: wrote before its output"
    );
    (f16_bits[offset..].to_vec(), bf16_bits[offset..].to_vec())
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn device_opens_and_reports_itself() {
    let device = open_device();
    let memory = device.memory().unwrap();
    let toolkit = cuda::toolkit().unwrap();
    println!(
        "gpu-check: GPU {} {} (compute {}.{}, {}), {:.0} of {:.0} MiB free, NVRTC {}.{} headers {}",
        device.index(),
        device.name(),
        device.compute_capability().0,
        device.compute_capability().1,
        device.arch(),
        memory.free as f64 / 1048576.0,
        memory.total as f64 / 1048576.0,
        toolkit.nvrtc_version.0,
        toolkit.nvrtc_version.1,
        toolkit.include_dir.display()
    );
    assert!(memory.free > 0 && memory.free <= memory.total);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dequantize_random_blocks_bit_exact() {
    let device = open_device();
    let dequantizer = Dequantizer::new(&device).unwrap();
    let stream = device.stream();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b65726e656c73);
    let mut summary = Vec::new();
    for &ty in DEQUANTIZE_TYPES.iter() {
        // Random bytes: every bit pattern of quants and scales, subnormal,
        // infinite and NaN scales included. Float types get a length that is
        // not a multiple of 8 (the kernels' tail).
        let n = if ty.block_size() == 1 {
            8 * 1000 + 5
        } else {
            777 * ty.block_size()
        };
        let bytes: Vec<u8> = (0..n / ty.block_size() * ty.type_size())
            .map(|_| rng.gen())
            .collect();
        let src = stream.clone_htod(&bytes).unwrap();
        let want_f16 = cpu_f16(ty, &bytes, n);
        let want_bf16 = cpu_bf16(ty, &bytes, n);
        let mut nans = 0;
        for offset in [0, 1] {
            let (got_f16, got_bf16) = gpu_both(stream, &dequantizer, ty, &src.as_view(), n, offset);
            nans += assert_same_bits(
                &format!("{ty} -> f16 (offset {offset})"),
                &got_f16,
                &want_f16,
                f16_is_nan,
            );
            nans += assert_same_bits(
                &format!("{ty} -> bf16 (offset {offset})"),
                &got_bf16,
                &want_bf16,
                bf16_is_nan,
            );
        }
        summary.push(format!("{ty} ({n} values, {nans} NaN)"));
    }
    println!(
        "gpu-check: dequantize random blocks bit-exact to f16 and bf16: {}",
        summary.join(", ")
    );
}

fn model_files() -> Vec<PathBuf> {
    let dir = std::env::var_os("WORKER_ORCD_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/worker-orcd/models")
        });
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "no model directory {} ({e}); set WORKER_ORCD_MODELS",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.gguf in {}; set WORKER_ORCD_MODELS",
        dir.display()
    );
    files
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn model_tensors_upload_and_dequantize_bit_exact() {
    let device = open_device();
    let dequantizer = Dequantizer::new(&device).unwrap();
    let stream = device.stream();
    for path in model_files() {
        let gguf = GgufFile::open(&path).unwrap();
        let options = UploadOptions {
            progress: false,
            ..Default::default()
        };
        let (weights, report) = cuda::upload_weights(&device, &gguf, &options).unwrap();
        let mut values = 0usize;
        let mut types = std::collections::BTreeMap::<String, usize>::new();
        for (info, tensor) in gguf.tensors().iter().zip(weights.tensors()) {
            assert_eq!(info.name, tensor.name);
            let data = weights.data(tensor);
            let file_bytes = gguf.tensor_data(info);
            let device_bytes = stream.clone_dtoh(&data).unwrap();
            stream.synchronize().unwrap();
            assert!(
                device_bytes == file_bytes,
                "{}: {}: uploaded bytes differ from the file",
                path.display(),
                info.name
            );
            if !quant::can_dequantize(info.ty) {
                continue;
            }
            let n = info.n_elements() as usize;
            let (got_f16, got_bf16) = gpu_both(stream, &dequantizer, info.ty, &data, n, 0);
            let what = format!("{}: {} ({})", path.display(), info.name, info.ty);
            assert_same_bits(
                &format!("{what} -> f16"),
                &got_f16,
                &cpu_f16(info.ty, file_bytes, n),
                f16_is_nan,
            );
            assert_same_bits(
                &format!("{what} -> bf16"),
                &got_bf16,
                &cpu_bf16(info.ty, file_bytes, n),
                bf16_is_nan,
            );
            values += n;
            *types.entry(info.ty.to_string()).or_default() += 1;
        }
        let types: Vec<String> = types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        println!(
            "gpu-check: {}: {} tensors uploaded intact, {values} values bit-exact to f16 and bf16 ({}); {report}",
            path.file_name().unwrap().to_string_lossy(),
            weights.tensors().len(),
            types.join(", ")
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn upload_speed() {
    let device = open_device();
    for path in model_files() {
        let mut rates = Vec::new();
        let mut bytes = 0;
        for _ in 0..3 {
            // Opened afresh each time, as a new process would: the mapping starts cold.
            let gguf = GgufFile::open(&path).unwrap();
            let (weights, report) =
                cuda::upload_weights(&device, &gguf, &UploadOptions::default()).unwrap();
            rates.push(report.gigabytes_per_second());
            bytes = report.tensor_bytes;
            drop(weights);
            device.synchronize().unwrap();
        }
        let first = rates[0];
        rates.sort_by(f64::total_cmp);
        println!(
            "gpu-check: upload {}: {:.1} MiB, {:.2} GB/s median of 3 ({:.2}..{:.2}, first {:.2})",
            path.file_name().unwrap().to_string_lossy(),
            bytes as f64 / 1048576.0,
            rates[1],
            rates[0],
            rates[2],
            first
        );
    }
}

/// Staging layouts compared on the largest model file, each upload from a
/// freshly opened file (as a new process would see it: page cache warm,
/// mapping cold).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn upload_staging_sweep() {
    let device = open_device();
    let path = largest_model();
    for (buffers, mib, write_combined) in [
        (2, 64, true),
        (2, 16, true),
        (4, 8, true),
        (4, 4, true),
        (8, 2, true),
        (4, 8, false),
        (2, 16, false),
    ] {
        let options = UploadOptions {
            staging_buffers: buffers,
            staging_bytes: mib << 20,
            write_combined,
            progress: false,
            ..Default::default()
        };
        let mut reports = Vec::new();
        for _ in 0..3 {
            let gguf = GgufFile::open(&path).unwrap();
            let (weights, report) = cuda::upload_weights(&device, &gguf, &options).unwrap();
            drop(weights);
            reports.push(report);
        }
        reports.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        let r = &reports[1];
        println!(
            "gpu-check: staging {buffers} x {mib:>2} MiB {}: {:.2} GB/s median of 3 (total {:.1} ms = staging {:.1} + fill {:.1} + wait {:.1} + rest)",
            if write_combined { "write-combined" } else { "plain pinned  " },
            r.gigabytes_per_second(),
            r.seconds * 1e3,
            r.staging_seconds * 1e3,
            r.fill_seconds * 1e3,
            r.wait_seconds * 1e3
        );
    }
}

fn largest_model() -> PathBuf {
    model_files()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dequantize_speed() {
    let device = open_device();
    let dequantizer = Dequantizer::new(&device).unwrap();
    let stream = device.stream();
    // The largest file: the one the `--weights f16` load path would convert.
    let path = model_files()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    let options = UploadOptions {
        progress: false,
        ..Default::default()
    };
    let (weights, _) = cuda::upload_weights(&device, &gguf, &options).unwrap();
    let tensors: Vec<_> = weights
        .tensors()
        .iter()
        .filter(|t| quant::can_dequantize(t.ty))
        .collect();
    let values: usize = tensors
        .iter()
        .map(|t| t.dims.iter().product::<u64>() as usize)
        .sum();
    let mut outputs: Vec<_> = tensors
        .iter()
        .map(|t| {
            stream
                .alloc_zeros::<f16>(t.dims.iter().product::<u64>() as usize)
                .unwrap()
        })
        .collect();
    let mut round = || {
        for (tensor, out) in tensors.iter().zip(outputs.iter_mut()) {
            dequantizer
                .dequantize_f16(
                    stream,
                    tensor.ty,
                    &weights.data(tensor),
                    &mut out.as_view_mut(),
                )
                .unwrap();
        }
        stream.synchronize().unwrap();
    };
    round();
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        round();
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let bytes = (values * 2) as f64 + gguf.tensor_bytes_total() as f64;
    println!(
        "gpu-check: dequantize {} to f16: {} tensors, {values} values in {:.3} ms (median of 5, {} launches), {:.0} GB/s read+written",
        path.file_name().unwrap().to_string_lossy(),
        tensors.len(),
        times[2] * 1e3,
        tensors.len(),
        bytes / times[2] / 1e9
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn upload_fails_fast_when_memory_is_short() {
    let device = open_device();
    let path = &model_files()[0];
    let gguf = GgufFile::open(path).unwrap();
    let total = device.memory().unwrap().total;
    let options = UploadOptions {
        kv_cache_bytes: total,
        progress: false,
        ..Default::default()
    };
    let error = cuda::upload_weights(&device, &gguf, &options)
        .err()
        .expect("a KV cache as large as the GPU cannot fit");
    assert!(matches!(error, CudaError::OutOfMemory { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("free") && message.contains("need"),
        "{message}"
    );
    println!("gpu-check: out-of-memory check: {message}");
}
