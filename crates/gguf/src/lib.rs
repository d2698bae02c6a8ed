//! GGUF v2/v3 reading and writing.
//!
//! A GGUF file is untrusted input: every count, string length, offset and
//! tensor size is checked against the file before it is used, so a truncated
//! or hostile file yields a [`GgufError`] naming the field and its offset,
//! never a panic, an out-of-bounds read or a huge allocation.

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{shown, shown_bounded, GgufError, Result, SHOWN_BYTES};
pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT, MAX_DIMS};
pub use types::{GgmlType, QK_K};
pub use value::{Array, Metadata, Value, ValueType};
pub use writer::GgufWriter;
