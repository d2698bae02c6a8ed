//! The two test models' tokenizers against llama.cpp: ids, detokenized text,
//! pieces, special ids and the end-of-generation set recorded by
//! `scripts/ref/tokenize_ref.py` (llama-cpp-python 0.3.36) in
//! `tests/fixtures/tokenize_*.json`, and the streaming decoder on them.

use std::path::PathBuf;

use serde_json::Value;
use tokenizer::{StreamDecoder, Tokenizer};

fn models_dir() -> PathBuf {
    match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/models"),
    }
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The fixture and the tokenizer of the model it was made from.
fn load(name: &str) -> (Value, Tokenizer) {
    let fx = fixture(&format!("tokenize_{name}.json"));
    let path = models_dir().join(fx["model"].as_str().unwrap());
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh (or set WORKER_ORCD_MODELS)",
        path.display()
    );
    let file = gguf::GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(file.metadata()).unwrap();
    (fx, tok)
}

/// A fixture text: a string, or a list of byte values when llama.cpp's
/// output was not UTF-8.
fn bytes_of(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Array(a) => a.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        _ => panic!("not a text: {v}"),
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn opt_id(v: &Value) -> Option<u32> {
    v.as_u64().map(|x| x as u32)
}

fn check_vocab(name: &str) {
    let (fx, tok) = load(name);
    assert_eq!(tok.vocab_size() as u64, fx["n_vocab"].as_u64().unwrap());
    assert_eq!(tok.bos(), opt_id(&fx["bos"]), "bos");
    assert_eq!(tok.eos(), opt_id(&fx["eos"]), "eos");
    assert_eq!(tok.eot(), opt_id(&fx["eot"]), "eot");
    assert_eq!(tok.pad(), opt_id(&fx["pad"]), "pad");
    assert_eq!(tok.add_bos(), fx["add_bos"].as_bool().unwrap(), "add_bos");
    assert_eq!(tok.add_eos(), fx["add_eos"].as_bool().unwrap(), "add_eos");
    assert_eq!(
        tok.eog_ids(),
        ids_of(&fx["eog"]).as_slice(),
        "end-of-generation ids"
    );
    for id in ids_of(&fx["eog"]) {
        assert!(tok.is_eog(id));
    }

    for p in fx["pieces"].as_array().unwrap() {
        let id = p["id"].as_u64().unwrap() as u32;
        assert_eq!(
            tok.token_to_piece(id, false),
            bytes_of(&p["piece"]),
            "piece of {id}"
        );
        assert_eq!(
            tok.token_to_piece(id, true),
            bytes_of(&p["piece_special"]),
            "special piece of {id}"
        );
    }

    let mut failures = Vec::new();
    let cases = fx["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let add_special = case["add_special"].as_bool().unwrap();
        let parse_special = case["parse_special"].as_bool().unwrap();
        let expected = ids_of(&case["ids"]);
        let got = tok.encode(text, add_special, parse_special);
        if got != expected {
            failures.push(format!(
                "encode({text:?}, add_special={add_special}, parse_special={parse_special})\n  llama.cpp: {expected:?}\n  ours:      {got:?}"
            ));
            continue;
        }
        for (special, key) in [(false, "decoded"), (true, "decoded_special")] {
            let want = String::from_utf8_lossy(&bytes_of(&case[key])).into_owned();
            let decoded = tok.decode(&expected, special);
            if decoded != want {
                failures.push(format!("decode({expected:?}, special={special})\n  llama.cpp: {want:?}\n  ours:      {decoded:?}"));
            }
        }
        // Every text round-trips through llama.cpp (checked when making the
        // fixture), so it must through us too.
        if !add_special && tok.decode(&got, true) != text {
            failures.push(format!(
                "{text:?} does not round-trip: {:?}",
                tok.decode(&got, true)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_vocab("smollm2");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_vocab("gemma3");
}

/// Feeding the fixture ids one by one: every chunk is whole characters, the
/// chunks add up to the text, and characters split across tokens (byte-level
/// BPE pieces, SentencePiece byte fallback) are held back until complete.
fn check_stream(name: &str) {
    let (fx, tok) = load(name);
    let mut held_back = 0;
    for case in fx["cases"].as_array().unwrap() {
        if case["add_special"].as_bool().unwrap() {
            continue;
        }
        let text = case["text"].as_str().unwrap();
        let mut stream = StreamDecoder::new(true);
        let mut out = String::new();
        let mut all = Vec::new();
        for id in ids_of(&case["ids"]) {
            all.extend_from_slice(tok.token_to_piece(id, true));
            if let Some(chunk) = stream.push(&tok, id) {
                assert!(
                    !chunk.contains('\u{FFFD}'),
                    "{name}: {text:?}: a character was split"
                );
                out.push_str(&chunk);
            }
            // What is held back is exactly an unfinished character.
            let held = &all[out.len()..];
            assert_eq!(stream.has_pending(), !held.is_empty());
            if !held.is_empty() {
                let err = std::str::from_utf8(held).unwrap_err();
                assert!(
                    err.valid_up_to() == 0 && err.error_len().is_none(),
                    "{name}: {text:?}: held back {held:?}"
                );
                held_back += 1;
            }
        }
        out.push_str(&stream.flush());
        assert_eq!(out, text, "{name}: streamed text");
    }
    assert!(
        held_back > 0,
        "{name}: no case split a character across tokens; the test proves nothing"
    );
}

#[test]
fn smollm2_stream_decoder_never_splits_characters() {
    check_stream("smollm2");
}

#[test]
fn gemma3_stream_decoder_never_splits_characters() {
    check_stream("gemma3");
}

#[test]
fn gemma3_byte_fallback_streams_one_character() {
    let (_, tok) = load("gemma3");
    // U+13000 EGYPTIAN HIEROGLYPH A001 is not in Gemma's vocabulary: four byte tokens.
    let ids = tok.encode("𓀀", false, false);
    let bytes: Vec<&[u8]> = ids
        .iter()
        .map(|&id| tok.token_to_piece(id, false))
        .collect();
    assert_eq!(bytes.concat(), "𓀀".as_bytes());
    assert!(ids.len() >= 2, "expected byte tokens, got {ids:?}");
    let mut stream = StreamDecoder::new(false);
    let (last, init) = ids.split_last().unwrap();
    for &id in init {
        assert_eq!(stream.push(&tok, id), None);
        assert!(stream.has_pending());
    }
    assert_eq!(stream.push(&tok, *last).as_deref(), Some("𓀀"));
    assert_eq!(stream.flush(), "");
}

#[test]
fn stream_decoder_flushes_an_unfinished_character_as_replacement() {
    let (_, tok) = load("smollm2");
    // The first byte of "🦙" alone (F0), as a byte-level BPE token.
    let ids = tok.encode("🦙", false, false);
    let first = ids[0];
    assert!(std::str::from_utf8(tok.token_to_piece(first, false)).is_err());
    let mut stream = StreamDecoder::new(false);
    assert_eq!(stream.push(&tok, first), None);
    assert_eq!(stream.flush(), "\u{FFFD}");
}
