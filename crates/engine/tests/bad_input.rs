//! Bad models and bad requests are clear errors, never panics: an unknown
//! architecture, a missing tensor, a tensor of the wrong shape, a prompt
//! longer than the context.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;

use engine::convert::FileType;
use engine::cpu::CpuModel;
use engine::generate::{generate_blocking, GenerateParams};
use engine::scheduler::{self, Event, Job, SchedulerConfig};
use engine::synth::{synthesize, Preset, SynthOptions};
use gguf::{GgufFile, GgufWriter, Value};
use tokenizer::Tokenizer;

mod common;
use common::smollm_path;

/// A tiny-llama model re-written through `edit`, which copies (or drops,
/// or reshapes) tensors and may change metadata; then parsed back.
fn tiny_model(edit: impl FnOnce(&GgufFile, &mut GgufWriter<'_>)) -> GgufFile {
    let tokenizer_source = GgufFile::open(smollm_path()).unwrap();
    let base = synthesize(&SynthOptions {
        preset: Preset::by_name("tiny-llama").unwrap(),
        file_type: FileType::Q8_0,
        seed: 1,
        tokenizer_from: &tokenizer_source,
    })
    .unwrap();
    let mut bytes = Vec::new();
    base.write(&mut bytes).unwrap();
    let original = GgufFile::from_bytes(bytes).unwrap();
    let mut out = GgufWriter::with_metadata(original.metadata().clone());
    edit(&original, &mut out);
    let mut bytes = Vec::new();
    out.write(&mut bytes).unwrap();
    GgufFile::from_bytes(bytes).unwrap()
}

fn load_err(file: GgufFile) -> String {
    match CpuModel::load(Arc::new(file)) {
        Ok(_) => panic!("a broken model loaded"),
        Err(e) => e.to_string(),
    }
}

/// Copy every tensor except those `skip` rejects; `reshape` may give a tensor new dims.
fn copy_tensors(
    original: &GgufFile,
    out: &mut GgufWriter<'_>,
    skip: &str,
    reshape: Option<(&str, Vec<u64>)>,
) {
    for t in original.tensors() {
        if t.name == skip {
            continue;
        }
        match &reshape {
            Some((name, dims)) if *name == t.name => {
                let n: u64 = dims.iter().product();
                let bytes = t.ty.row_bytes(n).unwrap() as usize;
                out.add_tensor(t.name.clone(), t.ty, dims, vec![0u8; bytes])
                    .unwrap();
            }
            _ => out
                .add_tensor(
                    t.name.clone(),
                    t.ty,
                    &t.dims,
                    original.tensor_data(t).to_vec(),
                )
                .unwrap(),
        }
    }
}

#[test]
fn unknown_architecture_is_named() {
    let file = tiny_model(|original, out| {
        out.set("general.architecture", Value::String("mamba".into()));
        copy_tensors(original, out, "", None);
    });
    let msg = load_err(file);
    assert!(msg.contains("unsupported architecture \"mamba\""), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let file = tiny_model(|original, out| {
        copy_tensors(original, out, "blk.1.ffn_up.weight", None);
    });
    let msg = load_err(file);
    assert_eq!(msg, "tensor blk.1.ffn_up.weight: missing from the file");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let file = tiny_model(|original, out| {
        copy_tensors(
            original,
            out,
            "",
            Some(("blk.0.ffn_up.weight", vec![256, 736])),
        );
    });
    let msg = load_err(file);
    assert_eq!(
        msg,
        "tensor blk.0.ffn_up.weight: expected 256×768, found 256×736"
    );
}

/// SmolLM2 on the CPU behind a scheduler of 64-position sequences and 8 KV
/// pages, `max_running` at once and `max_queued` waiting.
fn smollm_scheduler(
    max_running: usize,
    max_queued: usize,
) -> (scheduler::SchedulerHandle, std::thread::JoinHandle<()>) {
    smollm_scheduler_with_pages(max_running, max_queued, 8)
}

fn smollm_scheduler_with_pages(
    max_running: usize,
    max_queued: usize,
    kv_pages: usize,
) -> (scheduler::SchedulerHandle, std::thread::JoinHandle<()>) {
    let file = Arc::new(GgufFile::open(smollm_path()).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_gguf(file.metadata()).unwrap());
    let model = Arc::new(CpuModel::load(file).unwrap());
    scheduler::spawn(
        model,
        tokenizer,
        SchedulerConfig {
            context: 64,
            max_running,
            max_queued,
            step_tokens: 64,
            kv_pages,
            prefix_cache: true,
        },
    )
}

#[test]
fn prompt_longer_than_the_context_is_an_error_and_the_scheduler_goes_on() {
    let (handle, _thread) = smollm_scheduler(2, 4);
    let params = GenerateParams {
        max_tokens: 4,
        sampling: Default::default(),
        stop: vec![],
        logprobs: None,
        constraint: None,
    };
    let err = generate_blocking(&handle, vec![1; 100], params.clone(), |_| true).unwrap_err();
    assert!(
        err.to_string().contains("the prompt has 100 tokens"),
        "{err}"
    );

    // The scheduler still serves a prompt that fits, and its pages come
    // back (or stay with its cache, kept for a prompt sharing its prefix).
    let finish = generate_blocking(&handle, vec![1, 504, 3458], params.clone(), |_| true).unwrap();
    assert_eq!(finish.tokens_out, 4);
    let kept = handle
        .stats()
        .kept_pages
        .load(std::sync::atomic::Ordering::Acquire);
    assert_eq!(handle.pool().used_pages(), kept);
    assert_eq!(kept, 1);

    // Bad sampling settings are an error event naming the field.
    let (tx, rx) = mpsc::channel();
    let mut bad = params;
    bad.sampling.top_p = f32::NAN;
    handle
        .submit(Job {
            prompt: vec![1, 2],
            params: bad,
            cancel: Arc::new(AtomicBool::new(false)),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        })
        .unwrap();
    match rx.recv().unwrap() {
        Event::Error { message } => assert!(message.contains("top_p"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_full_queue_refuses_at_once_and_frees_as_jobs_start() {
    let (handle, _thread) = smollm_scheduler(1, 1);
    let params = GenerateParams {
        max_tokens: 40,
        sampling: Default::default(),
        stop: vec![],
        logprobs: None,
        constraint: None,
    };
    let job = |cancel: &Arc<AtomicBool>, tx: mpsc::Sender<Event>| Job {
        prompt: vec![1, 504, 3458],
        params: params.clone(),
        cancel: cancel.clone(),
        sink: Box::new(move |e| tx.send(e).is_ok()),
    };
    // A runs (its Started event says it left the queue); B waits; C is refused.
    let (cancel_a, cancel_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (tx_a, rx_a) = mpsc::channel();
    handle.submit(job(&cancel_a, tx_a)).unwrap();
    assert!(matches!(rx_a.recv().unwrap(), Event::Started { .. }));
    let (tx_b, rx_b) = mpsc::channel();
    handle.submit(job(&cancel_b, tx_b)).unwrap();
    let (tx_c, _rx_c) = mpsc::channel();
    let refused = handle.submit(job(&Arc::new(AtomicBool::new(false)), tx_c));
    assert!(
        matches!(refused, Err(scheduler::SubmitError::QueueFull(1))),
        "a third job while one runs and one waits: {:?}",
        refused.err()
    );
    // Cancelling A lets B start, and the queue takes a job again.
    cancel_a.store(true, std::sync::atomic::Ordering::Release);
    let started = rx_b.iter().find(|e| {
        matches!(
            e,
            Event::Started { .. } | Event::End(_) | Event::Error { .. }
        )
    });
    assert!(
        matches!(started, Some(Event::Started { .. })),
        "{started:?}"
    );
    let (tx_d, _rx_d) = mpsc::channel();
    handle
        .submit(job(&Arc::new(AtomicBool::new(true)), tx_d))
        .unwrap();
    cancel_b.store(true, std::sync::atomic::Ordering::Release);
}

/// Jobs that free slots will take do not count against the queue, even
/// when they arrive all at once, before the scheduler admits any: with 4
/// slots and a queue of 2, six jobs are taken and the seventh is refused;
/// `queued()` counts only the two behind full slots.
#[test]
fn jobs_for_free_slots_do_not_count_against_the_queue() {
    // Pages for four 64-position sequences.
    let (handle, _thread) = smollm_scheduler_with_pages(4, 2, 16);
    let params = GenerateParams {
        max_tokens: 40,
        sampling: Default::default(),
        stop: vec![],
        logprobs: None,
        constraint: None,
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for i in 0..7 {
        let (tx, rx) = mpsc::channel();
        let submitted = handle.submit(Job {
            prompt: vec![1, 504, 3458],
            params: params.clone(),
            cancel: cancel.clone(),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        });
        if i < 6 {
            assert!(submitted.is_ok(), "job {i}: {:?}", submitted.err());
            receivers.push(rx);
        } else {
            assert!(
                matches!(submitted, Err(scheduler::SubmitError::QueueFull(2))),
                "a seventh job: {:?}",
                submitted.err()
            );
        }
    }
    // Four start; two stay queued, and that is what is reported.
    for rx in &receivers[..4] {
        assert!(matches!(rx.recv().unwrap(), Event::Started { .. }));
    }
    assert_eq!(handle.running(), 4);
    assert_eq!(handle.queued(), 2);
    cancel.store(true, std::sync::atomic::Ordering::Release);
}

/// A tiny-llama with metadata key `key` set to `value`.
fn with_metadata(key: &str, value: Value) -> GgufFile {
    tiny_model(|original, out| {
        out.set(key, value);
        copy_tensors(original, out, "", None);
    })
}

#[test]
fn a_huge_block_count_is_refused_before_anything_is_sized_by_it() {
    // 2^28 .. 2^32-1 blocks used to size the layer list first: an abort
    // asking for terabytes. Now every count is checked against the tensors.
    for n in [100u32, 1 << 28, u32::MAX] {
        let msg = load_err(with_metadata("llama.block_count", Value::U32(n)));
        assert_eq!(
            msg,
            format!("model metadata: block_count is {n} but the file has tensors for 2 blocks"),
        );
    }
}

#[test]
fn out_of_range_hyperparameters_are_refused() {
    for (key, value, needle) in [
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(f32::NAN),
            "layer_norm_rms_epsilon is NaN",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(-1e-5),
            "layer_norm_rms_epsilon is -0.00001",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(0.0),
            "layer_norm_rms_epsilon is 0",
        ),
        (
            "llama.rope.freq_base",
            Value::F32(f32::INFINITY),
            "rope.freq_base is inf",
        ),
        (
            "llama.rope.freq_base",
            Value::F32(0.0),
            "rope.freq_base is 0",
        ),
        (
            "llama.rope.freq_base",
            Value::F32(-10_000.0),
            "rope.freq_base is -10000",
        ),
        // Present but malformed is an error, not a silent default.
        (
            "llama.rope.freq_base",
            Value::String("1e4".into()),
            "llama.rope.freq_base: expected number, found string",
        ),
        (
            "llama.attention.head_count_kv",
            Value::F32(2.0),
            "llama.attention.head_count_kv: expected integer",
        ),
        (
            "llama.context_length",
            Value::U32(1),
            "context_length is 1; a model needs at least 2 positions",
        ),
        (
            "llama.attention.key_length",
            Value::U32(33),
            "the head size 33 (attention.key_length",
        ),
        (
            "llama.embedding_length",
            Value::U32(512),
            "embedding_length is 512 but token_embd.weight has rows of 256",
        ),
    ] {
        let msg = load_err(with_metadata(key, value));
        assert!(msg.contains(needle), "{key}: {msg}");
    }
}

#[test]
fn non_finite_norm_and_bias_values_are_refused() {
    for (name, bad) in [
        ("blk.1.attn_norm.weight", f32::NAN),
        ("output_norm.weight", f32::INFINITY),
    ] {
        let file = tiny_model(|original, out| {
            for t in original.tensors() {
                let mut data = original.tensor_data(t).to_vec();
                if t.name == name {
                    assert_eq!(t.ty, gguf::GgmlType::F32);
                    data[12..16].copy_from_slice(&bad.to_le_bytes());
                }
                out.add_tensor(t.name.clone(), t.ty, &t.dims, data).unwrap();
            }
        });
        let msg = load_err(file);
        assert_eq!(
            msg,
            format!("tensor {name}: value 3 is {bad}; the file is corrupt")
        );
    }
}

#[test]
fn a_hostile_architecture_name_is_escaped_and_bounded() {
    let name = "\u{1b}[31m\0".repeat(50_000);
    let msg = load_err(with_metadata("general.architecture", Value::String(name)));
    assert!(msg.len() < 400, "{} bytes", msg.len());
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    assert!(
        msg.starts_with("unsupported architecture \"\\u{1b}[31m\\u{0}"),
        "{msg}"
    );
}

#[test]
fn a_block_index_at_the_edge_of_usize_is_a_clear_error() {
    // Found by the load fuzzer: a tensor named blk.18446744073709551615.…
    // overflowed the block count; a far block must not stand in for the
    // blocks before it either.
    for index in [usize::MAX, 1 << 40, 7] {
        let file = tiny_model(|original, out| {
            out.set("llama.block_count", Value::U32(3));
            copy_tensors(original, out, "", None);
            out.add_tensor(
                format!("blk.{index}.attn_norm.weight"),
                gguf::GgmlType::F32,
                &[256],
                vec![0u8; 1024],
            )
            .unwrap();
        });
        let msg = load_err(file);
        assert_eq!(
            msg, "model metadata: block_count is 3 but the file has no tensors for block 2",
            "{index}"
        );
    }
}
