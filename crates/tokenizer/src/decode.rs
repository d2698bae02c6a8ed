//! Token ids back to text, whole (`decode`) or as a stream that never splits
//! a UTF-8 character.

use crate::vocab::{attr, Tokenizer};

impl Tokenizer {
    /// The bytes token `id` stands for (llama.cpp's `llama_token_to_piece`
    /// without lstrip). Control and unknown tokens are empty unless
    /// `special`. A byte token is one byte, possibly half a character, hence
    /// bytes rather than text. Ids outside the vocabulary (a model's output
    /// layer may have more rows than the vocabulary has tokens) are empty.
    pub fn token_to_piece(&self, id: u32, special: bool) -> &[u8] {
        let Some(&a) = self.attrs.get(id as usize) else {
            return &[];
        };
        if !special && a & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return &[];
        }
        &self.pieces[id as usize]
    }

    /// The text of `ids` (llama.cpp's `llama_detokenize` with
    /// `remove_special = false`, `unparse_special = special`): the pieces
    /// concatenated, the first token's leading space dropped when the
    /// vocabulary adds one while encoding, and, for the BPE vocabularies that
    /// ask for it, spaces before `?!.,` and some contractions removed.
    /// Invalid UTF-8 (an incomplete byte sequence) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut text = Vec::with_capacity(ids.len() * 4);
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let mut piece = self.token_to_piece(id, special);
            if remove_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            remove_space = false;
            text.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_up_spaces(&mut text);
        }
        match String::from_utf8(text) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// llama.cpp's three clean-up passes over detokenized bytes, in place and
/// index for index like the original, so that its corner cases agree.
fn clean_up_spaces(text: &mut Vec<u8>) {
    // First pass: " ?", " !", " .", " ," lose the space.
    let len = text.len();
    let mut total = usize::from(len > 0);
    for i in 1..len {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);

    // Second pass: a lone apostrophe between spaces loses both spaces.
    let len = text.len();
    let mut total = usize::from(len > 0);
    let mut i = 1;
    while i < len {
        let x = text[i];
        if x == b'\'' && i + 1 < len && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    text.truncate(total);

    // Third pass: " 's", " 'm", " 're", " 've" lose the space.
    let len = text.len();
    let mut total = usize::from(len > 0);
    for i in 1..len {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < len {
            let x1 = text[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < len {
                let x2 = text[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

/// Turns generated token ids into text as they arrive, emitting only whole
/// UTF-8 characters: a character split across byte tokens is held back
/// until its last byte arrives.
///
/// The chunks concatenate to the pieces of the tokens
/// ([`Tokenizer::token_to_piece`]); unlike [`Tokenizer::decode`] there is no
/// clean-up of spaces, which would need to see text not yet generated.
/// Bytes that can never form a character become U+FFFD.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    special: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder that renders control tokens as their text when `special`.
    pub fn new(special: bool) -> Self {
        StreamDecoder {
            special,
            pending: Vec::new(),
        }
    }

    /// Add one token; returns the text that is now complete, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        self.pending
            .extend_from_slice(tokenizer.token_to_piece(id, self.special));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Text still held back, with an unfinished character as U+FFFD; the
    /// decoder is empty afterwards.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_up_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn clean_up_matches_llama_cpp_rules() {
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it ' s"), "it's");
        assert_eq!(
            clean("I 'm you 're we 've he 'd don 't"),
            "I'm you're we've he 'd don 't"
        );
        assert_eq!(clean(""), "");
        assert_eq!(clean(" ."), ".");
    }
}
