//! The model side of worker-orcd: architectures described as data, model
//! files converted between quantization schemes, synthetic models of real
//! shapes; the forward pass and generation build on these.

pub mod backend;
pub mod constraint;
pub mod convert;
pub mod cpu;
pub mod generate;
pub mod kv;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod spec;
pub mod stop;
pub mod synth;
pub mod weights;

/// Errors of model-level operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    #[error("tensor {}: {reason}", gguf::shown(name))]
    Tensor { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the prompt has {prompt_tokens} tokens but the context holds {context}; shorten it or raise --ctx-size")]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },
    #[error("the KV cache is full: {needed} more pages needed, {free} free")]
    KvPoolExhausted { needed: usize, free: usize },
    #[error("cannot allocate the KV cache for {positions} positions (out of memory)")]
    KvAllocation { positions: usize },
    #[error("context is full: {needed} positions needed, the cache holds {capacity}")]
    ContextFull { needed: usize, capacity: usize },
}
