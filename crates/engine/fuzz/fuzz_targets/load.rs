//! Arbitrary bytes through the whole model load path: GGUF parse, model
//! spec, CPU model load, tokenizer and chat template, encoding, and one
//! forward step (see `src/lib.rs`). Errors are expected; any panic, abort,
//! hang or allocation past the RSS limit is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    engine_fuzz::init_single_thread();
    std::hint::black_box(engine_fuzz::run(data));
});
