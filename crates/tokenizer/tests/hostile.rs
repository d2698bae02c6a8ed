//! Metadata that is missing, inconsistent or out of range is an error naming
//! the key, never a panic; and odd but valid vocabularies (no byte tokens, no
//! merges that apply) encode and decode any text without panicking.

use gguf::{Array, Metadata, Value};
use tokenizer::{Tokenizer, TokenizerError};

fn strings(items: &[&str]) -> Value {
    Value::Array(Array::String(items.iter().map(|s| s.to_string()).collect()))
}

/// A small valid GPT-2-style vocabulary: the byte characters of "a", "b",
/// " " and "\n" (Ġ, Ċ), one merge, and two control tokens.
fn bpe_meta() -> Metadata {
    let mut m = Metadata::new();
    m.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    m.set("tokenizer.ggml.pre", Value::String("gpt-2".into()));
    m.set(
        "tokenizer.ggml.tokens",
        strings(&[
            "<|endoftext|>",
            "a",
            "b",
            "Ġ",
            "Ċ",
            "ab",
            "Ġa",
            "<|im_end|>",
        ]),
    );
    m.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![3, 1, 1, 1, 1, 1, 1, 3])),
    );
    m.set("tokenizer.ggml.merges", strings(&["a b", "Ġ a"]));
    m.set("tokenizer.ggml.bos_token_id", Value::U32(0));
    m.set("tokenizer.ggml.eos_token_id", Value::U32(0));
    m
}

/// A small valid SentencePiece vocabulary with byte fallback for 'x' only.
fn spm_meta() -> Metadata {
    let mut m = Metadata::new();
    m.set("tokenizer.ggml.model", Value::String("llama".into()));
    m.set(
        "tokenizer.ggml.tokens",
        strings(&["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab", "<0x78>"]),
    );
    m.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vec![
            0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -1.5, -0.5, 0.0,
        ])),
    );
    m.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![2, 3, 3, 1, 1, 1, 1, 1, 6])),
    );
    m
}

fn err(meta: &Metadata) -> TokenizerError {
    Tokenizer::from_gguf(meta).expect_err("metadata should be rejected")
}

fn assert_names(e: &TokenizerError, needle: &str) {
    assert!(
        e.to_string().contains(needle),
        "error {e:?} does not mention {needle}"
    );
}

#[test]
fn valid_small_vocabularies_work() {
    let bpe = Tokenizer::from_gguf(&bpe_meta()).unwrap();
    assert_eq!(bpe.encode("ab a\n", false, false), [5, 6, 4]);
    assert_eq!(bpe.encode("ab<|im_end|>", false, true), [5, 7]);
    assert_eq!(bpe.decode(&[5, 6, 4, 7], true), "ab a\n<|im_end|>");
    assert!(bpe.is_eog(7) && bpe.is_eog(0));

    let spm = Tokenizer::from_gguf(&spm_meta()).unwrap();
    // "▁ab" scores best; 'x' falls back to its byte token.
    assert_eq!(spm.encode("ab x", true, false), [1, 7, 3, 8]);
    // As llama_detokenize: the prefixed space is dropped from the first token only.
    assert_eq!(spm.decode(&[7, 3, 8], false), "ab x");
    assert_eq!(spm.decode(&[1, 7, 3, 8], false), " ab x");
}

#[test]
fn missing_keys_are_errors() {
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
    ] {
        let mut m = bpe_meta();
        m.remove(key);
        assert_names(&err(&m), key);
    }
}

#[test]
fn wrong_types_are_errors() {
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.tokens", Value::U32(3));
    assert_names(&err(&m), "tokenizer.ggml.tokens");
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.merges", Value::Array(Array::U8(vec![1, 2])));
    assert_names(&err(&m), "tokenizer.ggml.merges");
    let mut m = spm_meta();
    m.set("tokenizer.ggml.scores", strings(&["x"]));
    assert_names(&err(&m), "tokenizer.ggml.scores");
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.add_bos_token", Value::U8(1));
    assert_names(&err(&m), "tokenizer.ggml.add_bos_token");
}

#[test]
fn mismatched_array_lengths_are_errors() {
    let mut m = bpe_meta();
    m.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![1, 1])),
    );
    assert_names(&err(&m), "tokenizer.ggml.token_type");
    let mut m = spm_meta();
    m.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vec![0.0; 20])),
    );
    assert_names(&err(&m), "tokenizer.ggml.scores");
}

#[test]
fn special_token_ids_out_of_range_are_errors() {
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        let mut m = bpe_meta();
        m.set(key, Value::U32(1_000_000));
        let e = err(&m);
        assert_names(&e, key);
        assert_names(&e, "outside the vocabulary");
    }
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.bos_token_id", Value::I32(-1));
    assert_names(&err(&m), "tokenizer.ggml.bos_token_id");
}

#[test]
fn bad_contents_are_errors() {
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.merges", strings(&["a b", "ab"]));
    assert_names(&err(&m), "tokenizer.ggml.merges");
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.merges", strings(&["a "]));
    assert_names(&err(&m), "tokenizer.ggml.merges");
    let mut m = bpe_meta();
    m.set(
        "tokenizer.ggml.tokens",
        strings(&["a", "b", "a", "c", "d", "e", "f", "g"]),
    );
    assert_names(&err(&m), "appears twice");
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.tokens", strings(&[]));
    m.remove("tokenizer.ggml.token_type");
    assert_names(&err(&m), "empty");
    let mut m = spm_meta();
    let mut tokens = vec!["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab"];
    tokens.push("<0xZZ>");
    m.set("tokenizer.ggml.tokens", strings(&tokens));
    assert_names(&err(&m), "<0xHH>");
}

#[test]
fn unsupported_models_and_pre_tokenizers_are_errors() {
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.model", Value::String("bert".into()));
    assert!(matches!(err(&m), TokenizerError::Unsupported(_)));
    let mut m = bpe_meta();
    m.set("tokenizer.ggml.pre", Value::String("made-up".into()));
    let e = err(&m);
    assert!(matches!(e, TokenizerError::Unsupported(_)));
    assert_names(&e, "made-up");
}

/// Deterministic pseudo-random text over a mix of scripts, whitespace and
/// special-token fragments.
fn texts() -> Vec<String> {
    let alphabet: Vec<&str> = vec![
        "a",
        "b",
        "ab",
        " ",
        "  ",
        "\n",
        "\t",
        "\r",
        "x",
        "é",
        "中",
        "🦙",
        "\u{301}",
        "'s",
        "1",
        "23",
        "!",
        "<|im_end|>",
        "<|im_",
        "<s>",
        "▁",
        "\u{0}",
        "\u{3000}",
        "𓀀",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out = vec![String::new()];
    for _ in 0..400 {
        let mut s = String::new();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for _ in 0..(state % 24) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.push_str(alphabet[(state % alphabet.len() as u64) as usize]);
        }
        out.push(s);
    }
    out
}

#[test]
fn odd_vocabularies_never_panic() {
    // No byte characters for most bytes, no byte tokens: unknown text is dropped, not a panic.
    let mut sparse_bpe = bpe_meta();
    sparse_bpe.set("tokenizer.ggml.pre", Value::String("qwen2".into()));
    let mut no_types = bpe_meta();
    no_types.remove("tokenizer.ggml.token_type");
    no_types.set("tokenizer.ggml.pre", Value::String("default".into()));
    let mut spm_no_unk = spm_meta();
    spm_no_unk.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![1, 3, 3, 1, 1, 1, 1, 1, 6])),
    );
    spm_no_unk.set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let mut smollm_pre = bpe_meta();
    smollm_pre.set("tokenizer.ggml.pre", Value::String("smollm".into()));
    let mut llama3_pre = bpe_meta();
    llama3_pre.set("tokenizer.ggml.pre", Value::String("llama-bpe".into()));

    for meta in [
        bpe_meta(),
        spm_meta(),
        sparse_bpe,
        no_types,
        spm_no_unk,
        smollm_pre,
        llama3_pre,
    ] {
        let tok = Tokenizer::from_gguf(&meta).unwrap();
        for text in texts() {
            for (add, parse) in [(false, false), (true, true)] {
                let ids = tok.encode(&text, add, parse);
                assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
                let _ = tok.decode(&ids, true);
            }
        }
        // Ids outside the vocabulary (an output layer larger than the vocabulary) decode to nothing.
        assert_eq!(tok.decode(&[u32::MAX, tok.vocab_size() as u32], true), "");
        assert!(tok.token_to_piece(u32::MAX, true).is_empty());
        assert!(!tok.is_eog(u32::MAX));
    }
}
