//! Arbitrary bytes through the whole model load path: GGUF parse, model
//! spec, CPU model load, tokenizer and chat template, encoding, and one
//! forward step (see `src/lib.rs`). Errors are expected; any panic, abort,
//! hang or allocation past the RSS limit is a bug.
//!
//! Half of the mutations are structural (`src/mutate.rs`: parse the GGUF
//! file, change one metadata value or tensor, write it back), the rest are
//! libFuzzer's byte-level ones.

#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fuzz_target!(|data: &[u8]| {
    engine_fuzz::init_single_thread();
    std::hint::black_box(engine_fuzz::run(data));
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    if seed % 2 == 0 {
        if let Some(out) = engine_fuzz::mutate::structured(&data[..size], max_size, seed) {
            data[..out.len()].copy_from_slice(&out);
            return out.len();
        }
    }
    libfuzzer_sys::fuzzer_mutate(data, size, max_size)
});
