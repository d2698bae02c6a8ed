//! Text to token ids: special-token partitioning, then BPE or SentencePiece
//! on each stretch of ordinary text (llama.cpp's `llama_vocab::impl::tokenize`).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;

use crate::vocab::{attr, Bpe, Tokenizer, VocabKind, NO_PIECE};

/// A stretch of the input: ordinary text or a special token cut out of it.
#[derive(Clone, Debug, PartialEq)]
enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

impl Tokenizer {
    /// Tokenize `text`.
    ///
    /// `add_special` adds BOS and/or EOS as the vocabulary asks
    /// ([`add_bos`](Self::add_bos), [`add_eos`](Self::add_eos)).
    /// `parse_special` lets control tokens written in the text (`<|im_start|>`)
    /// become their ids; without it they are tokenized as ordinary text.
    /// User-defined tokens are always matched whole, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special, &[]);
        self.encode_fragments(text, &fragments, add_special)
    }

    /// [`Self::encode`] with control tokens parsed everywhere except in the
    /// byte ranges `literal` (each one's text is tokenized as text): a chat
    /// prompt rendered from a template, whose messages' contents must not
    /// become control tokens (a user who types `<|im_start|>system` would
    /// otherwise open a system turn of their own).
    pub fn encode_with_literal(
        &self,
        text: &str,
        add_special: bool,
        literal: &[Range<usize>],
    ) -> Vec<u32> {
        let fragments = self.partition(text, true, literal);
        self.encode_fragments(text, &fragments, add_special)
    }

    fn encode_fragments(&self, text: &str, fragments: &[Fragment], add_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match self.kind {
            VocabKind::Spm => {
                // A space is prefixed to text at the start and after every special token.
                let mut prev_special = true;
                let mut scratch = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            scratch.clear();
                            if self.add_space_prefix && prev_special {
                                scratch.push('\u{2581}');
                            }
                            for c in text[range.clone()].chars() {
                                scratch.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            self.spm_encode(&scratch, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(*id);
                            prev_special = true;
                        }
                    }
                }
            }
            VocabKind::Bpe => {
                let bpe = self.bpe.as_ref().expect("BPE vocabulary has merge tables");
                let mut session = BpeSession::default();
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            let text = &text[range.clone()];
                            if self.escape_whitespaces {
                                self.bpe_encode(
                                    bpe,
                                    &text.replace(' ', "\u{2581}"),
                                    &mut session,
                                    &mut out,
                                );
                            } else {
                                self.bpe_encode(bpe, text, &mut session, &mut out);
                            }
                        }
                        Fragment::Token(id) => out.push(*id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Cut special tokens out of `text` (llama.cpp's `tokenizer_st_partition`):
    /// each special token in turn, longest first, splits every remaining
    /// stretch of text at each of its occurrences. Control and unknown tokens
    /// take part only with `parse_special`; user-defined ones always.
    fn partition(
        &self,
        text: &str,
        parse_special: bool,
        literal: &[Range<usize>],
    ) -> Vec<Fragment> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(0..text.len()));
        let Some(search) = &self.special_search else {
            return fragments;
        };
        // Only the special tokens that occur at all can split anything; find
        // them in one pass instead of searching for each of (for Gemma) 6,000.
        let mut present: Vec<usize> = search
            .find_overlapping_iter(text)
            .map(|m| m.pattern().as_usize())
            .collect();
        present.sort_unstable();
        present.dedup();
        let bytes = text.as_bytes();
        for order in present {
            let id = self.special_order[order];
            let a = self.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = self.tokens[id as usize].as_bytes();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut search_from = range.start;
                while let Some(found) = find(&bytes[search_from..range.end], needle) {
                    let at = search_from + found;
                    // A control token inside a literal range stays text.
                    if a & (attr::CONTROL | attr::UNKNOWN) != 0
                        && literal
                            .iter()
                            .any(|l| at < l.end && at + needle.len() > l.start)
                    {
                        search_from = at + 1;
                        continue;
                    }
                    let mut left = range.start..at;
                    if a & attr::LSTRIP != 0 {
                        while left.end > left.start && bytes[left.end - 1].is_ascii_whitespace_c() {
                            left.end -= 1;
                        }
                    }
                    if !left.is_empty() {
                        next.push(Fragment::Text(left));
                    }
                    next.push(Fragment::Token(id));
                    range.start = at + needle.len();
                    if a & attr::RSTRIP != 0 {
                        while range.start < range.end && bytes[range.start].is_ascii_whitespace_c()
                        {
                            range.start += 1;
                        }
                    }
                    search_from = range.start;
                }
                if !range.is_empty() {
                    next.push(Fragment::Text(range));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// SentencePiece on one escaped stretch of text (llama.cpp's
    /// `llm_tokenizer_spm_session`): start from single characters and keep
    /// merging the adjacent pair whose concatenation is the highest-scoring
    /// token, leftmost first on ties; what never became a token is written
    /// as byte tokens.
    fn spm_encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start: start as u32,
                len: c.len_utf8() as u32,
                piece: NO_PIECE,
                prev: i as i32 - 1,
                next: if start + c.len_utf8() == text.len() {
                    -1
                } else {
                    i as i32 + 1
                },
            });
        }
        let mut queue = BinaryHeap::new();
        let try_add =
            |queue: &mut BinaryHeap<SpmBigram>, symbols: &[Symbol], left: i32, right: i32| {
                if left < 0 || right < 0 {
                    return;
                }
                let (l, r) = (&symbols[left as usize], &symbols[right as usize]);
                let merged = &text[l.start as usize..(r.start + r.len) as usize];
                if let Some(&id) = self.token_to_id.get(merged) {
                    queue.push(SpmBigram {
                        score: self.scores[id as usize],
                        left,
                        right,
                        size: merged.len() as u32,
                    });
                }
            };
        for i in 1..symbols.len() as i32 {
            try_add(&mut queue, &symbols, i - 1, i);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (
                symbols[bigram.left as usize],
                symbols[bigram.right as usize],
            );
            // Skip pairs outdated by an earlier merge.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            symbols[bigram.left as usize].len += r.len;
            symbols[bigram.left as usize].next = r.next;
            symbols[bigram.right as usize].len = 0;
            if r.next >= 0 {
                symbols[r.next as usize].prev = bigram.left;
            }
            try_add(&mut queue, &symbols, l.prev, bigram.left);
            try_add(&mut queue, &symbols, bigram.left, r.next);
        }
        let mut i = if symbols.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let symbol = symbols[i as usize];
            let piece = &text[symbol.start as usize..(symbol.start + symbol.len) as usize];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        // `<0xHH>`, else the byte as a one-character token; llama.cpp
                        // fails when neither exists, the unknown token is the closest.
                        let id =
                            self.hex_byte_tokens[b as usize].or(self.char_byte_tokens[b as usize]);
                        out.extend(id.or(self.unk));
                    }
                }
            }
            i = symbol.next;
        }
    }

    /// Byte-level BPE on one stretch of ordinary text: pre-tokenize into
    /// words, map each word's bytes to GPT-2 characters, merge.
    fn bpe_encode(&self, bpe: &Bpe, text: &str, session: &mut BpeSession, out: &mut Vec<u32>) {
        session.words.clear();
        bpe.pre.split(text, &mut session.words);
        let words = std::mem::take(&mut session.words);
        for range in &words {
            let word = &text[range.clone()];
            session.word.clear();
            if bpe.pre.byte_encode {
                let table = crate::unicode::byte_to_char_table();
                session.word.extend(word.bytes().map(|b| table[b as usize]));
            } else {
                session.word.push_str(word);
            }
            let encoded = std::mem::take(&mut session.word);
            self.bpe_word(bpe, &encoded, word.as_bytes(), session, out);
            session.word = encoded;
        }
        session.words = words;
    }

    /// Merge one word (llama.cpp's `llm_tokenizer_bpe_session::tokenize`):
    /// start from its characters and repeatedly apply the lowest-ranked merge
    /// among adjacent pairs, leftmost first on ties.
    fn bpe_word(
        &self,
        bpe: &Bpe,
        word: &str,
        raw: &[u8],
        session: &mut BpeSession,
        out: &mut Vec<u32>,
    ) {
        if bpe.pre.ignore_merges
            || (bpe.pre.newline_words_whole && word.bytes().all(|b| b == b'\n'))
        {
            if let Some(&id) = self.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        let symbols = &mut session.symbols;
        symbols.clear();
        if bpe.pre.byte_encode {
            // One GPT-2 character per raw byte.
            let mut start = 0u32;
            for (i, &b) in raw.iter().enumerate() {
                let len = crate::unicode::byte_to_char_table()[b as usize].len_utf8() as u32;
                symbols.push(Symbol {
                    start,
                    len,
                    piece: bpe.byte_pieces[b as usize],
                    prev: i as i32 - 1,
                    next: i as i32 + 1,
                });
                start += len;
            }
        } else {
            for (i, (start, c)) in word.char_indices().enumerate() {
                symbols.push(Symbol {
                    start: start as u32,
                    len: c.len_utf8() as u32,
                    piece: bpe.char_pieces.get(&c).copied().unwrap_or(NO_PIECE),
                    prev: i as i32 - 1,
                    next: i as i32 + 1,
                });
            }
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        let queue = &mut session.queue;
        queue.clear();
        let try_add =
            |queue: &mut BinaryHeap<BpeBigram>, symbols: &[Symbol], left: i32, right: i32| {
                if left < 0 || right < 0 {
                    return;
                }
                let (l, r) = (&symbols[left as usize], &symbols[right as usize]);
                if l.piece == NO_PIECE || r.piece == NO_PIECE {
                    return;
                }
                if let Some(&(rank, merged)) = bpe.merges.get(&(l.piece, r.piece)) {
                    queue.push(BpeBigram {
                        rank,
                        left,
                        right,
                        size: l.len + r.len,
                        merged,
                    });
                }
            };
        for i in 1..symbols.len() as i32 {
            try_add(queue, symbols, i - 1, i);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (
                symbols[bigram.left as usize],
                symbols[bigram.right as usize],
            );
            // Skip pairs outdated by an earlier merge: symbols only grow, so
            // an unchanged total length means both halves are unchanged.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            let left = &mut symbols[bigram.left as usize];
            left.len += r.len;
            left.next = r.next;
            left.piece = bigram.merged;
            symbols[bigram.right as usize].len = 0;
            if r.next >= 0 {
                symbols[r.next as usize].prev = bigram.left;
            }
            try_add(queue, symbols, l.prev, bigram.left);
            try_add(queue, symbols, bigram.left, r.next);
        }
        let n_vocab = self.tokens.len() as u32;
        for symbol in symbols.iter().filter(|s| s.len > 0) {
            if symbol.piece < n_vocab {
                out.push(symbol.piece);
                continue;
            }
            // Not a token: fall back to the symbol's bytes one by one, as llama.cpp does.
            let text =
                &word.as_bytes()[symbol.start as usize..(symbol.start + symbol.len) as usize];
            let bytes = if bpe.pre.byte_encode {
                &self.char_byte_tokens
            } else {
                &self.hex_byte_tokens
            };
            out.extend(text.iter().filter_map(|&b| bytes[b as usize]));
        }
    }
}

/// A symbol of the word being merged: a byte range of the word, the piece it
/// currently spells, and its neighbours (`-1` for none). A symbol merged into
/// its left neighbour keeps `len == 0`.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u32,
    len: u32,
    piece: u32,
    prev: i32,
    next: i32,
}

/// Reused buffers for BPE, one set per `encode` call.
#[derive(Default)]
struct BpeSession {
    words: Vec<Range<usize>>,
    word: String,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<BpeBigram>,
}

/// A candidate BPE merge; the heap pops the lowest rank, then the leftmost.
#[derive(Debug)]
struct BpeBigram {
    rank: u32,
    left: i32,
    right: i32,
    size: u32,
    merged: u32,
}

impl Ord for BpeBigram {
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank).then(other.left.cmp(&self.left))
    }
}
impl PartialOrd for BpeBigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for BpeBigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for BpeBigram {}

/// A candidate SentencePiece merge; the heap pops the highest score, then the leftmost.
#[derive(Debug)]
struct SpmBigram {
    score: f32,
    left: i32,
    right: i32,
    size: u32,
}

impl Ord for SpmBigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}
impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for SpmBigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for SpmBigram {}

/// First occurrence of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    let first = needle[0];
    let mut from = 0;
    while let Some(i) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if haystack.len() - at < needle.len() {
            return None;
        }
        if &haystack[at..at + needle.len()] == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for l/rstrip.
trait CSpace {
    fn is_ascii_whitespace_c(&self) -> bool;
}
impl CSpace for u8 {
    fn is_ascii_whitespace_c(&self) -> bool {
        matches!(self, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"aaa", b"aa"), Some(0));
    }
}
