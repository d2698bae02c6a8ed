//! Code point classes as llama.cpp sees them, and GPT-2's byte-to-character map.
//!
//! The pre-tokenizers split text by Unicode category (`\p{L}`, `\p{N}`, `\s`, …).
//! The answer must be llama.cpp's, whose tables follow a particular Unicode
//! version, so the tables in `unicode_tables.rs` are generated from its
//! `unicode-data.cpp` (see `scripts/ref/gen_unicode_tables.py`).

use std::sync::OnceLock;

use crate::unicode_tables::{CATEGORY_RANGES, LOWERCASE_TO_ASCII, WHITESPACE};

/// The categories and the whitespace property of one code point, with
/// llama.cpp's bit layout (`unicode_cpt_flags`; separator 0x08 and control
/// 0x80 are not tested by any pre-tokenizer here). Zero means "no code point":
/// the splitters use it for positions outside the text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags(u16);

impl Flags {
    pub const UNDEFINED: u16 = 0x0001;
    pub const NUMBER: u16 = 0x0002;
    pub const LETTER: u16 = 0x0004;
    pub const ACCENT_MARK: u16 = 0x0010;
    pub const PUNCTUATION: u16 = 0x0020;
    pub const SYMBOL: u16 = 0x0040;
    const CATEGORIES: u16 = 0x00FF;
    const WHITESPACE: u16 = 0x0100;

    /// Flags of a position outside the text.
    pub const NONE: Flags = Flags(0);

    pub fn is_letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    pub fn is_number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    pub fn is_accent_mark(self) -> bool {
        self.0 & Self::ACCENT_MARK != 0
    }
    pub fn is_whitespace(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
    /// Whether this is a code point at all (llama.cpp's `as_uint() != 0`).
    pub fn is_some(self) -> bool {
        self.0 != 0
    }
    /// The category bits alone (llama.cpp's `category_flag()`).
    pub fn category(self) -> u16 {
        self.0 & Self::CATEGORIES
    }
}

/// Flags of every code point of the Basic Multilingual Plane, built once;
/// code points above it are looked up in the range table.
fn bmp_table() -> &'static [Flags] {
    static TABLE: OnceLock<Vec<Flags>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![Flags(Flags::UNDEFINED); 0x10000];
        for pair in CATEGORY_RANGES.windows(2) {
            let (start, flags) = pair[0];
            let end = pair[1].0.min(0x10000);
            for cp in start..end {
                table[cp as usize] = Flags(flags.into());
            }
        }
        for &cp in &WHITESPACE {
            if cp < 0x10000 {
                table[cp as usize].0 |= Flags::WHITESPACE;
            }
        }
        table
    })
}

/// The flags of code point `cp` (llama.cpp's `unicode_cpt_flags_from_cpt`).
pub(crate) fn flags(cp: u32) -> Flags {
    if cp < 0x10000 {
        return bmp_table()[cp as usize];
    }
    if cp >= 0x110000 {
        return Flags(Flags::UNDEFINED);
    }
    // The last range start <= cp.
    let i = CATEGORY_RANGES.partition_point(|&(start, _)| start <= cp) - 1;
    let mut f = Flags(CATEGORY_RANGES[i].1.into());
    if WHITESPACE.binary_search(&cp).is_ok() {
        f.0 |= Flags::WHITESPACE;
    }
    f
}

/// The lower case of `cp` when it is an ASCII letter, else `cp` unchanged;
/// enough for the case-insensitive contractions (`'S`, `'RE`, …).
pub(crate) fn to_lower_ascii(cp: u32) -> u32 {
    if (b'A' as u32..=b'Z' as u32).contains(&cp) {
        return cp + 32;
    }
    match LOWERCASE_TO_ASCII.binary_search_by_key(&cp, |&(from, _)| from) {
        Ok(i) => LOWERCASE_TO_ASCII[i].1.into(),
        Err(_) => cp,
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable
/// Latin-1 bytes stand for themselves, the other 68 bytes are shifted to
/// U+0100.. in byte order (llama.cpp's `unicode_byte_to_utf8`).
pub(crate) fn byte_to_char_table() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut table = ['\0'; 256];
        let mut shifted = 0;
        for b in 0..256u32 {
            table[b as usize] = if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap()
            };
        }
        table
    })
}

/// The inverse of [`byte_to_char_table`].
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    static SHIFTED: OnceLock<[u8; 68]> = OnceLock::new();
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        0x100..=0x143 => {
            let shifted = SHIFTED.get_or_init(|| {
                let mut inverse = [0u8; 68];
                for (b, &c) in byte_to_char_table().iter().enumerate() {
                    if (c as u32) >= 0x100 {
                        inverse[(c as u32 - 0x100) as usize] = b as u8;
                    }
                }
                inverse
            });
            Some(shifted[(cp - 0x100) as usize])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_follow_llama_cpp() {
        assert!(flags('a' as u32).is_letter());
        assert!(flags('7' as u32).is_number());
        assert!(flags(' ' as u32).is_whitespace());
        assert!(flags('\u{3000}' as u32).is_whitespace());
        assert!(!flags('\u{1C}' as u32).is_whitespace());
        assert!(flags('中' as u32).is_letter());
        assert!(flags('\u{0301}' as u32).is_accent_mark());
        assert!(flags(0x1F600).is_some() && !flags(0x1F600).is_letter());
        assert!(flags(0x20000).is_letter());
        assert_eq!(flags(0x378).category(), Flags::UNDEFINED);
    }

    #[test]
    fn byte_map_round_trips() {
        let table = byte_to_char_table();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(table[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('中'), None);
    }

    #[test]
    fn lower_case_contractions() {
        assert_eq!(to_lower_ascii('S' as u32), 's' as u32);
        assert_eq!(to_lower_ascii('s' as u32), 's' as u32);
        assert_eq!(to_lower_ascii(0x212A), 'k' as u32);
        assert_eq!(to_lower_ascii('É' as u32), 'É' as u32);
    }
}
