//! Tokenizers and chat templates read from GGUF metadata, matching llama.cpp.
//!
//! A GGUF file carries its own tokenizer: the vocabulary, the BPE merges or
//! SentencePiece scores, the token types, which special tokens to add, and a
//! Jinja chat template. This crate turns that metadata into a [`Tokenizer`]
//! and a [`ChatTemplate`] that give the same token ids and the same prompt
//! text as llama.cpp does for the same file, because a model only behaves as
//! trained when it sees exactly the ids it was trained on, and llama.cpp is
//! the reference every GGUF file is checked against. It exists as its own
//! crate so that the engine, the server and the CLI share one implementation
//! and so that it can be tested against llama.cpp on its own.
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the
//! pre-tokenizers that `tokenizer.ggml.pre` names (qwen2, llama-bpe, gpt-2,
//! smollm, default and the others listed in the error for an unknown one),
//! SentencePiece (`llama`) with byte fallback, and Gemma 4's BPE (`gemma4`).
//! WordPiece, Unigram and RWKV vocabularies are rejected with an error.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let file = gguf::GgufFile::open("model.gguf")?;
//! let tokenizer = tokenizer::Tokenizer::from_gguf(file.metadata())?;
//! let template = tokenizer::ChatTemplate::from_gguf(file.metadata())?;
//! let prompt = template.render(&[tokenizer::Message::new("user", "Hi!")], true)?;
//! let ids = tokenizer.encode(&prompt, true, true);
//! let mut stream = tokenizer::StreamDecoder::new(false);
//! for &id in &ids {
//!     if let Some(text) = stream.push(&tokenizer, id) {
//!         print!("{text}");
//!     }
//! }
//! print!("{}", stream.flush());
//! # Ok(()) }
//! ```

mod chat;
mod decode;
mod encode;
mod pretokenize;
mod unicode;
mod unicode_tables;
mod vocab;

pub use chat::{ChatTemplate, Message};
pub use decode::StreamDecoder;
pub use vocab::{Tokenizer, VocabKind};

/// Everything that can go wrong building a tokenizer or rendering a template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required key is missing or has the wrong type.
    #[error(transparent)]
    Metadata(#[from] gguf::GgufError),
    /// The metadata is present but inconsistent or out of range.
    #[error("metadata key {key}: {reason}")]
    Invalid { key: String, reason: String },
    /// A tokenizer model or pre-tokenizer this crate does not implement.
    #[error("unsupported {0}")]
    Unsupported(String),
    /// The chat template does not compile, fails while rendering, or calls
    /// `raise_exception`.
    #[error("chat template: {0}")]
    Template(String),
    /// The file has no chat template and none can be inferred.
    #[error("{0}")]
    NoTemplate(String),
}

impl TokenizerError {
    pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> Self {
        TokenizerError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}
