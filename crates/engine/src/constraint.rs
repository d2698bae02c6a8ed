//! Constrained decoding: a grammar (a JSON schema, a regular expression or a
//! Lark grammar) that every generated token must keep the output inside,
//! through llguidance (the library llama.cpp and vLLM use: an Earley parser
//! over a lexer of derivative-based regular expressions, walking a trie of
//! the vocabulary to compute each step's token mask in well under a
//! millisecond).
//!
//! [`Grammars`] indexes the model's vocabulary once; [`Grammars::compile`]
//! turns a request's [`Grammar`] into a [`Constraint`], one sequence's
//! parser state. Each step the scheduler asks the constraint for the tokens
//! allowed next ([`Constraint::allowed`], computed while the forward pass
//! runs), bans the others in the logits, samples, and hands the token back
//! ([`Constraint::accept`]). When the grammar is complete only the end token
//! is allowed, so a constrained output always ends valid, unless the token
//! limit cuts it short first.

use crate::backend::TokenMask;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizer::Tokenizer;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// JSON valid for this schema.
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression (whole).
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start` is the top rule).
    Lark(String),
}

/// The vocabulary as llguidance sees it: every token's bytes, with special
/// tokens marked so that no grammar can spell them as text.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Forced text is tokenized as the model would have it.
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false, false)
    }
}

/// A model's vocabulary indexed for constraints; built once, shared by
/// every request.
pub struct Grammars {
    factory: ParserFactory,
    /// Rows of the model's logits (may exceed the tokenizer's vocabulary).
    vocab_size: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl Grammars {
    /// Index `tokenizer`'s tokens for a model whose logits have `vocab_size` rows.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Grammars, String> {
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                if tokenizer.is_control(id) || tokenizer.is_eog(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(tokenizer.token_to_piece(id, true));
                    marked
                } else {
                    tokenizer.token_to_piece(id, false).to_vec()
                }
            })
            .collect();
        let eos = tokenizer
            .eog_ids()
            .first()
            .copied()
            .or(tokenizer.eos())
            .ok_or("the model has no end-of-generation token to end a constrained output")?;
        let info = TokRxInfo {
            tok_end_of_turn: tokenizer.eot(),
            tok_bos: tokenizer.bos(),
            ..TokRxInfo::new(vocab_size as u32, eos)
        };
        let trie = TokTrie::from(&info, &words);
        let env = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&(env as _)).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab_size,
        })
    }

    /// A constraint for one sequence; the error says what is wrong with the grammar.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let top = match grammar {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"}))
            }
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            Grammar::Regex(pattern) => TopLevelGrammar::from_regex(pattern),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(top).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint {
            matcher,
            vocab_size: self.vocab_size,
            allowed: None,
            taken: None,
        })
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
    /// The mask for the next token, once computed.
    allowed: Option<SimpleVob>,
    /// A token taken ahead of [`Constraint::accept`], and how that went.
    taken: Option<(u32, Result<(), String>)>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
            vocab_size: self.vocab_size,
            allowed: self.allowed.clone(),
            taken: self.taken.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Compute the tokens allowed next (the costly part; the scheduler runs
    /// it while the forward pass does).
    pub fn prepare(&mut self) -> Result<(), String> {
        // A token taken ahead was allowed by the mask computed before it.
        if self.allowed.is_none() && self.taken.is_none() {
            let mask = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| e.to_string())?;
            if mask.is_zero() {
                return Err(self
                    .matcher
                    .get_error()
                    .unwrap_or_else(|| "the grammar allows no token here".into()));
            }
            self.allowed = Some(mask);
        }
        Ok(())
    }

    /// The tokens the grammar allows next, as a [`TokenMask`] over the
    /// model's vocabulary.
    pub fn mask(&mut self) -> Result<TokenMask, String> {
        self.prepare()?;
        let allowed = self.allowed.as_ref().expect("prepared");
        let mut words = allowed.as_slice().to_vec();
        words.resize(self.vocab_size.div_ceil(32), 0);
        if let Some(last) = words.last_mut() {
            let used = self.vocab_size % 32;
            if used != 0 {
                *last &= (1u32 << used) - 1;
            }
        }
        Ok(words)
    }

    /// Ban (set to -∞) every logit the grammar does not allow next.
    pub fn restrict(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare()?;
        let allowed = self.allowed.as_ref().expect("prepared");
        for (id, logit) in logits.iter_mut().enumerate().take(self.vocab_size) {
            if !allowed.is_allowed(id as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Move past `token`, the one sampled (or say how it went, when
    /// [`Constraint::accept_ahead`] took it already).
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        match self.taken.take() {
            Some((taken, result)) if taken == token => result,
            Some((taken, _)) => Err(format!(
                "token {token} accepted after {taken} was taken ahead"
            )),
            None => {
                self.allowed = None;
                self.matcher.consume_token(token).map_err(|e| e.to_string())
            }
        }
    }

    /// [`Constraint::accept`] done now (on another thread), for the next
    /// `accept(token)` to report; only once the mask for `token`'s step is
    /// computed (a failed mask says why when the token is taken).
    pub fn accept_ahead(&mut self, token: u32) {
        if self.allowed.is_some() && self.taken.is_none() {
            self.allowed = None;
            let result = self.matcher.consume_token(token).map_err(|e| e.to_string());
            self.taken = Some((token, result));
        }
    }

    /// The grammar is complete and nothing may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
