use std::path::PathBuf;

/// Everything that can be wrong with a GGUF file or a request about one.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: the first four bytes are {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} (this reader supports versions 2 and 3{hint})")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error("{field} at offset {offset}: needs {needed} bytes but the file ends at {file_len}")]
    Truncated {
        field: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{field} at offset {offset}: {reason}")]
    Invalid {
        field: String,
        offset: u64,
        reason: String,
    },
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("metadata key {key} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("cannot write GGUF: {0}")]
    Write(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
