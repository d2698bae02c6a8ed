//! Pre-tokenizers: how byte-level BPE cuts text into words before merging.
//!
//! `tokenizer.ggml.pre` names the scheme. Each is a list of steps applied in
//! turn, every step cutting the pieces the previous one produced, as in
//! llama.cpp (`llm_tokenizer_bpe` and `unicode_regex_split`). The common
//! patterns (GPT-2, Llama 3, Qwen2) are hand-written scanners that mirror
//! llama.cpp's own, quirks included; the rest are regular expressions run the
//! way llama.cpp runs them: on a "collapsed" copy of the text where every
//! non-ASCII code point is replaced by one byte naming its category, so that a
//! byte regex sees the same classes llama.cpp's `std::regex` sees.

use std::ops::Range;

use crate::unicode::{self, Flags};
use crate::TokenizerError;

/// One splitting step.
#[derive(Debug)]
enum Step {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// Llama 3's pattern with `\p{N}` for `\p{N}{1,3}`.
    Qwen2,
    /// Qwen2's pattern with `[\p{L}\p{M}]+` for letter runs.
    Qwen35,
    /// `[^\n]+|[\n]+`
    Newlines,
    /// A pattern over the collapsed text (see the module doc).
    Collapsed(regex::bytes::Regex),
    /// A pattern without categories, over the code points themselves.
    Wide(regex::Regex),
}

/// The pre-tokenizer of one vocabulary, with the llama.cpp flags that come
/// with its name.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    steps: Vec<Step>,
    /// Whether words are mapped through GPT-2's byte-to-character table
    /// before merging (false for SentencePiece-style BPE such as Gemma 4).
    pub byte_encode: bool,
    /// Whether decoding applies llama.cpp's clean-up of spaces before
    /// punctuation (`clean_up_tokenization_spaces`).
    pub clean_spaces: bool,
    /// Whether a word that is itself a token skips merging (Llama 3).
    pub ignore_merges: bool,
    /// Whether spaces are written as U+2581 before merging and after decoding.
    pub escape_whitespaces: bool,
    /// The default for `add_bos` when the metadata does not say.
    pub add_bos: bool,
    /// Gemma 4: a word of newlines that is a token is taken whole.
    pub newline_words_whole: bool,
}

/// The byte standing for each category in the collapsed text, and the ASCII
/// members of the category written as regex class items (llama.cpp's
/// `k_ucat_cpt` and `k_ucat_map`).
const CATEGORY_CODES: [(&str, u16, u8, &str); 5] = [
    ("N", Flags::NUMBER, 0xD1, "0-9"),
    ("L", Flags::LETTER, 0xD2, "A-Za-z"),
    ("P", Flags::PUNCTUATION, 0xD3, r"!-#%-*,-/:-;?-@\[-\]_\{\}"),
    ("M", Flags::ACCENT_MARK, 0xD4, ""),
    ("S", Flags::SYMBOL, 0xD5, r"\$\+<->\^`\|\~"),
];

/// Byte for a non-ASCII code point that is no whitespace and in no listed category.
const COLLAPSED_OTHER: u8 = 0xD0;
/// Byte for non-ASCII whitespace, which `\s` of a byte regex then matches.
const COLLAPSED_SPACE: u8 = 0x0B;

/// Rewrite `\p{X}` in `pattern` for the collapsed text: `[\xD1 0-9]`, or its
/// items alone inside a bracket expression.
fn collapse_pattern(pattern: &str) -> String {
    let mut out = String::from("(?-u)");
    let mut inside = false;
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix(r"\p{") {
            if let Some(close) = after.find('}') {
                let name = &after[..close];
                if let Some(&(_, _, code, ascii)) = CATEGORY_CODES.iter().find(|(n, ..)| *n == name)
                {
                    let items = format!(r"\x{code:02X}{ascii}");
                    if inside {
                        out.push_str(&items);
                    } else {
                        out.push('[');
                        out.push_str(&items);
                        out.push(']');
                    }
                    rest = &after[close + 1..];
                    continue;
                }
            }
        }
        if c == '\\' {
            // Copy an escape whole so that `\[` and `\]` do not open or close a class.
            let len = rest[1..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&rest[..1 + len]);
            rest = &rest[1 + len..];
            continue;
        }
        match c {
            '[' => inside = true,
            ']' => inside = false,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn collapsed(pattern: &str) -> Step {
    let translated = collapse_pattern(pattern);
    Step::Collapsed(regex::bytes::Regex::new(&translated).expect("built-in pre-tokenizer pattern"))
}

fn wide(pattern: &str) -> Step {
    Step::Wide(regex::Regex::new(pattern).expect("built-in pre-tokenizer pattern"))
}

/// DeepSeek's CJK and Hangul runs, `[一-龥ࠀ-一가-퟿]+` in llama.cpp (escaped
/// here because several of these code points change under Unicode normalization).
const CJK_RUNS: &str = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+";

/// DeepSeek LLM's letter runs: an optional space, then letters of the cased scripts.
const DEEPSEEK_LETTERS: &str = concat!(
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}",
    r"\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}",
    r"\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}",
    r"\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}",
    r"\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}",
    r"\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}",
    r"\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}",
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}",
    r"\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}",
    r"\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}",
    r"\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}",
    r"\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}",
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
);

/// The pre-tokenizer names this crate implements, for error messages.
pub(crate) const SUPPORTED: &str = "default, gpt-2, phi-2, mpt, olmo, exaone4, mellum, llama3, llama-v3, llama-bpe, \
     falcon3, falcon-h1, pixtral, midm-2.0, lfm2, dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, stablelm2, qwen35, \
     starcoder, refact, codeshell, exaone, minerva-7b, mellum2, smollm, command-r, falcon, deepseek-coder, \
     deepseek-llm, gemma4";

impl PreTokenizer {
    /// The pre-tokenizer `tokenizer.ggml.pre = name` selects, as llama.cpp
    /// configures it (`llama_vocab::impl::load`).
    pub fn from_name(name: &str) -> Result<Self, TokenizerError> {
        let mut pre = PreTokenizer {
            steps: Vec::new(),
            byte_encode: true,
            clean_spaces: true,
            ignore_merges: false,
            escape_whitespaces: false,
            add_bos: false,
            newline_words_whole: false,
        };
        let starcoder = || vec![collapsed(r"\p{N}"), Step::Gpt2];
        pre.steps = match name {
            "default" => vec![
                collapsed(r"[\p{P}\$\+<=>\^~\|]+"),
                Step::Gpt2,
                collapsed(r"\p{N}+"),
                collapsed("[0-9][0-9][0-9]"),
            ],
            "gpt-2" | "phi-2" | "mpt" | "olmo" | "exaone4" | "mellum" | "gigachat" | "a.x-4.0" => {
                vec![Step::Gpt2]
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => {
                pre.ignore_merges = true;
                pre.add_bos = true;
                vec![Step::Llama3]
            }
            "dbrx" | "smaug-bpe" => vec![Step::Llama3],
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => {
                pre.clean_spaces = false;
                vec![Step::Qwen2]
            }
            "stablelm2" => vec![Step::Qwen2],
            "qwen35" => {
                pre.clean_spaces = false;
                vec![Step::Qwen35]
            }
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                starcoder()
            }
            "smollm" | "command-r" => {
                pre.clean_spaces = false;
                starcoder()
            }
            "falcon" => vec![
                collapsed(r"[\p{P}\$\+<=>\^~\|`]+"),
                Step::Gpt2,
                collapsed("[0-9][0-9][0-9]"),
            ],
            "deepseek-coder" => {
                pre.clean_spaces = false;
                vec![
                    wide("[\r\n]"),
                    collapsed(r"\s?\p{L}+"),
                    collapsed(r"\s?\p{P}+"),
                    wide(CJK_RUNS),
                    collapsed(r"\p{N}"),
                ]
            }
            "deepseek-llm" => {
                pre.clean_spaces = false;
                vec![
                    wide("[\r\n]"),
                    wide(DEEPSEEK_LETTERS),
                    wide(
                        r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
                    ),
                    wide(r"\s+$"),
                    wide(CJK_RUNS),
                    collapsed(r"\p{N}+"),
                ]
            }
            "gemma4" => {
                pre.byte_encode = false;
                pre.escape_whitespaces = true;
                pre.add_bos = true;
                pre.newline_words_whole = true;
                vec![Step::Newlines]
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "pre-tokenizer tokenizer.ggml.pre = '{other}' (supported: {SUPPORTED})"
                )))
            }
        };
        Ok(pre)
    }

    /// Cut `text` into words, appending their byte ranges to `words`.
    pub fn split(&self, text: &str, words: &mut Vec<Range<usize>>) {
        if text.is_empty() {
            return;
        }
        let cpts: Vec<u32> = text.chars().map(u32::from).collect();
        // Pieces as code point ranges; each step cuts every piece further.
        let mut pieces: Vec<Range<usize>> = Vec::with_capacity(cpts.len() / 4 + 1);
        pieces.push(0..cpts.len());
        let mut next = Vec::new();
        let mut collapsed_text: Option<Vec<u8>> = None;
        for step in &self.steps {
            next.clear();
            for piece in &pieces {
                let (start, end) = (piece.start, piece.end);
                match step {
                    Step::Gpt2 => split_gpt2(&cpts, start, end, &mut next),
                    Step::Llama3 => {
                        split_llama3(&cpts, start, end, Digits::UpToThree, false, &mut next)
                    }
                    Step::Qwen2 => split_llama3(&cpts, start, end, Digits::One, false, &mut next),
                    Step::Qwen35 => split_llama3(&cpts, start, end, Digits::One, true, &mut next),
                    Step::Newlines => split_newlines(&cpts, start, end, &mut next),
                    Step::Collapsed(re) => {
                        let text = collapsed_text.get_or_insert_with(|| collapse_text(&cpts));
                        let matches = re.find_iter(&text[start..end]).map(|m| m.range());
                        cut_at_matches(start, end, matches, &mut next);
                    }
                    Step::Wide(re) => split_wide(re, &cpts, start, end, &mut next),
                }
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        // Code point ranges to byte ranges.
        let mut byte_at = Vec::with_capacity(cpts.len() + 1);
        byte_at.extend(text.char_indices().map(|(i, _)| i));
        byte_at.push(text.len());
        words.extend(
            pieces
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(|p| byte_at[p.start]..byte_at[p.end]),
        );
    }
}

/// llama.cpp's collapsed text: ASCII as is, other code points as one byte
/// for their category.
fn collapse_text(cpts: &[u32]) -> Vec<u8> {
    cpts.iter()
        .map(|&cp| {
            if cp < 0x80 {
                return cp as u8;
            }
            let f = unicode::flags(cp);
            if f.is_whitespace() {
                return COLLAPSED_SPACE;
            }
            CATEGORY_CODES
                .iter()
                .find(|&&(_, flag, ..)| f.category() == flag)
                .map_or(COLLAPSED_OTHER, |&(_, _, code, _)| code)
        })
        .collect()
}

/// Emit the matches of one piece and the text between them as pieces
/// (llama.cpp's `unicode_regex_split_stl`). Ranges are relative to `start`
/// and count code points (one byte each in the collapsed text).
fn cut_at_matches(
    start: usize,
    end: usize,
    matches: impl Iterator<Item = Range<usize>>,
    out: &mut Vec<Range<usize>>,
) {
    let mut done = start;
    for m in matches {
        let (m_start, m_end) = (start + m.start, start + m.end);
        if m_start > done {
            out.push(done..m_start);
        }
        if m_end > m_start {
            out.push(m_start..m_end);
        }
        done = m_end;
    }
    if done < end {
        out.push(done..end);
    }
}

/// A regex without categories runs on the code points, with non-ASCII
/// whitespace replaced by a vertical tab as llama.cpp does for `std::wregex`.
fn split_wide(
    re: &regex::Regex,
    cpts: &[u32],
    start: usize,
    end: usize,
    out: &mut Vec<Range<usize>>,
) {
    let mut text = String::with_capacity(end - start);
    let mut cp_at_byte = Vec::with_capacity(end - start);
    for (i, &cp) in cpts[start..end].iter().enumerate() {
        let c = if cp >= 0x80 && unicode::flags(cp).is_whitespace() {
            '\u{0B}'
        } else {
            char::from_u32(cp).unwrap_or('\u{FFFD}')
        };
        for _ in 0..c.len_utf8() {
            cp_at_byte.push(i);
        }
        text.push(c);
    }
    cp_at_byte.push(end - start);
    let matches = re
        .find_iter(&text)
        .map(|m| cp_at_byte[m.start()]..cp_at_byte[m.end()]);
    cut_at_matches(start, end, matches, out);
}

/// Code point and flags lookups limited to one piece; outside it the code
/// point is `None` and the flags are [`Flags::NONE`].
struct Window<'a> {
    cpts: &'a [u32],
    start: usize,
    end: usize,
}

impl Window<'_> {
    fn cpt(&self, pos: usize) -> Option<u32> {
        (self.start <= pos && pos < self.end).then(|| self.cpts[pos])
    }
    fn flags(&self, pos: usize) -> Flags {
        self.cpt(pos).map_or(Flags::NONE, unicode::flags)
    }
    /// Length of `'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d` at `pos`, if one is there.
    fn contraction(&self, pos: usize, ignore_case: bool) -> Option<usize> {
        if self.cpt(pos) != Some('\'' as u32) || pos + 1 >= self.end {
            return None;
        }
        let lower = |p: usize| {
            let cp = self.cpt(p).unwrap_or(u32::MAX);
            let cp = if ignore_case {
                unicode::to_lower_ascii(cp)
            } else {
                cp
            };
            char::from_u32(cp).unwrap_or('\0')
        };
        let next = lower(pos + 1);
        if matches!(next, 's' | 't' | 'm' | 'd') {
            return Some(2);
        }
        if pos + 2 < self.end
            && matches!((next, lower(pos + 2)), ('r', 'e') | ('v', 'e') | ('l', 'l'))
        {
            return Some(3);
        }
        None
    }
}

/// Not whitespace, letter or number, but a code point (`[^\s\p{L}\p{N}]`).
fn is_other(f: Flags) -> bool {
    !(f.is_whitespace() || f.is_letter() || f.is_number()) && f.is_some()
}

/// llama.cpp's `unicode_regex_split_custom_gpt2`.
fn split_gpt2(cpts: &[u32], start: usize, end: usize, out: &mut Vec<Range<usize>>) {
    let w = Window { cpts, start, end };
    let mut prev_end = start;
    let mut add = |to: usize, out: &mut Vec<Range<usize>>| {
        let len = to - prev_end;
        if len > 0 {
            out.push(prev_end..to);
        }
        prev_end = to;
        len
    };
    let mut pos = start;
    while pos < end {
        let cpt = w.cpt(pos).unwrap_or(u32::MAX);
        let flags = w.flags(pos);
        if let Some(len) = w.contraction(pos, false) {
            pos += add(pos + len, out);
            continue;
        }
        let space = cpt == ' ' as u32;
        let mut flags2 = if space { w.flags(pos + 1) } else { flags };
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let class: Option<fn(Flags) -> bool> = if flags2.is_letter() {
            Some(Flags::is_letter)
        } else if flags2.is_number() {
            Some(Flags::is_number)
        } else if is_other(flags2) {
            Some(is_other)
        } else {
            None
        };
        if let Some(class) = class {
            pos += usize::from(space);
            while class(flags2) {
                pos += 1;
                flags2 = w.flags(pos);
            }
            add(pos, out);
            continue;
        }
        let mut num_whitespaces = 0;
        while w.flags(pos + num_whitespaces).is_whitespace() {
            num_whitespaces += 1;
        }
        // `\s+(?!\S)`: all but the last whitespace when more text follows.
        if num_whitespaces > 1 && w.cpt(pos + num_whitespaces).is_some() {
            pos += num_whitespaces - 1;
            add(pos, out);
            continue;
        }
        // `\s+`
        if num_whitespaces > 0 {
            pos += num_whitespaces;
            add(pos, out);
            continue;
        }
        pos += 1;
        add(pos, out);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Digits {
    /// `\p{N}{1,3}` (Llama 3)
    UpToThree,
    /// `\p{N}` (Qwen2)
    One,
}

/// llama.cpp's `unicode_regex_split_custom_llama3`, `_qwen2` and `_qwen35`,
/// which differ in how digits group and whether letter runs take marks.
fn split_llama3(
    cpts: &[u32],
    start: usize,
    end: usize,
    digits: Digits,
    marks: bool,
    out: &mut Vec<Range<usize>>,
) {
    let w = Window { cpts, start, end };
    let mut prev_end = start;
    let mut add = |to: usize, out: &mut Vec<Range<usize>>| {
        let len = to - prev_end;
        if len > 0 {
            out.push(prev_end..to);
        }
        prev_end = to;
        len
    };
    let is_word = |f: Flags| f.is_letter() || (marks && f.is_accent_mark());
    let is_cr_lf = |cp: Option<u32>| cp == Some('\r' as u32) || cp == Some('\n' as u32);
    let mut pos = start;
    while pos < end {
        let cpt = w.cpt(pos);
        let flags = w.flags(pos);
        // `(?i:'s|'t|'re|'ve|'m|'ll|'d)`
        if let Some(len) = w.contraction(pos, true) {
            pos += add(pos + len, out);
            continue;
        }
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !(is_cr_lf(cpt) || flags.is_number()) && (is_word(flags) || is_word(w.flags(pos + 1))) {
            pos += 1;
            while is_word(w.flags(pos)) {
                pos += 1;
            }
            add(pos, out);
            continue;
        }
        // `\p{N}{1,3}` or `\p{N}`
        if flags.is_number() {
            match digits {
                Digits::One => {
                    pos += 1;
                }
                Digits::UpToThree => {
                    let mut group_start = pos;
                    while w.flags(pos).is_number() {
                        pos += 1;
                        if pos - group_start >= 3 {
                            add(pos, out);
                            group_start = pos;
                        }
                    }
                }
            }
            add(pos, out);
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*` (Qwen 3.5: `[^\s\p{L}\p{M}\p{N}]`). As in
        // llama.cpp the entry test checks that the current position (not the
        // one after the space) holds a code point, so a lone trailing space
        // is taken here.
        let space = cpt == Some(' ' as u32);
        let mut flags2 = if space { w.flags(pos + 1) } else { flags };
        let not_word = |f: Flags| !(f.is_whitespace() || is_word(f) || f.is_number());
        if not_word(flags2) && flags.is_some() {
            pos += usize::from(space);
            while not_word(flags2) && flags2.is_some() {
                pos += 1;
                flags2 = w.flags(pos);
            }
            while is_cr_lf(w.cpt(pos)) {
                pos += 1;
            }
            add(pos, out);
            continue;
        }
        let mut num_whitespaces = 0;
        let mut last_end_cr_lf = 0;
        while w.flags(pos + num_whitespaces).is_whitespace() {
            if is_cr_lf(w.cpt(pos + num_whitespaces)) {
                last_end_cr_lf = pos + num_whitespaces + 1;
            }
            num_whitespaces += 1;
        }
        // `\s*[\r\n]+`
        if last_end_cr_lf > 0 {
            pos = last_end_cr_lf;
            add(pos, out);
            continue;
        }
        // `\s+(?!\S)`
        if num_whitespaces > 1 && w.cpt(pos + num_whitespaces).is_some() {
            pos += num_whitespaces - 1;
            add(pos, out);
            continue;
        }
        // `\s+`
        if num_whitespaces > 0 {
            pos += num_whitespaces;
            add(pos, out);
            continue;
        }
        pos += 1;
        add(pos, out);
    }
}

/// `[^\n]+|[\n]+`
fn split_newlines(cpts: &[u32], start: usize, end: usize, out: &mut Vec<Range<usize>>) {
    let mut pos = start;
    while pos < end {
        let newline = cpts[pos] == '\n' as u32;
        let run_start = pos;
        while pos < end && (cpts[pos] == '\n' as u32) == newline {
            pos += 1;
        }
        out.push(run_start..pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let pre = PreTokenizer::from_name(pre).unwrap();
        let mut ranges = Vec::new();
        pre.split(text, &mut ranges);
        ranges.into_iter().map(|r| text[r].to_string()).collect()
    }

    #[test]
    fn gpt2_keeps_one_space_with_the_next_word() {
        assert_eq!(
            words("gpt-2", "Hello  world's 123!!"),
            ["Hello", " ", " world", "'s", " 123", "!!"]
        );
        assert_eq!(words("gpt-2", "a   "), ["a", "   "]);
    }

    #[test]
    fn llama3_groups_digits_by_three() {
        assert_eq!(
            words("llama-bpe", "1234567 I'M\n\n x"),
            ["123", "456", "7", " I", "'M", "\n\n", " x"]
        );
    }

    #[test]
    fn qwen2_splits_every_digit() {
        assert_eq!(words("qwen2", "ab 12"), ["ab", " ", "1", "2"]);
    }

    #[test]
    fn smollm_isolates_digits_then_applies_gpt2() {
        assert_eq!(words("smollm", "x 42y"), ["x", " ", "4", "2", "y"]);
    }

    #[test]
    fn collapsed_patterns_use_category_bytes() {
        assert_eq!(
            collapse_pattern(r"[^\s\p{L}]?\p{N}+"),
            r"(?-u)[^\s\xD2A-Za-z]?[\xD10-9]+"
        );
        assert_eq!(
            words("default", "a,b  12345"),
            ["a", ",", "b", " ", " ", "123", "45"]
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let err = PreTokenizer::from_name("no-such-thing")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-thing"), "{err}");
    }
}
