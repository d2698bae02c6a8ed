//! The OpenAI-compatible API: `/v1/chat/completions` (through the model's
//! chat template), `/v1/completions` and `/v1/models`, streamed (SSE
//! `data:` chunks ending with `data: [DONE]`) or not, with `usage`.
//! Fields the worker cannot honour (`n` > 1, `echo`, `suffix`, `audio`,
//! the deprecated `functions`, …) are refused with 400 rather than ignored;
//! fields it does not know are accepted, ignored and logged (as llama-server
//! and vLLM do), so that clients sending newer or other servers' fields work.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::constraint::Grammar;
use engine::generate::StopReason;
use engine::request::TokenLogprob;
use engine::scheduler::{Event, Finish};
use serde::{Deserialize, Serialize};
use tokenizer::{Message, Tokenizer};
use tracing::info;
use utoipa::openapi::schema::{
    ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::error::{ApiError, OpenAiError, OpenAiErrorBody, OpenAiJson};
use crate::jobs::{self, RunningJob};
use crate::tools::{self, Choice, Tool, ToolCall, ToolFormat};
use crate::validate::{self, Defaults, Errors, SamplingFields, ValidRequest, OPENAI_DEFAULTS};
use crate::worker_api::KEEP_ALIVE;
use crate::AppState;

/// `/v1/completions` generates 16 tokens unless told otherwise, as OpenAI's does.
const COMPLETIONS_DEFAULTS: Defaults = Defaults {
    max_tokens: Some(16),
    ..OPENAI_DEFAULTS
};

/// `stop`: one string or a list.
#[derive(Debug)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Deserialize a field that is one string or a list of them, with an error
/// that says so (serde's untagged enums only say no variant matched).
macro_rules! one_or_many {
    ($ty:ident, $one:ident, $many:ident, $expected:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                match serde_json::Value::deserialize(d)? {
                    serde_json::Value::String(s) => Ok($ty::$one(s)),
                    serde_json::Value::Array(items) => items
                        .into_iter()
                        .map(|item| match item {
                            serde_json::Value::String(s) => Ok(s),
                            _ => Err(serde::de::Error::custom(concat!("must be ", $expected))),
                        })
                        .collect::<Result<_, _>>()
                        .map($ty::$many),
                    _ => Err(serde::de::Error::custom(concat!("must be ", $expected))),
                }
            }
        }
    };
}

one_or_many!(Stop, One, Many, "a string or an array of strings");

impl PartialSchema for Stop {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(crate::validate::stop_string_schema())
            .item(crate::validate::stop_list_schema())
            .into()
    }
}

impl ToSchema for Stop {}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Other fields (`include_obfuscation`, …) are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    pub include_usage: Option<bool>,
}

/// Declares a request struct with the fields both generation routes share
/// (serde cannot deny unknown fields through `#[serde(flatten)]`), and a
/// method taking those fields out as [`CommonFields`].
macro_rules! with_common_fields {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($own)*
            /// Accepted and ignored: the worker serves one model.
            pub model: Option<String>,
            /// In [0, 100]; 0 is greedy [1].
            #[schema(minimum = 0.0, maximum = 100.0)]
            pub temperature: Option<f64>,
            /// In (0, 1] [1].
            #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
            pub top_p: Option<f64>,
            /// Extension (llama.cpp, vLLM): 0 disables [0].
            #[schema(value_type = Option<i64>, minimum = 0, maximum = 4294967295.0)]
            #[serde(default, deserialize_with = "crate::de::option_u32")]
            pub top_k: Option<u32>,
            /// Extension: in [0, 1] [0].
            #[schema(minimum = 0.0, maximum = 1.0)]
            pub min_p: Option<f64>,
            /// Extension: in [0.01, 10]; 1 disables [1].
            #[schema(minimum = 0.01, maximum = 10.0)]
            pub repetition_penalty: Option<f64>,
            #[schema(value_type = Option<i64>, minimum = 0, maximum = 18446744073709551615.0)]
            #[serde(default, deserialize_with = "crate::de::option_u64")]
            pub seed: Option<u64>,
            /// At most 16 strings of 1 to 256 bytes.
            pub stop: Option<Stop>,
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            /// Only 1.
            #[schema(value_type = Option<i64>, minimum = 1, maximum = 1)]
            #[serde(default, deserialize_with = "crate::de::option_u32")]
            pub n: Option<u32>,
            /// In [-2, 2]: subtracted once from the logit of every token generated so far [0].
            #[schema(minimum = -2.0, maximum = 2.0)]
            pub presence_penalty: Option<f64>,
            /// In [-2, 2]: subtracted from a token's logit per time it was generated [0].
            #[schema(minimum = -2.0, maximum = 2.0)]
            pub frequency_penalty: Option<f64>,
            /// Token id → bias in [-100, 100], added to the token's logit (-100 bans it).
            pub logit_bias: Option<HashMap<String, f64>>,
            /// Accepted and ignored.
            pub user: Option<String>,
            /// Accepted and ignored.
            #[schema(value_type = Option<Object>)]
            pub metadata: Option<serde_json::Value>,
            /// Accepted and ignored (nothing is stored).
            pub store: Option<bool>,
            /// Accepted; with tools in `auto`, the model may make several calls.
            pub parallel_tool_calls: Option<bool>,
            /// Accepted and ignored.
            pub service_tier: Option<String>,
            /// Fields not listed: accepted and ignored (their names are logged).
            #[serde(flatten)]
            #[schema(ignore)]
            pub ignored: std::collections::BTreeMap<String, serde_json::Value>,
            /// `{"type": "text"}`, `{"type": "json_object"}` (any JSON object) or
            /// `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}}}`:
            /// the output keeps to it (constrained decoding). Extensions:
            /// `{"type": "regex", "pattern": …}`, `{"type": "lark", "grammar": …}`.
            #[schema(value_type = Option<Object>)]
            pub response_format: Option<serde_json::Value>,
        }

        impl $name {
            /// Logs the fields that were accepted and ignored.
            fn log_ignored(&self) {
                if !self.ignored.is_empty() {
                    let names: Vec<String> = self
                        .ignored
                        .keys()
                        .take(16)
                        .map(|k| k.chars().take(64).collect())
                        .collect();
                    tracing::info!(fields = ?names, "request fields ignored");
                }
            }

            fn take_common(&mut self) -> CommonFields {
                CommonFields {
                    temperature: self.temperature.take(),
                    top_p: self.top_p.take(),
                    top_k: self.top_k.take(),
                    min_p: self.min_p.take(),
                    repetition_penalty: self.repetition_penalty.take(),
                    seed: self.seed.take(),
                    stop: self.stop.take(),
                    stream: self.stream.take(),
                    stream_options: self.stream_options.take(),
                    n: self.n.take(),
                    presence_penalty: self.presence_penalty.take(),
                    frequency_penalty: self.frequency_penalty.take(),
                    logit_bias: self.logit_bias.take(),
                    response_format: self.response_format.take(),
                }
            }
        }
    };
}

/// `false` or null: for flags the worker cannot honour.
fn only_false() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Boolean, Type::Null]))
        .enum_values(Some([
            serde_json::Value::Bool(false),
            serde_json::Value::Null,
        ]))
        .build()
}

/// Null: for fields the worker cannot honour at all.
fn only_null() -> Object {
    ObjectBuilder::new().schema_type(Type::Null).build()
}

/// The fields both generation routes share, as given.
struct CommonFields {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<HashMap<String, f64>>,
    response_format: Option<serde_json::Value>,
}

impl CommonFields {
    /// Check the fields the worker cannot honour; build the sampling fields.
    fn check(
        self,
        max_tokens: Option<u32>,
        logprobs: Option<usize>,
        vocab_size: usize,
        errors: &mut Errors,
    ) -> (SamplingFields, StreamMode, Option<Grammar>) {
        let grammar = self
            .response_format
            .as_ref()
            .and_then(|f| validate::parse_grammar(f, "response_format", errors));
        if self.n.is_some_and(|n| n != 1) {
            errors.add("n", "range", "only n = 1 is supported");
        }
        let stream = StreamMode {
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            logprobs: logprobs.is_some(),
            tools: None,
        };
        let fields = SamplingFields {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            seed: self.seed,
            stop: self.stop.map(Stop::into_vec).unwrap_or_default(),
            vocab_size,
            logprobs,
        };
        (fields, stream, grammar)
    }
}

#[derive(Clone, Copy, Debug)]
struct StreamMode {
    stream: bool,
    include_usage: bool,
    /// The response reports log-probabilities.
    logprobs: bool,
    /// Tool calls are read out of the output, written this way.
    tools: Option<ToolFormat>,
}

with_common_fields! {
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Tokens to generate at most [to the end of the context].
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens`; wins when both are given.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub max_completion_tokens: Option<u32>,
    /// Report each generated token's log-probability (`choices[].logprobs.content`) [false].
    pub logprobs: Option<bool>,
    /// With `logprobs`: the 0 to 20 most likely tokens at each position, with theirs [0].
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub top_logprobs: Option<u32>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<serde_json::Value>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function", "function": {"name": …}}`;
    /// the last two are enforced by constrained decoding.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    /// Only absent (or null): no audio output.
    #[schema(schema_with = only_null)]
    pub audio: Option<serde_json::Value>,
    /// Only `["text"]`.
    pub modalities: Option<Vec<String>>,
    /// Only absent (or null): deprecated by OpenAI, use `tools`.
    #[schema(schema_with = only_null)]
    pub functions: Option<serde_json::Value>,
    /// Only absent (or null): deprecated by OpenAI, use `tool_choice`.
    #[schema(schema_with = only_null)]
    pub function_call: Option<serde_json::Value>,
    /// Only absent (or null): no web search.
    #[schema(schema_with = only_null)]
    pub web_search_options: Option<serde_json::Value>,
}
}

/// Other fields (`refusal`, `annotations`, `audio`, … as a client copies a
/// response's message back into the next request) are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Option<MessageContent>,
    /// Accepted and ignored.
    pub name: Option<String>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// Treated as `system`.
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The role as the chat template sees it.
    fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// Text, or a list of text parts.
#[derive(Debug)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl PartialSchema for MessageContent {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ArrayBuilder::new().items(ContentPart::schema()))
            .into()
    }
}

impl ToSchema for MessageContent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        // The parts' schema is inlined above; the kind it refers to is a component.
        schemas.push((PartKind::name().into_owned(), PartKind::schema()));
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(MessageContent::Text(s)),
            serde_json::Value::Array(parts) => parts
                .into_iter()
                .enumerate()
                .map(|(i, part)| {
                    ContentPart::deserialize(part)
                        .map_err(|e| D::Error::custom(format!("part {i}: {e}")))
                })
                .collect::<Result<_, _>>()
                .map(MessageContent::Parts),
            _ => Err(D::Error::custom(
                "must be a string or an array of text parts ({\"type\": \"text\", \"text\": …})",
            )),
        }
    }
}

/// Other fields (`cache_control`, …) are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: PartKind,
    pub text: String,
}

/// Only text parts are supported.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    Text,
}

impl ChatCompletionRequest {
    fn validate(
        mut self,
        state: &AppState,
        type_errors: Vec<crate::error::FieldError>,
    ) -> Result<(ValidRequest, StreamMode), Vec<crate::error::FieldError>> {
        let mut errors = Errors(type_errors);
        self.log_ignored();
        for (field, given, why) in [
            ("audio", self.audio.take(), "audio output is not supported"),
            (
                "functions",
                self.functions.take(),
                "functions is deprecated: use tools",
            ),
            (
                "function_call",
                self.function_call.take(),
                "function_call is deprecated: use tool_choice",
            ),
            (
                "web_search_options",
                self.web_search_options.take(),
                "web search is not supported",
            ),
        ] {
            if given.is_some_and(|v| !v.is_null()) {
                errors.add(field, "unsupported", why);
            }
        }
        if self
            .modalities
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| m != "text"))
        {
            errors.add("modalities", "unsupported", "only text output is supported");
        }
        let logprobs = validate::check_logprobs(self.logprobs, self.top_logprobs, &mut errors);
        for (field, value) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            if value == Some(0) {
                errors.add(field, "range", "must be at least 1");
            }
        }
        // Both were checked just above: a 0 is not named again.
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .filter(|&n| n > 0);
        let (fields, stream, grammar) = self.take_common().check(
            max_tokens,
            logprobs,
            state.model.info.vocab_size,
            &mut errors,
        );
        let mut params = validate::check_sampling(&fields, &OPENAI_DEFAULTS, &mut errors);
        params.constraint =
            validate::check_grammar(&state.model, "response_format", grammar, &mut errors);
        let tools = self
            .tools
            .as_ref()
            .map(|t| tools::parse_tools(t, &mut errors))
            .unwrap_or_default();
        let choice = tools::parse_choice(self.tool_choice.as_ref(), &tools, &mut errors);
        if self.messages.is_empty() {
            errors.add("messages", "min_items", "at least one message is needed");
        }
        let turns: Vec<Turn> = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| Turn::of(i, m, &mut errors))
            .collect();
        if !errors.0.is_empty() {
            return Err(errors.0);
        }
        let Some(template) = &state.model.template else {
            errors.add(
                "messages",
                "unsupported",
                "the model has no usable chat template (see the worker's log); use /v1/completions, or start the worker with --chat-template FILE",
            );
            return Err(errors.0);
        };
        let native = ToolFormat::of_template(template.source());
        let offered: &[Tool] = if choice == Choice::None { &[] } else { &tools };
        let render =
            |messages: &[Message]| render_turns(template, native, offered, &turns, messages);
        let messages: Vec<Message> = turns.iter().map(|t| t.message.clone()).collect();
        let prompt = match render(&messages) {
            Ok(text) => {
                // What the messages say is text, whatever it spells: control
                // tokens are parsed only in what the template added.
                let literal = validate::literal_contents(
                    &state.model,
                    &render,
                    &text,
                    &messages,
                    &mut errors,
                );
                validate::check_prompt_with(&state.model, "messages", &text, &literal, &mut errors)
            }
            Err(e) => {
                errors.add("messages", "template", e.to_string());
                Vec::new()
            }
        };
        let mut stream = stream;
        if !offered.is_empty() {
            let format = native.unwrap_or(ToolFormat::Hermes);
            stream.tools = Some(format);
            if let Some(grammar) = format.grammar(offered, &choice) {
                if params.constraint.is_some() {
                    errors.add(
                        "response_format",
                        "conflict",
                        "cannot be combined with a tool_choice that forces a call",
                    );
                } else {
                    params.constraint = validate::check_grammar(
                        &state.model,
                        "tool_choice",
                        Some(grammar),
                        &mut errors,
                    );
                }
            }
        }
        validate::finish(errors, prompt, params).map(|v| (v, stream))
    }
}

/// One message of a chat, checked: its text for the template, and the
/// tool-call fields that travel with it.
struct Turn {
    message: Message,
    /// An assistant turn's calls (id, call).
    calls: Vec<(String, ToolCall)>,
    tool_call_id: Option<String>,
}

impl Turn {
    fn of(i: usize, m: ChatMessage, errors: &mut Errors) -> Turn {
        let mut calls = Vec::new();
        for (j, call) in m.tool_calls.iter().flatten().enumerate() {
            let field = format!("messages[{i}].tool_calls[{j}]");
            let function = call.get("function");
            let name = function
                .and_then(|f| f.get("name"))
                .and_then(|n| n.as_str());
            let arguments = function
                .and_then(|f| f.get("arguments"))
                .map(|a| a.as_str().map_or_else(|| a.to_string(), String::from));
            match (name, arguments) {
                (Some(name), Some(arguments)) if m.role == Role::Assistant => {
                    let id = call
                        .get("id")
                        .and_then(|v| v.as_str())
                        .map_or_else(tools::call_id, String::from);
                    calls.push((
                        id,
                        ToolCall {
                            name: name.to_string(),
                            arguments,
                        },
                    ));
                }
                (Some(_), Some(_)) => {
                    errors.add(&field, "role", "only an assistant turn makes tool calls")
                }
                _ => errors.add(
                    &format!("{field}.function"),
                    "required",
                    "a name and arguments (a JSON string) are required",
                ),
            }
        }
        let content = match m.content {
            // Only an assistant turn may come without content (OpenAI's rule:
            // one that made tool calls); anything else has to say something.
            None if m.role == Role::Assistant => String::new(),
            None => {
                errors.add(
                    &format!("messages[{i}].content"),
                    "required",
                    "content is required (a string or an array of text parts)",
                );
                String::new()
            }
            Some(MessageContent::Text(text)) => text,
            Some(MessageContent::Parts(parts)) => parts.into_iter().map(|p| p.text).collect(),
        };
        Turn {
            message: Message::new(m.role.template_name(), content),
            calls,
            tool_call_id: m.tool_call_id,
        }
    }
}

/// The prompt of `turns` with their contents replaced by `contents` (the
/// same or markers, see [`validate::literal_contents`]). A template that
/// takes tools gets them and the turns' tool fields; one that does not gets
/// the tools described in the system message, calls written in the Hermes
/// syntax and tool results as user turns.
fn render_turns(
    template: &tokenizer::ChatTemplate,
    native: Option<ToolFormat>,
    offered: &[Tool],
    turns: &[Turn],
    contents: &[Message],
) -> Result<String, tokenizer::TokenizerError> {
    let has_tool_fields = turns
        .iter()
        .any(|t| !t.calls.is_empty() || t.tool_call_id.is_some());
    if offered.is_empty() && !has_tool_fields {
        return template.render(contents, true);
    }
    let mut messages: Vec<serde_json::Value> = Vec::with_capacity(turns.len() + 1);
    match native {
        Some(_) => {
            for (turn, message) in turns.iter().zip(contents) {
                let mut m = serde_json::json!({"role": message.role, "content": message.content});
                if !turn.calls.is_empty() {
                    m["tool_calls"] = turn
                        .calls
                        .iter()
                        .map(|(id, call)| {
                            let arguments: serde_json::Value = serde_json::from_str(&call.arguments)
                                .unwrap_or_else(|_| call.arguments.clone().into());
                            serde_json::json!({"id": id, "type": "function",
                                               "function": {"name": call.name, "arguments": arguments}})
                        })
                        .collect();
                }
                if let Some(id) = &turn.tool_call_id {
                    m["tool_call_id"] = id.clone().into();
                }
                messages.push(m);
            }
            let specs: Vec<serde_json::Value> = offered.iter().map(|t| t.spec.clone()).collect();
            let specs = serde_json::Value::Array(specs);
            template.render_json(
                &serde_json::Value::Array(messages),
                (!offered.is_empty()).then_some(&specs),
                true,
            )
        }
        None => {
            let format = ToolFormat::Hermes;
            let description = (!offered.is_empty()).then(|| tools::describe_tools(offered));
            let mut described = false;
            for (turn, message) in turns.iter().zip(contents) {
                let mut role = message.role.clone();
                let mut content = message.content.clone();
                if role == "system" && !described {
                    if let Some(d) = &description {
                        content = format!("{content}\n\n{d}");
                        described = true;
                    }
                }
                for (_, call) in &turn.calls {
                    content = format!("{content}\n{}", format.write(call));
                }
                if role == "tool" {
                    role = "user".into();
                    content = format!("<tool_response>\n{content}\n</tool_response>");
                }
                messages.push(serde_json::json!({"role": role, "content": content}));
            }
            if let (Some(d), false) = (description, described) {
                messages.insert(0, serde_json::json!({"role": "system", "content": d}));
            }
            template.render_json(&serde_json::Value::Array(messages), None, true)
        }
    }
}

with_common_fields! {
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The text to continue: a string, or a list holding one string.
    pub prompt: PromptInput,
    /// Tokens to generate at most [16].
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub max_tokens: Option<u32>,
    /// Only `false`.
    #[schema(schema_with = only_false)]
    pub echo: Option<bool>,
    /// Only absent (or null).
    #[schema(schema_with = only_null)]
    pub suffix: Option<String>,
    /// Only 1.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub best_of: Option<u32>,
    /// Report each generated token's log-probability with this many (0 to
    /// 20) of the most likely tokens at its position (`choices[].logprobs`).
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub logprobs: Option<u32>,
}
}

#[derive(Debug)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
}

one_or_many!(PromptInput, Text, Texts, "a string or an array of strings");

impl PartialSchema for PromptInput {
    fn schema() -> RefOr<Schema> {
        let text = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
        };
        OneOfBuilder::new()
            .item(text())
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .min_items(Some(1))
                    .max_items(Some(1)),
            )
            .into()
    }
}

impl ToSchema for PromptInput {}

impl CompletionRequest {
    fn validate(
        mut self,
        state: &AppState,
        type_errors: Vec<crate::error::FieldError>,
    ) -> Result<(ValidRequest, StreamMode), Vec<crate::error::FieldError>> {
        let mut errors = Errors(type_errors);
        self.log_ignored();
        if self.echo == Some(true) {
            errors.add("echo", "unsupported", "echo is not supported");
        }
        if self.suffix.is_some() {
            errors.add("suffix", "unsupported", "suffix is not supported");
        }
        if self.best_of.is_some_and(|n| n != 1) {
            errors.add("best_of", "range", "only best_of = 1 is supported");
        }
        if self
            .logprobs
            .is_some_and(|n| n as usize > engine::request::MAX_TOP_LOGPROBS)
        {
            errors.add("logprobs", "range", "must be 0 to 20");
        }
        let logprobs = self
            .logprobs
            .map(|n| (n as usize).min(engine::request::MAX_TOP_LOGPROBS));
        let (fields, stream, grammar) = self.take_common().check(
            self.max_tokens,
            logprobs,
            state.model.info.vocab_size,
            &mut errors,
        );
        let mut params = validate::check_sampling(&fields, &COMPLETIONS_DEFAULTS, &mut errors);
        params.constraint =
            validate::check_grammar(&state.model, "response_format", grammar, &mut errors);
        let text = match self.prompt {
            PromptInput::Text(text) => text,
            PromptInput::Texts(mut texts) if texts.len() == 1 => texts.pop().expect("one"),
            PromptInput::Texts(_) => {
                errors.add(
                    "prompt",
                    "max_items",
                    "exactly one prompt per request is supported",
                );
                String::new()
            }
        };
        let prompt = if text.is_empty() && !errors.0.is_empty() {
            Vec::new()
        } else {
            validate::check_prompt(&state.model, "prompt", &text, &mut errors)
        };
        validate::finish(errors, prompt, params).map(|v| (v, stream))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    fn of(finish: &Finish) -> Usage {
        Usage {
            prompt_tokens: finish.prompt_tokens,
            completion_tokens: finish.tokens_out,
            total_tokens: finish.prompt_tokens + finish.tokens_out,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: finish.cached_tokens,
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// `stop` (also for a cancelled job, see `finish_cause`), `tool_calls`, or `length`.
    pub finish_reason: String,
    /// Extension: why generation ended, as `/execute`'s `stop_reason`
    /// (`EOS`, `STOP_SEQUENCE`, `MAX_TOKENS`, `CANCELLED`); with `finish_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_cause: Option<String>,
    /// With `logprobs: true`; otherwise null.
    pub logprobs: Option<ChatLogprobs>,
}

/// The generated tokens' log-probabilities (chat).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    /// The token's text (bytes that are not whole UTF-8 characters become U+FFFD).
    pub token: String,
    /// Natural log of its probability under the model, before sampling settings.
    pub logprob: f32,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// The generated tokens' log-probabilities (completions, OpenAI's legacy form).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token: the most likely tokens' text → log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Where each token's text starts in the completion, in characters.
    pub text_offset: Vec<usize>,
}

/// A generated token's id and log-probabilities.
type Scored = (u32, TokenLogprob);

fn piece(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_to_piece(id, true).to_vec();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprobs(tokenizer: &Tokenizer, scored: &[Scored]) -> ChatLogprobs {
    let content = scored
        .iter()
        .map(|(id, lp)| {
            let (token, bytes) = piece(tokenizer, *id);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = piece(tokenizer, id);
                    TopLogprob {
                        token,
                        logprob,
                        bytes,
                    }
                })
                .collect();
            ChatTokenLogprob {
                token,
                logprob: lp.logprob,
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}

/// `scored` in the completions form, text offsets counted from `offset`
/// characters (advanced past them).
fn completion_logprobs(
    tokenizer: &Tokenizer,
    scored: &[Scored],
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for (id, lp) in scored {
        let (token, _) = piece(tokenizer, *id);
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(id, logprob)| (piece(tokenizer, id).0, logprob))
                .collect(),
        );
    }
    out
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    /// The reply's text (null when it is only tool calls).
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ResponseToolCall>>,
}

/// A call the model made.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseToolCall {
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments, a JSON text.
    pub arguments: String,
}

impl ResponseToolCall {
    fn new(call: ToolCall) -> Self {
        ResponseToolCall {
            id: tools::call_id(),
            kind: "function".into(),
            function: FunctionCall {
                name: call.name,
                arguments: call.arguments,
            },
        }
    }
}

/// A call in a stream chunk (all of it at once).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeltaToolCall {
    pub index: usize,
    #[serde(flatten)]
    pub call: ResponseToolCall,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Only in the last chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<String>,
    /// Extension: why generation ended, as `/execute`'s `stop_reason`
    /// (`EOS`, `STOP_SEQUENCE`, `MAX_TOKENS`, `CANCELLED`); with `finish_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_cause: Option<String>,
    /// With `logprobs: true`: those of the tokens whose text this chunk carries.
    pub logprobs: Option<ChatLogprobs>,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// `text_completion`, streamed or not.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Always present when not streaming; when streaming, only in the last chunk with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// `stop` (also for a cancelled job, see `finish_cause`) or `length`; null in chunks before the last.
    pub finish_reason: Option<String>,
    /// Extension: why generation ended, as `/execute`'s `stop_reason`
    /// (`EOS`, `STOP_SEQUENCE`, `MAX_TOKENS`, `CANCELLED`); with `finish_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_cause: Option<String>,
    /// With `logprobs`; otherwise null.
    pub logprobs: Option<CompletionLogprobs>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens => "length",
        StopReason::Eos | StopReason::StopSequence => "stop",
        // OpenAI has no value for a stop asked for by someone else (`/cancel`,
        // a disconnect, a shutdown's deadline): `finish_cause` says it.
        StopReason::Cancelled => "stop",
    }
}

/// The `finish_cause` extension: the worker's own reason, as `/execute`'s
/// end event gives it.
fn finish_cause(reason: StopReason) -> Option<String> {
    Some(reason.as_str().to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

fn data<T: Serialize>(value: &T) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default()
        .json_data(value)
        .expect("chunk serializes"))
}

fn done() -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data("[DONE]"))
}

/// The error object a stream ends with when the job fails after it started.
fn stream_error(message: String) -> Result<SseEvent, Infallible> {
    data(&OpenAiErrorBody {
        error: crate::error::OpenAiErrorDetail {
            message,
            kind: "server_error".into(),
            param: None,
            code: Some("inference_failed".into()),
        },
    })
}

/// How a job's events end, for both routes.
enum Outcome {
    Finished(Finish),
    Failed(String),
}

/// Wait for the job's end, keeping only its tokens' log-probabilities (the
/// final text is in `Finish`).
async fn wait(job: &mut RunningJob, scored: &mut Vec<Scored>) -> Outcome {
    loop {
        match job.events.recv().await {
            Some(Event::Token {
                id,
                logprob: Some(lp),
                ..
            }) => scored.push((id, lp)),
            Some(Event::End(finish)) => return Outcome::Finished(finish),
            Some(Event::Error { message }) => return Outcome::Failed(message),
            Some(_) => {}
            None => return Outcome::Failed("the scheduler stopped before the job ended".into()),
        }
    }
}

/// What a stream chunk carries; each route spells it in its own chunk type.
enum Piece {
    /// Before any text (chat: the assistant's role).
    Start,
    /// Text, and the log-probabilities of the tokens it came with (when asked for).
    Text(String, Option<Vec<Scored>>),
    /// The end, with the log-probabilities of tokens whose text never came
    /// (held back as a possible stop string).
    Finish(StopReason, Option<Vec<Scored>>),
    /// After the finish, with `stream_options.include_usage`.
    Usage(Usage),
}

/// Turn a submitted job into the response: the whole completion (`whole`),
/// or an SSE stream of the chunks `chunk` makes, ending with `data: [DONE]`.
async fn respond<T: Serialize + Send + 'static>(
    job: RunningJob,
    mode: StreamMode,
    chunk: impl Fn(Piece) -> Option<T> + Send + 'static,
    whole: impl FnOnce(Finish, Option<Vec<Scored>>) -> Response,
) -> Result<Response, OpenAiError> {
    let logprobs = mode.logprobs;
    let wanted = move |scored: Vec<Scored>| logprobs.then_some(scored);
    if !mode.stream {
        let mut job = job;
        let mut scored = Vec::new();
        let outcome = wait(&mut job, &mut scored).await;
        return match outcome {
            Outcome::Finished(finish) => Ok(whole(finish, wanted(scored))),
            Outcome::Failed(message) => Err(ApiError::Internal(message).into()),
        };
    }
    let stream = async_stream::stream! {
        // Move the whole job in (not just its receiver): its guard must live as long as the stream.
        let mut job = job;
        if let Some(first) = chunk(Piece::Start) {
            yield data(&first);
        }
        // Log-probabilities of tokens whose text has not been sent yet.
        let mut pending: Vec<Scored> = Vec::new();
        loop {
            match job.events.recv().await {
                Some(Event::Token { text, id, logprob, .. }) => {
                    if let Some(lp) = logprob {
                        pending.push((id, lp));
                    }
                    if !text.is_empty() {
                        let scored = wanted(std::mem::take(&mut pending));
                        if let Some(c) = chunk(Piece::Text(text, scored)) {
                            yield data(&c);
                        }
                    }
                }
                Some(Event::End(finish)) => {
                    let scored = wanted(std::mem::take(&mut pending)).filter(|s| !s.is_empty());
                    if let Some(c) = chunk(Piece::Finish(finish.stop_reason, scored)) {
                        yield data(&c);
                    }
                    if mode.include_usage {
                        if let Some(c) = chunk(Piece::Usage(Usage::of(&finish))) {
                            yield data(&c);
                        }
                    }
                    break;
                }
                Some(Event::Error { message }) => {
                    yield stream_error(message);
                    break;
                }
                Some(_) => {}
                None => {
                    yield stream_error("the scheduler stopped before the job ended".into());
                    break;
                }
            }
        }
        yield done();
    };
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// Validates a request off the async threads and queues its job under a new
/// id starting with `prefix`.
async fn accept(
    state: &Arc<AppState>,
    prefix: &str,
    validate: impl FnOnce(&AppState) -> Result<(ValidRequest, StreamMode), Vec<crate::error::FieldError>>
        + Send
        + 'static,
) -> Result<(RunningJob, String, StreamMode), OpenAiError> {
    let (valid, mode) = state.validate_off_thread(validate).await?;
    let id = new_id(prefix);
    let job = jobs::submit(state, &id, "openai", valid)?;
    info!(
        job_id = id,
        prompt_tokens = job.prompt_tokens,
        seed = job.seed,
        "job accepted"
    );
    Ok((job, id, mode))
}

/// Chat completion through the model's chat template.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    params(("X-Correlation-Id" = Option<String>, Header, description = "Echoed back and attached to the job's log lines")),
    responses(
        (status = 200, description = "The completion; with `stream: true`, `text/event-stream` of ChatCompletionChunk `data:` lines ending with `data: [DONE]`",
            content(
                (ChatCompletion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request (`param` names the field)", body = OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = OpenAiErrorBody),
        (status = 413, description = "Body over 1 MiB", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "Queue full (see Retry-After) or shutting down", body = OpenAiErrorBody),
    )
)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    OpenAiJson(request, type_errors): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    let (job, id, mode) = accept(&state, "chatcmpl", move |s| {
        request.validate(s, type_errors)
    })
    .await?;
    let model = state.model.info.id.clone();
    let created = unix_now();
    let (chunk_id, chunk_model) = (id.clone(), model.clone());
    let tokenizer = state.model.tokenizer.clone();
    let chunk_tokenizer = tokenizer.clone();
    let tool_format = mode.tools;
    // With tools, text that may be the start of a call is held back until it is clear.
    let held = std::sync::Mutex::new(String::new());
    let chunk = move |piece: Piece| {
        let logprobs =
            |scored: Option<Vec<Scored>>| scored.map(|s| chat_logprobs(&chunk_tokenizer, &s));
        let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
        let mut cause = None;
        let (delta, finish_reason, usage, logprobs) = match piece {
            Piece::Start => (
                Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                None,
                None,
                None,
            ),
            Piece::Text(text, scored) => {
                let text = match tool_format {
                    Some(format) => {
                        held.push_str(&text);
                        let safe = format.safe_prefix(&held);
                        let rest = held.split_off(safe);
                        std::mem::replace(&mut *held, rest)
                    }
                    None => text,
                };
                if text.is_empty() && scored.as_ref().is_none_or(|s| s.is_empty()) {
                    return None;
                }
                (
                    Delta {
                        role: None,
                        content: Some(text),
                        tool_calls: None,
                    },
                    None,
                    None,
                    logprobs(scored),
                )
            }
            Piece::Finish(reason, scored) => {
                cause = finish_cause(reason);
                let (text, calls) = match tool_format {
                    Some(format) => format.parse(&std::mem::take(&mut *held)),
                    None => (String::new(), Vec::new()),
                };
                let reason = if calls.is_empty() {
                    finish_reason(reason)
                } else {
                    "tool_calls"
                };
                let tool_calls = (!calls.is_empty()).then(|| {
                    calls
                        .into_iter()
                        .enumerate()
                        .map(|(index, call)| DeltaToolCall {
                            index,
                            call: ResponseToolCall::new(call),
                        })
                        .collect()
                });
                (
                    Delta {
                        role: None,
                        content: (!text.is_empty()).then_some(text),
                        tool_calls,
                    },
                    Some(reason.into()),
                    None,
                    logprobs(scored),
                )
            }
            Piece::Usage(usage) => (Delta::default(), None, Some(usage), None),
        };
        Some(ChatCompletionChunk {
            id: chunk_id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: chunk_model.clone(),
            // The usage chunk has no choices.
            choices: if usage.is_some() {
                Vec::new()
            } else {
                vec![ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason,
                    finish_cause: cause,
                    logprobs,
                }]
            },
            usage,
        })
    };
    let whole = move |finish: Finish, scored: Option<Vec<Scored>>| {
        let (content, calls) = match tool_format {
            Some(format) => format.parse(&finish.text),
            None => (finish.text.clone(), Vec::new()),
        };
        let (content, tool_calls, reason) = if calls.is_empty() {
            (Some(content), None, finish_reason(finish.stop_reason))
        } else {
            let calls = calls.into_iter().map(ResponseToolCall::new).collect();
            (
                (!content.is_empty()).then_some(content),
                Some(calls),
                "tool_calls",
            )
        };
        Json(ChatCompletion {
            id: id.clone(),
            object: "chat.completion".into(),
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content,
                    tool_calls,
                },
                finish_reason: reason.into(),
                finish_cause: finish_cause(finish.stop_reason),
                logprobs: scored.map(|s| chat_logprobs(&tokenizer, &s)),
            }],
            usage: Usage::of(&finish),
        })
        .into_response()
    };
    respond(job, mode, chunk, whole).await
}

/// Text completion of a raw prompt.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    params(("X-Correlation-Id" = Option<String>, Header, description = "Echoed back and attached to the job's log lines")),
    responses(
        (status = 200, description = "The completion; with `stream: true`, `text/event-stream` of Completion `data:` lines ending with `data: [DONE]`",
            content(
                (Completion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request (`param` names the field)", body = OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = OpenAiErrorBody),
        (status = 413, description = "Body over 1 MiB", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "Queue full (see Retry-After) or shutting down", body = OpenAiErrorBody),
    )
)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    OpenAiJson(request, type_errors): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    let (job, id, mode) = accept(&state, "cmpl", move |s| request.validate(s, type_errors)).await?;
    let model = state.model.info.id.clone();
    let created = unix_now();
    let tokenizer = state.model.tokenizer.clone();
    let completion = {
        let (id, model) = (id.clone(), model.clone());
        move |text: String,
              finish: Option<StopReason>,
              usage: Option<Usage>,
              choices: bool,
              logprobs: Option<CompletionLogprobs>| {
            Completion {
                id: id.clone(),
                object: "text_completion".into(),
                created,
                model: model.clone(),
                choices: if choices {
                    vec![CompletionChoice {
                        index: 0,
                        text,
                        finish_reason: finish.map(|r| finish_reason(r).into()),
                        finish_cause: finish.and_then(finish_cause),
                        logprobs,
                    }]
                } else {
                    Vec::new()
                },
                usage,
            }
        }
    };
    let whole = {
        let completion = completion.clone();
        let tokenizer = tokenizer.clone();
        move |finish: Finish, scored: Option<Vec<Scored>>| {
            let logprobs = scored.map(|s| completion_logprobs(&tokenizer, &s, &mut 0));
            Json(completion(
                finish.text.clone(),
                Some(finish.stop_reason),
                Some(Usage::of(&finish)),
                true,
                logprobs,
            ))
            .into_response()
        }
    };
    // Characters of text the stream's earlier tokens took (for text_offset).
    let offset = std::sync::Mutex::new(0usize);
    let logprobs = move |scored: Option<Vec<Scored>>| {
        scored.map(|s| {
            let mut offset = offset.lock().unwrap_or_else(|e| e.into_inner());
            completion_logprobs(&tokenizer, &s, &mut offset)
        })
    };
    let chunk = move |piece: Piece| match piece {
        Piece::Start => None,
        Piece::Text(text, scored) => Some(completion(text, None, None, true, logprobs(scored))),
        Piece::Finish(reason, scored) => Some(completion(
            String::new(),
            Some(reason),
            None,
            true,
            logprobs(scored),
        )),
        // The usage chunk has no choices.
        Piece::Usage(usage) => Some(completion(String::new(), None, Some(usage), false, None)),
    };
    respond(job, mode, chunk, whole).await
}

/// The one model this worker serves.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = OpenAiErrorBody),
    )
)]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.model.info.id.clone(),
            object: "model".into(),
            created: state.created_unix,
            owned_by: "worker-orcd".into(),
        }],
    })
}
