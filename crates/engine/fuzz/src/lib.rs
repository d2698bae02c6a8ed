//! The whole model load path on untrusted bytes, as the worker runs it:
//! GGUF parse → model spec → CPU model load → tokenizer and chat template
//! from the metadata → encode a short text → one forward step.
//!
//! Every `Err` is expected (a broken model must be refused with a message)
//! and is formatted with `to_string()` so the error text is built too; a
//! panic, abort, hang or an allocation the input cannot justify is a bug.

pub mod mutate;

use std::hint::black_box;
use std::sync::{Arc, Once};

use engine::cpu::{CpuModel, Logits};
use engine::spec::ModelSpec;
use gguf::GgufFile;
use tokenizer::{ChatTemplate, Message, StreamDecoder, Tokenizer};

/// Text encoded on every input (ASCII, digits, punctuation, a newline and
/// non-ASCII, so pre-tokenizers and byte fallback are all exercised).
pub const TEXT: &str = "Hello world! 123 héllo\n";
/// The rendered chat prompt is encoded up to this many bytes.
const MAX_PROMPT_BYTES: usize = 512;

/// How far one input got through the pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reached {
    pub parsed: bool,
    pub spec: bool,
    pub tokenizer: bool,
    pub template: bool,
    pub rendered: bool,
    pub loaded: bool,
    /// Tokens given to the forward step (from the tokenizer when it built).
    pub tokens: Vec<u32>,
    /// The forward step returned logits.
    pub forward: bool,
    /// Every error met on the way, formatted.
    pub errors: Vec<String>,
}

/// One thread for rayon: the fuzzer uses one core, and the forward pass
/// runs its products and attention on the global pool.
pub fn init_single_thread() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(1).build_global();
    });
}

fn err(reached: &mut Reached, stage: &str, e: impl std::fmt::Display) {
    // Error messages are built from file contents: format them.
    reached.errors.push(format!("{stage}: {}", e.to_string()));
}

/// Run the pipeline on `data`. Inputs of odd length use 8-bit activations
/// for the matrix products (as `--activations q8` does), even ones f32.
pub fn run(data: &[u8]) -> Reached {
    let mut r = Reached::default();
    let file = match GgufFile::from_bytes(data.to_vec()) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            err(&mut r, "parse", e);
            return r;
        }
    };
    r.parsed = true;

    match ModelSpec::from_gguf(&file) {
        Ok(spec) => {
            r.spec = true;
            black_box(format!("{spec:?}"));
            black_box((spec.q_dim(), spec.kv_dim()));
            for layer in 0..spec.n_layers.min(8) {
                black_box((spec.is_sliding(layer), spec.rope_theta_for(layer)));
            }
        }
        Err(e) => err(&mut r, "spec", e),
    }

    // Tokenizer and template do not depend on the model loading.
    let meta = file.metadata();
    let mut ids: Vec<u32> = Vec::new();
    match Tokenizer::from_gguf(meta) {
        Ok(tok) => {
            r.tokenizer = true;
            black_box(format!("{tok:?}"));
            black_box((tok.vocab_size(), tok.bos(), tok.eos(), tok.eot(), tok.add_bos()));
            ids = tok.encode(TEXT, true, false);
            match ChatTemplate::from_gguf(meta) {
                Ok(template) => {
                    r.template = true;
                    black_box(format!("{template:?}"));
                    match template.render(&[Message::new("user", "Hi there!")], true) {
                        Ok(prompt) => {
                            r.rendered = true;
                            let mut end = prompt.len().min(MAX_PROMPT_BYTES);
                            while !prompt.is_char_boundary(end) {
                                end -= 1;
                            }
                            let chat_ids = tok.encode(&prompt[..end], true, true);
                            black_box(tok.decode(&chat_ids, true));
                        }
                        Err(e) => err(&mut r, "render", e),
                    }
                }
                Err(e) => err(&mut r, "template", e),
            }
            black_box(tok.decode(&ids, false));
            let mut stream = StreamDecoder::new(true);
            for &id in &ids {
                black_box(stream.push(&tok, id));
                black_box((tok.is_eog(id), tok.is_control(id), tok.token_text(id)));
            }
            black_box(stream.flush());
        }
        Err(e) => err(&mut r, "tokenizer", e),
    }

    let model = match CpuModel::load(file.clone()) {
        Ok(m) => m,
        Err(e) => {
            err(&mut r, "load", e);
            return r;
        }
    };
    r.loaded = true;
    let model = if data.len() % 2 == 1 {
        model.with_activations(quant::Activations::Q8)
    } else {
        model
    };
    let spec = model.spec().clone();

    // One or two tokens: the first two of the encoded text (BOS and the
    // first piece, usually), or token 0 when the tokenizer failed.
    r.tokens = ids.iter().copied().take(2).collect();
    if r.tokens.is_empty() {
        r.tokens.push(0);
    }
    let mut kv = model.new_cache(spec.context_length);
    match model.forward(&mut kv, &r.tokens, Logits::Last) {
        Ok(logits) => {
            assert_eq!(
                logits.len(),
                spec.vocab_size,
                "one row of logits for the last token"
            );
            assert_eq!(kv.len(), r.tokens.len(), "the cache holds every position");
            black_box(logits.iter().fold(0f32, |a, &b| a + b));
            r.forward = true;
        }
        Err(e) => err(&mut r, "forward", e),
    }
    r
}
