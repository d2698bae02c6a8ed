//! The vocabulary read from GGUF metadata, with llama.cpp's defaults and fix-ups
//! (`llama_vocab::impl::load`).

use std::collections::HashMap;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use gguf::{Array, Metadata, Value};

use crate::pretokenize::PreTokenizer;
use crate::unicode;
use crate::TokenizerError;

/// Token attributes, llama.cpp's `llama_token_attr` bits.
pub(crate) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;
}

/// Marks a piece that is not in the vocabulary (see [`Bpe`]).
pub(crate) const NO_PIECE: u32 = u32::MAX;

/// Which algorithm turns text into ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// Byte-level BPE with merge ranks (`gpt2`, `gemma4`).
    Bpe,
    /// SentencePiece with scores and byte fallback (`llama`).
    Spm,
}

/// BPE merge tables.
///
/// Merging works on "pieces": every vocabulary token is the piece with its
/// own id, and the halves and results of merges that are not tokens get ids
/// past the vocabulary. A merge is then a lookup of two piece ids, and a
/// finished symbol whose piece id is below the vocabulary size is a token.
pub(crate) struct Bpe {
    pub pre: PreTokenizer,
    /// `(left piece, right piece)` → `(rank, merged piece)`.
    pub merges: HashMap<(u32, u32), (u32, u32), FxBuild>,
    /// Piece of each byte's GPT-2 character, for byte-encoded vocabularies.
    pub byte_pieces: [u32; 256],
    /// Piece of single characters, for vocabularies that merge raw UTF-8.
    pub char_pieces: HashMap<char, u32, FxBuild>,
}

/// A tokenizer built from GGUF metadata; see the crate documentation.
pub struct Tokenizer {
    pub(crate) kind: VocabKind,
    pub(crate) bpe: Option<Bpe>,
    pub(crate) tokens: Vec<Arc<str>>,
    pub(crate) token_to_id: HashMap<Arc<str>, u32, FxBuild>,
    pub(crate) scores: Vec<f32>,
    pub(crate) attrs: Vec<u16>,
    /// What each token decodes to when special tokens are rendered
    /// (llama.cpp's `cache_token_to_piece`).
    pub(crate) pieces: Vec<Box<[u8]>>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) eot: Option<u32>,
    pub(crate) unk: Option<u32>,
    pub(crate) pad: Option<u32>,
    /// End-of-generation ids, sorted.
    pub(crate) eog: Vec<u32>,
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
    pub(crate) add_space_prefix: bool,
    pub(crate) clean_spaces: bool,
    pub(crate) escape_whitespaces: bool,
    /// The `<0xHH>` token of each byte, if the vocabulary has it.
    pub(crate) hex_byte_tokens: [Option<u32>; 256],
    /// The token whose text is the byte itself (ASCII only), if any.
    pub(crate) char_byte_tokens: [Option<u32>; 256],
    /// Control, user-defined and unknown tokens, longest text first: the
    /// order in which they are cut out of the input.
    pub(crate) special_order: Vec<u32>,
    /// Finds which of `special_order` occur in a text (patterns in that order).
    pub(crate) special_search: Option<AhoCorasick>,
}

/// A small fast hasher for the integer and short-string keys of the
/// vocabulary maps (the Firefox/rustc "Fx" hash); these maps are looked up
/// for every character of every prompt and hashing dominated with SipHash.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FxBuild;

#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl std::hash::BuildHasher for FxBuild {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().unwrap()));
        }
        for &b in chunks.remainder() {
            self.add(b.into());
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i.into());
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// Token texts llama.cpp recognises as end-of-turn when the metadata names
/// none (the lowest id among those present is taken).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Token texts that end generation whatever the metadata says (llama.cpp's list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Largest vocabulary accepted; real ones are below 300k. Bounds the
/// memory a hostile file can make us allocate for per-token tables.
const MAX_TOKENS: usize = 1 << 22;

fn optional_bool(meta: &Metadata, key: &str) -> Result<Option<bool>, TokenizerError> {
    match meta.get(key) {
        None => Ok(None),
        Some(_) => Ok(Some(meta.get_bool(key)?)),
    }
}

impl Tokenizer {
    /// Build the tokenizer that the `tokenizer.*` keys of `meta` describe.
    ///
    /// Missing optional keys take llama.cpp's defaults (for instance
    /// `add_bos_token` is true for SentencePiece and Llama 3, false for other
    /// BPE vocabularies). Inconsistent metadata (missing merges, arrays of
    /// different lengths, special token ids outside the vocabulary, duplicate
    /// tokens) is an error naming the key.
    pub fn from_gguf(meta: &Metadata) -> Result<Self, TokenizerError> {
        let model = meta.get_str(KEY_MODEL)?;
        let pre_name = match meta.get(KEY_PRE) {
            Some(_) => meta.get_str(KEY_PRE)?,
            None => "default",
        };

        // Per-model defaults, as llama.cpp sets them before reading overrides.
        let kind;
        let mut pre = None;
        let (bos, eos, unk): (Option<u32>, Option<u32>, Option<u32>);
        let mut add_bos;
        let mut add_eos = false;
        let mut add_space_prefix;
        let clean_spaces;
        let escape_whitespaces;
        match model {
            "llama" => {
                kind = VocabKind::Spm;
                (bos, eos, unk) = (Some(1), Some(2), Some(0));
                add_bos = true;
                add_space_prefix = true;
                clean_spaces = false;
                escape_whitespaces = true;
            }
            "gpt2" | "gemma4" => {
                kind = VocabKind::Bpe;
                let p = PreTokenizer::from_name(if model == "gemma4" {
                    "gemma4"
                } else {
                    pre_name
                })?;
                (bos, eos, unk) = if model == "gemma4" {
                    (None, None, None)
                } else {
                    (Some(11), Some(11), None)
                };
                add_bos = p.add_bos;
                add_space_prefix = false;
                clean_spaces = p.clean_spaces;
                escape_whitespaces = p.escape_whitespaces;
                pre = Some(p);
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer model {KEY_MODEL} = '{other}' (supported: llama, gpt2, gemma4)"
                )))
            }
        }
        if let Some(v) = optional_bool(meta, "tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }

        // Tokens, scores and types.
        let raw_tokens = meta.get_string_array(KEY_TOKENS)?;
        let n_tokens = raw_tokens.len();
        if n_tokens == 0 {
            return Err(TokenizerError::invalid(
                KEY_TOKENS,
                "the vocabulary is empty",
            ));
        }
        if n_tokens > MAX_TOKENS {
            return Err(TokenizerError::invalid(
                KEY_TOKENS,
                format!("{n_tokens} tokens, more than the {MAX_TOKENS} this reader accepts"),
            ));
        }
        let scores = read_scores(meta, n_tokens)?;
        let mut attrs = read_attrs(meta, n_tokens)?;
        let mut tokens = Vec::with_capacity(n_tokens);
        let mut token_to_id = HashMap::with_capacity_and_hasher(n_tokens, FxBuild);
        // One allocation a token, shared by the list and the map (262k
        // tokens for Gemma 3: allocation was most of the load time).
        for (i, text) in raw_tokens.iter().enumerate() {
            let text: Arc<str> = if text.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                text.as_str().into()
            };
            if let Some(first) = token_to_id.insert(text.clone(), i as u32) {
                return Err(TokenizerError::invalid(
                    KEY_TOKENS,
                    format!("token {text:?} appears twice, at ids {first} and {i}"),
                ));
            }
            tokens.push(text);
        }

        let bpe = match pre {
            Some(pre) => Some(build_bpe(meta, pre, &tokens, &token_to_id)?),
            None => None,
        };

        let mut ids = SpecialIds::read(meta, n_tokens, bos, eos, unk)?;
        if let Some(v) = optional_bool(meta, "tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = optional_bool(meta, "tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }
        if model == "gemma4" {
            add_bos = true;
        }
        let eog = ids.recognise_by_text(&tokens, &token_to_id, &mut attrs);
        let SpecialIds {
            bos,
            eos,
            eot,
            unk,
            pad,
            ..
        } = ids;

        let mut special_order: Vec<u32> = (0..n_tokens as u32)
            .filter(|&id| {
                attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        special_order.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });
        let special_search = if special_order.is_empty() {
            None
        } else {
            let patterns = special_order
                .iter()
                .map(|&id| tokens[id as usize].as_bytes());
            Some(
                AhoCorasick::new(patterns)
                    .map_err(|e| TokenizerError::invalid(KEY_TOKENS, e.to_string()))?,
            )
        };

        let pieces = tokens
            .iter()
            .zip(&attrs)
            .enumerate()
            .map(|(id, (text, &a))| piece_of(kind, escape_whitespaces, id, text, a))
            .collect::<Result<Vec<_>, _>>()?;

        // Phi-3 strips whitespace after its special tokens (by model name, as llama.cpp does).
        let name = meta
            .get("general.name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_lowercase();
        if name.contains("phi-3") || name.contains("phi3") {
            for &id in &special_order {
                attrs[id as usize] |= attr::RSTRIP;
            }
            if let Some(&id) = token_to_id.get("</s>") {
                attrs[id as usize] |= attr::RSTRIP;
            }
            for text in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(&id) = token_to_id.get(text) {
                    attrs[id as usize] &= !attr::RSTRIP;
                }
            }
        }

        let hex_byte_tokens =
            std::array::from_fn(|b| token_to_id.get(format!("<0x{b:02X}>").as_str()).copied());
        let char_byte_tokens = std::array::from_fn(|b| {
            let c = char::from(b as u8);
            if c.is_ascii() {
                token_to_id.get(c.encode_utf8(&mut [0; 4]) as &str).copied()
            } else {
                None
            }
        });

        Ok(Tokenizer {
            kind,
            bpe,
            tokens,
            token_to_id,
            scores,
            attrs,
            pieces,
            bos,
            eos,
            eot,
            unk,
            pad,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            escape_whitespaces,
            hex_byte_tokens,
            char_byte_tokens,
            special_order,
            special_search,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// BPE or SentencePiece.
    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`<|im_end|>`, `<end_of_turn>`, …): from the
    /// metadata, else recognised by its text.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Unknown-token token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether [`encode`](Self::encode) with `add_special` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode`](Self::encode) with `add_special` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether generating `id` ends the generation: eos, eot, eom and the
    /// tokens llama.cpp recognises by text (`<|im_end|>`, `<end_of_turn>`,
    /// `<|endoftext|>`, …).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` is a control token (rendered only when decoding with `special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The token's text as stored in the vocabulary (GPT-2 byte characters,
    /// `▁` for spaces), e.g. for a chat template's `bos_token`.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| &**t)
    }

    /// The id of the token whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
}

/// BOS and EOS ids as [`Tokenizer::from_gguf`] resolves them: the metadata's,
/// else llama.cpp's default for the tokenizer model if inside the vocabulary.
pub(crate) fn bos_eos_ids(
    meta: &Metadata,
    n_tokens: usize,
) -> Result<(Option<u32>, Option<u32>), TokenizerError> {
    let (bos, eos) = match meta.get(KEY_MODEL).and_then(Value::as_str) {
        Some("llama") => (Some(1), Some(2)),
        Some("gpt2") => (Some(11), Some(11)),
        _ => (None, None),
    };
    let ids = SpecialIds::read(meta, n_tokens, bos, eos, None)?;
    Ok((ids.bos, ids.eos))
}

/// The special token ids llama.cpp reads from the metadata or recognises by text.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

impl SpecialIds {
    /// The `tokenizer.ggml.*_token_id` keys. A default outside the
    /// vocabulary is dropped; an explicit id outside it is an error.
    fn read(
        meta: &Metadata,
        n_tokens: usize,
        bos: Option<u32>,
        eos: Option<u32>,
        unk: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let id = |key: &str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            let default = default.filter(|&id| (id as usize) < n_tokens);
            if meta.get(key).is_none() {
                return Ok(default);
            }
            let id = meta.get_u32(key)?;
            if id as usize >= n_tokens {
                return Err(TokenizerError::invalid(
                    key,
                    format!("token id {id} is outside the vocabulary of {n_tokens} tokens"),
                ));
            }
            Ok(Some(id))
        };
        // Read but unused here; checked all the same.
        id("tokenizer.ggml.seperator_token_id", None)?;
        id("tokenizer.ggml.mask_token_id", None)?;
        let key = |name: &str| format!("tokenizer.ggml.{name}_token_id");
        // The deprecated prefix/suffix/middle keys override the fim_* ones, as in llama.cpp.
        let fim = |name: &str, old: &str| id(&key(old), id(&key(name), None)?);
        Ok(SpecialIds {
            bos: id(&key("bos"), bos)?,
            eos: id(&key("eos"), eos)?,
            eot: id(&key("eot"), None)?,
            eom: id(&key("eom"), None)?,
            unk: id(&key("unknown"), unk)?,
            pad: id(&key("padding"), None)?,
            fim_pre: fim("fim_pre", "prefix")?,
            fim_suf: fim("fim_suf", "suffix")?,
            fim_mid: fim("fim_mid", "middle")?,
            fim_pad: id(&key("fim_pad"), None)?,
            fim_rep: id(&key("fim_rep"), None)?,
            fim_sep: id(&key("fim_sep"), None)?,
        })
    }

    /// Fill unnamed end-of-turn and fill-in-the-middle tokens from their
    /// text, make every end-of-something token a control token, and return
    /// the end-of-generation ids, sorted (llama.cpp's load, step by step).
    fn recognise_by_text(
        &mut self,
        tokens: &[Arc<str>],
        token_to_id: &HashMap<Arc<str>, u32, FxBuild>,
        attrs: &mut [u16],
    ) -> Vec<u32> {
        // llama.cpp takes the first candidate in its hash map's order; the
        // lowest id is a fixed rule that agrees with it on the test models.
        let find = |texts: &[&str]| {
            texts
                .iter()
                .filter_map(|t| token_to_id.get(*t).copied())
                .min()
        };
        for (slot, texts) in [
            (&mut self.eot, EOT_TEXTS),
            (&mut self.eom, EOM_TEXTS),
            (&mut self.fim_pre, FIM_PRE_TEXTS),
            (&mut self.fim_suf, FIM_SUF_TEXTS),
            (&mut self.fim_mid, FIM_MID_TEXTS),
            (&mut self.fim_pad, FIM_PAD_TEXTS),
            (&mut self.fim_rep, FIM_REP_TEXTS),
            (&mut self.fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none() {
                *slot = find(texts);
                if let Some(id) = *slot {
                    attrs[id as usize] |= attr::CONTROL;
                }
            }
        }
        for (id, text) in tokens.iter().enumerate() {
            if attrs[id] & attr::CONTROL != 0 && text.contains("unused") {
                attrs[id] |= attr::UNUSED;
            }
        }

        // FIM pad/repo/separator, every token with an end-of-something text, eos/eot/eom.
        let mut eog: Vec<u32> = [self.fim_pad, self.fim_rep, self.fim_sep]
            .into_iter()
            .flatten()
            .collect();
        for text in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                eog.push(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
        // gpt-oss: always rendered.
        for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(text) {
                attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend([self.eos, self.eot, self.eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let has = |eog: &[u32], text: &str| eog.iter().any(|&id| &*tokens[id as usize] == text);
        // gpt-oss and solar-open: `<|end|>` ends a message, not the generation.
        if (has(&eog, "<|return|>") && has(&eog, "<|call|>")
            || has(&eog, "<|calls|>") && has(&eog, "<|flush|>"))
            && has(&eog, "<|end|>")
        {
            let end = token_to_id["<|end|>"];
            eog.retain(|&id| id != end);
            attrs[end as usize] = attr::USER_DEFINED;
        }
        // Gemma 4 and PLaMo-2: `</s>` is an ordinary token.
        if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
            let s = token_to_id["</s>"];
            eog.retain(|&id| id != s);
            attrs[s as usize] = attr::NORMAL;
        }
        eog
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("special_tokens", &self.special_order.len())
            .finish_non_exhaustive()
    }
}

fn read_scores(meta: &Metadata, n_tokens: usize) -> Result<Vec<f32>, TokenizerError> {
    let scores = match meta.get(KEY_SCORES) {
        None => return Ok(vec![0.0; n_tokens]),
        Some(Value::Array(Array::F32(s))) => s.clone(),
        Some(Value::Array(Array::I32(s))) => s.iter().map(|&x| x as f32).collect(),
        Some(v) => {
            return Err(TokenizerError::invalid(
                KEY_SCORES,
                format!(
                    "expected an array of f32 or i32, found {}",
                    v.type_description()
                ),
            ))
        }
    };
    if scores.len() != n_tokens {
        return Err(TokenizerError::invalid(
            KEY_SCORES,
            format!("{} scores for {n_tokens} tokens", scores.len()),
        ));
    }
    Ok(scores)
}

/// Token types (`llama_token_type`) to attributes; without types every token is normal.
fn read_attrs(meta: &Metadata, n_tokens: usize) -> Result<Vec<u16>, TokenizerError> {
    if meta.get(KEY_TOKEN_TYPE).is_none() {
        return Ok(vec![attr::NORMAL; n_tokens]);
    }
    let types = meta.get_int_array(KEY_TOKEN_TYPE)?;
    if types.len() != n_tokens {
        return Err(TokenizerError::invalid(
            KEY_TOKEN_TYPE,
            format!("{} token types for {n_tokens} tokens", types.len()),
        ));
    }
    Ok(types
        .iter()
        .map(|&t| match t {
            1 => attr::NORMAL,
            2 => attr::UNKNOWN,
            3 => attr::CONTROL,
            4 => attr::USER_DEFINED,
            5 => attr::UNUSED,
            6 => attr::BYTE,
            // 0 (undefined) and anything else: no attribute, decodes to nothing.
            _ => 0,
        })
        .collect())
}

/// Parse the merges into piece-id tables (see [`Bpe`]).
fn build_bpe(
    meta: &Metadata,
    pre: PreTokenizer,
    tokens: &[Arc<str>],
    token_to_id: &HashMap<Arc<str>, u32, FxBuild>,
) -> Result<Bpe, TokenizerError> {
    let lines = meta.get_string_array(KEY_MERGES)?;
    let mut extra: HashMap<String, u32, FxBuild> = HashMap::default();
    let mut next_piece = tokens.len() as u32;
    let mut intern = |text: &str| -> u32 {
        if let Some(&id) = token_to_id.get(text) {
            return id;
        }
        *extra.entry(text.to_string()).or_insert_with(|| {
            next_piece += 1;
            next_piece - 1
        })
    };
    let mut merges = HashMap::with_capacity_and_hasher(lines.len(), FxBuild);
    for (rank, line) in lines.iter().enumerate() {
        // The separator is the first space after the first byte, so a left
        // half may itself start with a space.
        let split = line
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&b| b == b' ')
            .map(|i| i + 1);
        let Some(split) = split else {
            return Err(TokenizerError::invalid(
                KEY_MERGES,
                format!("entry {rank} ({line:?}) is not two pieces separated by a space"),
            ));
        };
        let (left, right) = (&line[..split], &line[split + 1..]);
        if right.is_empty() {
            return Err(TokenizerError::invalid(
                KEY_MERGES,
                format!("entry {rank} ({line:?}) has an empty right half"),
            ));
        }
        let key = (intern(left), intern(right));
        let merged = intern(&format!("{left}{right}"));
        merges.entry(key).or_insert((rank as u32, merged));
    }

    let mut byte_pieces = [NO_PIECE; 256];
    let mut char_pieces = HashMap::default();
    if pre.byte_encode {
        let mut buf = [0u8; 4];
        for (b, c) in unicode::byte_to_char_table().iter().enumerate() {
            let text: &str = c.encode_utf8(&mut buf);
            byte_pieces[b] = token_to_id
                .get(text)
                .or_else(|| extra.get(text))
                .copied()
                .unwrap_or(NO_PIECE);
        }
    } else {
        let single_char = |text: &str| {
            let mut chars = text.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Some(c),
                _ => None,
            }
        };
        let texts = token_to_id
            .iter()
            .map(|(t, id)| (&**t, id))
            .chain(extra.iter().map(|(t, id)| (t.as_str(), id)));
        for (text, &id) in texts {
            if let Some(c) = single_char(text) {
                char_pieces.insert(c, id);
            }
        }
    }
    Ok(Bpe {
        pre,
        merges,
        byte_pieces,
        char_pieces,
    })
}

/// What token `id` decodes to with special tokens rendered (llama.cpp's
/// `token_to_piece(special = true)`).
fn piece_of(
    kind: VocabKind,
    escape_whitespaces: bool,
    id: usize,
    text: &str,
    a: u16,
) -> Result<Box<[u8]>, TokenizerError> {
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        return Ok(text.as_bytes().into());
    }
    if a & attr::NORMAL != 0 {
        let unescaped = || {
            if text.contains('\u{2581}') {
                text.replace('\u{2581}', " ")
                    .into_bytes()
                    .into_boxed_slice()
            } else {
                text.as_bytes().into()
            }
        };
        return Ok(match kind {
            VocabKind::Spm => unescaped(),
            VocabKind::Bpe if escape_whitespaces => unescaped(),
            VocabKind::Bpe => gpt2_bytes(text),
        });
    }
    if a & attr::BYTE != 0 {
        return match byte_token_value(text) {
            Some(b) => Ok(Box::new([b])),
            None => Err(TokenizerError::invalid(
                KEY_TOKENS,
                format!("token {id} has type byte but its text {text:?} is not <0xHH>"),
            )),
        };
    }
    Ok(Box::default())
}

/// The byte a `<0xHH>` token stands for.
pub(crate) fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2 byte characters back to bytes; a character outside the map becomes
/// llama.cpp's `[UNK_BYTE_0x…]` marker.
fn gpt2_bytes(text: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match unicode::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token_value("<0x0A>"), Some(10));
        assert_eq!(byte_token_value("<0xff>"), Some(255));
        assert_eq!(byte_token_value("<0x1>"), None);
        assert_eq!(byte_token_value("a"), None);
    }

    #[test]
    fn gpt2_pieces_decode_bytes() {
        assert_eq!(&*gpt2_bytes("Ġhello"), b" hello");
        assert_eq!(&*gpt2_bytes("ĊĊ"), b"\n\n");
        assert_eq!(&*gpt2_bytes("a中"), b"a[UNK_BYTE_0xe4b8ada\xe4\xb8\xad]");
    }
}
