//! Validation: a request's fields become a [`ValidRequest`] (token ids and
//! generation parameters the scheduler can run as they are), or a list of
//! every field that is wrong. Both APIs share the limits here.

use engine::constraint::{Constraint, Grammar};
use engine::generate::GenerateParams;
use engine::request::MAX_TOP_LOGPROBS;
use engine::sampler::SamplingParams;

use utoipa::openapi::schema::{
    Array, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, Type,
};

use crate::error::FieldError;
use crate::model::Model;

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Longest `job_id`.
pub const MAX_JOB_ID_CHARS: usize = 128;
/// Highest temperature accepted (higher is noise).
pub const MAX_TEMPERATURE: f64 = 100.0;
/// Temperatures below this decode greedily (the limit as the temperature goes to 0).
pub const GREEDY_BELOW: f64 = 1e-4;
/// Repetition penalties accepted; below 1 they favour repetition, and near 0 they overflow.
pub const MIN_REPETITION_PENALTY: f64 = 0.01;
pub const MAX_REPETITION_PENALTY: f64 = 10.0;
/// Recent tokens the repetition penalty looks at (llama.cpp's default).
const PENALTY_LAST_N: usize = 64;

/// Schema of one stop string (for the OpenAPI description).
pub fn stop_string_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_STOP_BYTES))
        .build()
}

/// Schema of a list of stop strings.
pub fn stop_list_schema() -> Array {
    ArrayBuilder::new()
        .items(stop_string_schema())
        .max_items(Some(MAX_STOP_STRINGS))
        .build()
}

/// Schema of an optional list of stop strings (absent or null: none).
pub fn nullable_stop_list_schema() -> Schema {
    Schema::OneOf(
        OneOfBuilder::new()
            .item(stop_list_schema())
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .build(),
    )
}

/// A request the scheduler can run as it is.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
}

/// Sampling and length fields as a request gives them (absent = the API's default).
#[derive(Clone, Debug, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// OpenAI's, in [-2, 2] [0].
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string, OpenAI's form) → bias in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// The model's vocabulary, which `logit_bias` ids must lie in (0: unchecked).
    pub vocab_size: usize,
    /// Log-probabilities with this many alternatives per token (checked by
    /// the route, whose fields say it in their own way).
    pub logprobs: Option<usize>,
}

/// `logprobs` (a flag) and `top_logprobs` (0 to 20 alternatives), as the
/// worker API and OpenAI's chat route take them.
pub fn check_logprobs(
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    errors: &mut Errors,
) -> Option<usize> {
    if let Some(top) = top_logprobs {
        if top as usize > MAX_TOP_LOGPROBS {
            errors.add(
                "top_logprobs",
                "range",
                format!("must be 0 to {MAX_TOP_LOGPROBS}"),
            );
        } else if top > 0 && logprobs != Some(true) {
            errors.add(
                "top_logprobs",
                "requires",
                "top_logprobs needs logprobs: true",
            );
        }
    }
    (logprobs == Some(true))
        .then(|| top_logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS as u32) as usize)
}

/// What an API uses for fields a request leaves out.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// `None`: up to the end of the context.
    pub max_tokens: Option<u32>,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u32,
    pub min_p: f64,
}

/// The worker API's defaults (those of the CLI and llama.cpp).
pub const WORKER_DEFAULTS: Defaults = Defaults {
    max_tokens: Some(256),
    temperature: 0.8,
    top_p: 0.95,
    top_k: 40,
    min_p: 0.05,
};

/// The OpenAI API's defaults: plain sampling at temperature 1, as far as the context allows.
pub const OPENAI_DEFAULTS: Defaults = Defaults {
    max_tokens: None,
    temperature: 1.0,
    top_p: 1.0,
    top_k: 0,
    min_p: 0.0,
};

/// Collects field errors, so that a request hears about all of them at once.
#[derive(Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, field: &str, constraint: &str, message: impl Into<String>) {
        self.0.push(FieldError::new(field, constraint, message));
    }

    /// Check that `value` is finite and within `[min, max]` (an open end where `*_open`).
    fn range(&mut self, field: &str, value: f64, min: (f64, bool), max: f64) {
        let (lo, lo_open) = min;
        let ok =
            value.is_finite() && (if lo_open { value > lo } else { value >= lo }) && value <= max;
        if !ok {
            let bracket = if lo_open { '(' } else { '[' };
            self.add(
                field,
                "range",
                format!("must be a number in {bracket}{lo}, {max}], got {value}"),
            );
        }
    }
}

/// `job_id`: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`, so that it can appear in logs and URLs as is.
pub fn check_job_id(job_id: &str, errors: &mut Errors) {
    let valid_chars = job_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if job_id.is_empty() || job_id.chars().count() > MAX_JOB_ID_CHARS || !valid_chars {
        errors.add(
            "job_id",
            "pattern",
            format!(
                "must be 1 to {MAX_JOB_ID_CHARS} characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"
            ),
        );
    }
}

/// Most `logit_bias` entries a request may give.
const MAX_LOGIT_BIAS: usize = 1024;

/// `logit_bias` as (token, bias) pairs, sorted by token: ids in the
/// vocabulary, biases in [-100, 100] (OpenAI's range; -100 bans a token).
fn check_logit_bias(fields: &SamplingFields, errors: &mut Errors) -> Vec<(u32, f32)> {
    let Some(map) = &fields.logit_bias else {
        return Vec::new();
    };
    if map.len() > MAX_LOGIT_BIAS {
        errors.add(
            "logit_bias",
            "max_properties",
            format!("at most {MAX_LOGIT_BIAS} tokens, got {}", map.len()),
        );
        return Vec::new();
    }
    let mut out = Vec::with_capacity(map.len());
    for (key, &bias) in map {
        // The key is the client's: shortened and escaped before it is echoed.
        let shown: String = key
            .chars()
            .take(32)
            .collect::<String>()
            .escape_default()
            .to_string();
        let field = format!("logit_bias.{shown}");
        match key.parse::<u32>() {
            Ok(id) if fields.vocab_size == 0 || (id as usize) < fields.vocab_size => {
                errors.range(&field, bias, (-100.0, false), 100.0);
                out.push((id, bias as f32));
            }
            Ok(id) => errors.add(
                &field,
                "token",
                format!(
                    "token id {id} is outside the vocabulary of {}",
                    fields.vocab_size
                ),
            ),
            Err(_) => errors.add(&field, "token", "keys must be token ids (decimal integers)"),
        }
    }
    out.sort_unstable_by_key(|&(id, _)| id);
    out
}

/// Check the sampling fields and build the scheduler's parameters; `seed`
/// is drawn here when the request gave none, so it can be reported.
pub fn check_sampling(
    fields: &SamplingFields,
    defaults: &Defaults,
    errors: &mut Errors,
) -> GenerateParams {
    let temperature = fields.temperature.unwrap_or(defaults.temperature);
    let top_p = fields.top_p.unwrap_or(defaults.top_p);
    let min_p = fields.min_p.unwrap_or(defaults.min_p);
    let repetition_penalty = fields.repetition_penalty.unwrap_or(1.0);
    errors.range("temperature", temperature, (0.0, false), MAX_TEMPERATURE);
    errors.range("top_p", top_p, (0.0, true), 1.0);
    errors.range("min_p", min_p, (0.0, false), 1.0);
    errors.range(
        "repetition_penalty",
        repetition_penalty,
        (MIN_REPETITION_PENALTY, false),
        MAX_REPETITION_PENALTY,
    );
    let presence_penalty = fields.presence_penalty.unwrap_or(0.0);
    let frequency_penalty = fields.frequency_penalty.unwrap_or(0.0);
    errors.range("presence_penalty", presence_penalty, (-2.0, false), 2.0);
    errors.range("frequency_penalty", frequency_penalty, (-2.0, false), 2.0);
    let logit_bias = check_logit_bias(fields, errors);
    if fields.max_tokens == Some(0) {
        errors.add("max_tokens", "range", "must be at least 1");
    }
    if fields.stop.len() > MAX_STOP_STRINGS {
        errors.add(
            "stop",
            "max_items",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                fields.stop.len()
            ),
        );
    } else {
        for (i, stop) in fields.stop.iter().enumerate() {
            if stop.is_empty() || stop.len() > MAX_STOP_BYTES {
                errors.add(
                    &format!("stop[{i}]"),
                    "length",
                    format!("must be 1 to {MAX_STOP_BYTES} bytes, got {}", stop.len()),
                );
            }
        }
    }
    let params = GenerateParams {
        max_tokens: fields
            .max_tokens
            .or(defaults.max_tokens)
            .map_or(usize::MAX, |n| n as usize),
        sampling: SamplingParams {
            // Dividing logits by a vanishing temperature overflows; its limit is greedy decoding.
            temperature: if temperature < GREEDY_BELOW {
                0.0
            } else {
                temperature as f32
            },
            top_k: fields.top_k.unwrap_or(defaults.top_k) as usize,
            // A positive top_p that rounds to 0 as an f32 keeps the most likely token, as any tiny one does.
            top_p: (top_p as f32).max(f32::MIN_POSITIVE),
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
            penalty_last_n: PENALTY_LAST_N,
            presence_penalty: presence_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            logit_bias,
            seed: fields.seed.unwrap_or_else(rand::random),
        },
        stop: fields.stop.clone(),
        logprobs: fields.logprobs,
        constraint: None,
    };
    // The sampler's own check, so that nothing it would refuse gets past here.
    if errors.0.is_empty() {
        if let Err(message) = params.sampling.validate() {
            let field = message.split_whitespace().next().unwrap_or("sampling");
            errors.add(field, "range", message.clone());
        }
    }
    params
}

/// Tokenize `text` (special tokens in it are parsed, as llama.cpp's server
/// does) and check that it leaves room in the context for one generated token.
pub fn check_prompt(model: &Model, field: &str, text: &str, errors: &mut Errors) -> Vec<u32> {
    check_prompt_with(model, field, text, &[], errors)
}

/// [`check_prompt`] where the byte ranges `literal` of `text` are tokenized
/// as text even where they spell a control token (a chat prompt's messages).
pub fn check_prompt_with(
    model: &Model,
    field: &str,
    text: &str,
    literal: &[std::ops::Range<usize>],
    errors: &mut Errors,
) -> Vec<u32> {
    if text.is_empty() {
        errors.add(field, "length", "must not be empty");
        return Vec::new();
    }
    let tokens = model.tokenizer.encode_with_literal(text, true, literal);
    let context = model.info.context_length;
    if tokens.is_empty() {
        errors.add(field, "length", "has no tokens");
    } else if tokens.len() >= context {
        errors.add(
            field,
            "context",
            format!(
                "is {} tokens; the context holds {context}, so it may have at most {}",
                tokens.len(),
                context - 1
            ),
        );
    }
    tokens
}

/// The byte ranges of `rendered` (the prompt the chat template made of
/// `messages`) that must stay text: the contents that spell a control token
/// of the model. They are found by rendering again with each content
/// replaced by a marker and putting the contents back where the markers
/// landed; a template that changes a content (trims it, splits it) makes
/// that differ from `rendered`, and a content that spells a control token is
/// then refused rather than parsed as one.
pub fn literal_contents(
    model: &Model,
    render: &dyn Fn(&[tokenizer::Message]) -> Result<String, tokenizer::TokenizerError>,
    rendered: &str,
    messages: &[tokenizer::Message],
    errors: &mut Errors,
) -> Vec<std::ops::Range<usize>> {
    let tokenizer = &model.tokenizer;
    let spells_control = |text: &str| {
        !text.is_empty()
            && tokenizer.encode(text, false, true) != tokenizer.encode(text, false, false)
    };
    let forging: Vec<bool> = messages
        .iter()
        .map(|m| spells_control(&m.content))
        .collect();
    if !forging.contains(&true) {
        return Vec::new();
    }
    let marker = |i: usize| format!("\u{E000}worker-orcd message {i}\u{E001}");
    let marked: Vec<tokenizer::Message> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| tokenizer::Message::new(m.role.clone(), marker(i)))
        .collect();
    let mut ranges = Vec::new();
    if let Ok(skeleton) = render(&marked) {
        let mut rebuilt = String::with_capacity(rendered.len());
        let mut rest = skeleton.as_str();
        let mut found = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let Some(at) = rest.find(&marker(i)) else {
                break;
            };
            rebuilt.push_str(&rest[..at]);
            found.push((i, rebuilt.len()..rebuilt.len() + m.content.len()));
            rebuilt.push_str(&m.content);
            rest = &rest[at + marker(i).len()..];
        }
        rebuilt.push_str(rest);
        if rebuilt == rendered {
            ranges = found
                .into_iter()
                .filter(|(i, _)| forging[*i])
                .map(|(_, r)| r)
                .collect();
        }
    }
    let kept: usize = ranges.len();
    if kept < forging.iter().filter(|&&f| f).count() {
        for (i, _) in forging.iter().enumerate().filter(|(_, &f)| f) {
            errors.add(
                &format!("messages[{i}].content"),
                "control_token",
                "spells a control token of the model, and the chat template changes this content, so it cannot be kept as text; remove the token",
            );
        }
    }
    ranges
}

/// Finish: the request, or every error found.
/// A grammar for the output, as `/execute`'s `grammar` and the OpenAI
/// routes' `response_format` give it: `{"type": "text"}` (none),
/// `{"type": "json_object"}`, `{"type": "json_schema", "json_schema":
/// {"schema": …}}` (OpenAI's) or `{"type": "json_schema", "schema": …}`,
/// `{"type": "regex", "pattern": …}`, `{"type": "lark", "grammar": …}`.
pub fn parse_grammar(
    value: &serde_json::Value,
    field: &str,
    errors: &mut Errors,
) -> Option<Grammar> {
    let text = |key: &str, errors: &mut Errors| match value.get(key).and_then(|v| v.as_str()) {
        Some(s) if !s.is_empty() => Some(s.to_string()),
        _ => {
            errors.add(
                &format!("{field}.{key}"),
                "required",
                "a non-empty string is required",
            );
            None
        }
    };
    match value.get("type").and_then(|t| t.as_str()) {
        Some("text") => None,
        Some("json_object") => Some(Grammar::JsonObject),
        Some("json_schema") => {
            let schema = value
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .or_else(|| value.get("schema"));
            match schema {
                Some(schema) if schema.is_object() || schema.is_boolean() => {
                    Some(Grammar::JsonSchema(schema.clone()))
                }
                _ => {
                    errors.add(
                        &format!("{field}.json_schema.schema"),
                        "required",
                        "a JSON schema (an object) is required",
                    );
                    None
                }
            }
        }
        Some("regex") => text("pattern", errors).map(Grammar::Regex),
        Some("lark") => text("grammar", errors).map(Grammar::Lark),
        _ => {
            errors.add(
                &format!("{field}.type"),
                "enum",
                "must be text, json_object, json_schema, regex or lark",
            );
            None
        }
    }
}

/// Compile `grammar` for the served model; the error names `field`.
pub fn check_grammar(
    model: &Model,
    field: &str,
    grammar: Option<Grammar>,
    errors: &mut Errors,
) -> Option<Constraint> {
    let grammar = grammar?;
    let compiled = model
        .grammars()
        .and_then(|grammars| grammars.compile(&grammar));
    match compiled {
        Ok(constraint) => Some(constraint),
        Err(message) => {
            errors.add(field, "grammar", message);
            None
        }
    }
}

pub fn finish(
    errors: Errors,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> Result<ValidRequest, Vec<FieldError>> {
    if errors.0.is_empty() {
        Ok(ValidRequest { prompt, params })
    } else {
        Err(errors.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(fields: SamplingFields) -> Vec<FieldError> {
        let mut errors = Errors::default();
        check_sampling(&fields, &WORKER_DEFAULTS, &mut errors);
        errors.0
    }

    #[test]
    fn defaults_are_valid_and_a_seed_is_drawn() {
        let mut errors = Errors::default();
        let a = check_sampling(&SamplingFields::default(), &WORKER_DEFAULTS, &mut errors);
        assert!(errors.0.is_empty());
        assert_eq!(a.max_tokens, 256);
        assert!(a.sampling.validate().is_ok());
        let b = check_sampling(&SamplingFields::default(), &OPENAI_DEFAULTS, &mut errors);
        assert_eq!(b.max_tokens, usize::MAX);
        assert_ne!(a.sampling.seed, b.sampling.seed);
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = check(SamplingFields {
            max_tokens: Some(0),
            temperature: Some(-1.0),
            top_p: Some(0.0),
            min_p: Some(f64::NAN),
            repetition_penalty: Some(f64::INFINITY),
            stop: vec!["ok".into(), String::new()],
            ..Default::default()
        });
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "temperature",
                "top_p",
                "min_p",
                "repetition_penalty",
                "max_tokens",
                "stop[1]"
            ]
        );
        let errors = check(SamplingFields {
            repetition_penalty: Some(0.001),
            ..Default::default()
        });
        assert_eq!(errors[0].field, "repetition_penalty");
        let errors = check(SamplingFields {
            stop: vec!["x".into(); 1000],
            ..Default::default()
        });
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].field.as_str(), errors[0].constraint.as_str()),
            ("stop", "max_items")
        );
    }

    /// Values the schema allows but an f32 cannot hold become their limits.
    #[test]
    fn vanishing_values_take_their_limits() {
        let mut errors = Errors::default();
        let fields = SamplingFields {
            temperature: Some(1e-300),
            top_p: Some(5e-324),
            min_p: Some(1e-300),
            ..Default::default()
        };
        let params = check_sampling(&fields, &WORKER_DEFAULTS, &mut errors);
        assert!(errors.0.is_empty());
        assert_eq!(params.sampling.temperature, 0.0);
        assert!(params.sampling.top_p > 0.0);
        assert!(params.sampling.validate().is_ok());
    }

    #[test]
    fn job_ids() {
        for (id, ok) in [
            ("job-1", true),
            ("a.b_c:d", true),
            ("", false),
            ("has space", false),
            ("ünïcode", false),
            (&"x".repeat(129), false),
        ] {
            let mut errors = Errors::default();
            check_job_id(id, &mut errors);
            assert_eq!(errors.0.is_empty(), ok, "{id:?}");
        }
    }
}
