use std::path::PathBuf;

/// Longest piece of a file-supplied string that an error message quotes.
pub const SHOWN_BYTES: usize = 200;

/// A string from a file (a key, a tensor name, a token) as error messages
/// quote it: control characters and other unprintable ones escaped, and
/// anything past [`SHOWN_BYTES`] bytes cut off with "…", so that a hostile
/// file can neither flood a log nor write terminal escapes into it.
pub fn shown(s: &str) -> String {
    shown_bounded(s, SHOWN_BYTES)
}

/// [`shown`] with another length limit, for longer texts that may quote
/// file strings (a template error with its source line).
pub fn shown_bounded(s: &str, limit: usize) -> String {
    let mut out = String::with_capacity(s.len().min(limit) + 3);
    for (i, c) in s.char_indices() {
        let plain = !c.is_control()
            && c != '\\'
            && !matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{feff}');
        let piece: String = if plain {
            c.to_string()
        } else {
            c.escape_default().collect()
        };
        if out.len() + piece.len() > limit {
            debug_assert!(i < s.len());
            out.push('…');
            return out;
        }
        out.push_str(&piece);
    }
    out
}

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
    #[error(
        "{} at offset {offset}: needs {needed} bytes but the file ends at {file_len}",
        shown(field)
    )]
    Truncated {
        field: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{} at offset {offset}: {}", shown(field), shown_long(reason))]
    Invalid {
        field: String,
        offset: u64,
        reason: String,
    },
    #[error("tensor {}: {}", shown(name), shown_long(reason))]
    Tensor { name: String, reason: String },
    #[error("metadata key {} is missing", shown(key))]
    MissingKey { key: String },
    #[error("metadata key {}: expected {expected}, found {found}", shown(key))]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("cannot write GGUF: {0}")]
    Write(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// A reason that may quote file strings: printable, and at most a few of
/// [`SHOWN_BYTES`] long.
fn shown_long(s: &str) -> String {
    shown_bounded(s, 4 * SHOWN_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_escapes_and_truncates() {
        assert_eq!(shown("blk.0.attn_q.weight"), "blk.0.attn_q.weight");
        assert_eq!(shown("a\0b\x1b[31mc\n"), "a\\u{0}b\\u{1b}[31mc\\n");
        assert_eq!(shown("é✓"), "é✓");
        let long = "x".repeat(300_000);
        let s = shown(&long);
        assert_eq!(s.len(), SHOWN_BYTES + '…'.len_utf8());
        // Never cut inside a character.
        let s = shown(&"é".repeat(150));
        assert!(s.ends_with('…') && s.len() <= SHOWN_BYTES + 3, "{s}");
    }
}
