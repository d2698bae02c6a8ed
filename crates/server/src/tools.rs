//! Tool calls on the chat route: the request's `tools` and `tool_choice`,
//! the model family's way of writing a call, and reading calls back out of
//! the generated text (whole, or held back while streaming).
//!
//! A chat template that takes `tools` renders them itself; the call syntax
//! the model was trained on is read off the template: `<tool_call>{…}</tool_call>`
//! (Hermes: Qwen 2.5 and 3, SmolLM3, …), a bare JSON object with `name` and
//! `parameters` (Llama 3.1–3.3), or `[TOOL_CALLS][…]` (Mistral). A template
//! that ignores tools gets them described in the system message, with the
//! Hermes syntax to answer in. `tool_choice: "required"` or a named function
//! is enforced with a grammar (constrained decoding), so the model does call.

use serde_json::{json, Value};

use crate::validate::Errors;
use engine::constraint::Grammar;

/// How a model family writes a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one block per call.
    Hermes,
    /// `{"name": …, "parameters": {…}}` as the whole reply (an optional
    /// `<|python_tag|>` before it).
    Llama3,
    /// `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`.
    Mistral,
}

/// One function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    /// A JSON schema of the arguments (`{"type": "object"}` when not given).
    pub parameters: Value,
    /// As the request gave it, for the chat template.
    pub spec: Value,
}

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A call read out of the model's output.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolFormat {
    /// The syntax a chat template's tool calls are written in, or `None`
    /// when the template does not take tools.
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if !source.contains("tools") {
            return None;
        }
        Some(if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        })
    }

    /// A call as the model writes it (for an assistant turn that made one,
    /// in a template that does not render `tool_calls` itself).
    pub fn write(self, call: &ToolCall) -> String {
        let arguments: Value =
            serde_json::from_str(&call.arguments).unwrap_or(Value::String(call.arguments.clone()));
        match self {
            ToolFormat::Hermes => format!(
                "<tool_call>\n{}\n</tool_call>",
                json!({"name": call.name, "arguments": arguments})
            ),
            ToolFormat::Llama3 => json!({"name": call.name, "parameters": arguments}).to_string(),
            ToolFormat::Mistral => format!(
                "[TOOL_CALLS]{}",
                json!([{"name": call.name, "arguments": arguments}])
            ),
        }
    }

    /// The grammar that makes the model call one of `tools` (all of them,
    /// or the one `choice` names).
    pub fn grammar(self, tools: &[Tool], choice: &Choice) -> Option<Grammar> {
        let chosen: Vec<&Tool> = match choice {
            Choice::None | Choice::Auto => return None,
            Choice::Required => tools.iter().collect(),
            Choice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        };
        let arguments_key = if self == ToolFormat::Llama3 {
            "parameters"
        } else {
            "arguments"
        };
        let calls: Vec<Value> = chosen
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
                    "required": ["name", arguments_key],
                    "additionalProperties": false
                })
            })
            .collect();
        let call = json!({"anyOf": calls});
        let lark = match self {
            ToolFormat::Hermes => {
                format!("start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {call}")
            }
            ToolFormat::Llama3 => format!("start: call\ncall: %json {call}"),
            ToolFormat::Mistral => {
                format!("start: \"[TOOL_CALLS][\" call \"]\"\ncall: %json {call}")
            }
        };
        Some(Grammar::Lark(lark))
    }

    /// The text before any call, and the calls, of a whole reply. Text that
    /// looks like a call but does not parse stays text.
    pub fn parse(self, text: &str) -> (String, Vec<ToolCall>) {
        match self {
            ToolFormat::Hermes => parse_hermes(text),
            ToolFormat::Llama3 => {
                let body = text.trim_start();
                let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
                match serde_json::from_str::<Value>(body)
                    .ok()
                    .and_then(|v| call_of(&v, &["parameters", "arguments"]))
                {
                    Some(call) => (String::new(), vec![call]),
                    None => (text.to_string(), Vec::new()),
                }
            }
            ToolFormat::Mistral => match text.find("[TOOL_CALLS]") {
                Some(at) => {
                    let body = text[at + "[TOOL_CALLS]".len()..].trim();
                    let calls: Option<Vec<ToolCall>> = serde_json::from_str::<Value>(body)
                        .ok()
                        .and_then(|v| v.as_array().cloned())
                        .and_then(|items| {
                            items
                                .iter()
                                .map(|v| call_of(v, &["arguments", "parameters"]))
                                .collect()
                        });
                    match calls {
                        Some(calls) if !calls.is_empty() => {
                            (text[..at].trim_end().to_string(), calls)
                        }
                        _ => (text.to_string(), Vec::new()),
                    }
                }
                None => (text.to_string(), Vec::new()),
            },
        }
    }

    /// While streaming: how many bytes of `text` are surely not part of a
    /// call (the rest is held back until it is clear).
    pub fn safe_prefix(self, text: &str) -> usize {
        let marker = match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
            ToolFormat::Llama3 => {
                // A call is the whole reply: hold everything once it starts like one.
                let start = text.trim_start();
                return if start.is_empty()
                    || start.starts_with('{')
                    || "<|python_tag|>".starts_with(start)
                    || start.starts_with("<|python_tag|>")
                {
                    0
                } else {
                    text.len()
                };
            }
        };
        if let Some(at) = text.find(marker) {
            return at;
        }
        // A tail that could still grow into the marker.
        (1..marker.len())
            .rev()
            .find(|&n| {
                text.len() >= n
                    && text.is_char_boundary(text.len() - n)
                    && text.ends_with(&marker[..n])
            })
            .map_or(text.len(), |n| text.len() - n)
    }
}

/// `{"name": …, <one of argument_keys>: {…}}` as a call.
fn call_of(value: &Value, argument_keys: &[&str]) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = argument_keys
        .iter()
        .find_map(|k| value.get(*k))
        .cloned()
        .unwrap_or(json!({}));
    let arguments = match arguments {
        // Some models write the arguments as a JSON string already.
        Value::String(s) => serde_json::from_str::<Value>(&s)
            .map_or(Value::String(s).to_string(), |v| v.to_string()),
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

fn parse_hermes(text: &str) -> (String, Vec<ToolCall>) {
    let Some(first) = text.find("<tool_call>") else {
        return (text.to_string(), Vec::new());
    };
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find("<tool_call>") {
        let body = &rest[start + "<tool_call>".len()..];
        let (inner, after) = match body.find("</tool_call>") {
            Some(end) => (&body[..end], &body[end + "</tool_call>".len()..]),
            // A reply cut short after a whole object still made its call.
            None => (body, ""),
        };
        match serde_json::from_str::<Value>(inner.trim())
            .ok()
            .and_then(|v| call_of(&v, &["arguments", "parameters"]))
        {
            Some(call) => calls.push(call),
            None => return (text.to_string(), Vec::new()),
        }
        rest = after;
    }
    (text[..first].trim_end().to_string(), calls)
}

/// The request's `tools`: functions with a name (letters, digits, `_`,
/// `-`; at most 64) and an optional JSON-schema `parameters`.
pub fn parse_tools(value: &Value, errors: &mut Errors) -> Vec<Tool> {
    let Some(items) = value.as_array() else {
        errors.add("tools", "type", "must be an array of tools");
        return Vec::new();
    };
    let mut tools = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("tools[{i}]");
        if item.get("type").and_then(Value::as_str) != Some("function") {
            errors.add(&format!("{field}.type"), "enum", "must be \"function\"");
            continue;
        }
        let function = item.get("function").cloned().unwrap_or(Value::Null);
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            errors.add(
                &format!("{field}.function.name"),
                "pattern",
                "1 to 64 letters, digits, _ or -",
            );
            continue;
        }
        let parameters = function
            .get("parameters")
            .cloned()
            .unwrap_or(json!({"type": "object"}));
        if !parameters.is_object() {
            errors.add(
                &format!("{field}.function.parameters"),
                "type",
                "must be a JSON schema (an object)",
            );
            continue;
        }
        if tools.iter().any(|t: &Tool| t.name == name) {
            errors.add(
                &format!("{field}.function.name"),
                "unique",
                "another tool has this name",
            );
            continue;
        }
        tools.push(Tool {
            name: name.to_string(),
            parameters,
            spec: item.clone(),
        });
    }
    tools
}

/// `tool_choice`: `none`, `auto` (the default with tools), `required`, or
/// `{"type": "function", "function": {"name": …}}` naming one of `tools`.
pub fn parse_choice(value: Option<&Value>, tools: &[Tool], errors: &mut Errors) -> Choice {
    let choice = match value {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                Choice::None
            } else {
                Choice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            _ => {
                errors.add("tool_choice", "enum", "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}");
                Choice::None
            }
        },
        Some(v) => match v
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => Choice::Named(name.to_string()),
            None => {
                errors.add(
                    "tool_choice.function.name",
                    "required",
                    "the function to call",
                );
                Choice::None
            }
        },
    };
    match &choice {
        Choice::Required | Choice::Named(_) if tools.is_empty() => {
            errors.add("tool_choice", "requires", "tool_choice needs tools");
        }
        Choice::Named(name) if !tools.iter().any(|t| &t.name == name) => {
            errors.add(
                "tool_choice.function.name",
                "enum",
                format!("no tool is named {name:?}"),
            );
        }
        _ => {}
    }
    choice
}

/// The system message's addition for a template that does not take tools:
/// the functions, and how to call one (the Hermes syntax).
pub fn describe_tools(tools: &[Tool]) -> String {
    let list: Vec<String> = tools.iter().map(|t| t.spec.to_string()).collect();
    format!(
        "You can call functions. They are described here as JSON:\n{}\n\
         To call one, answer with only a block like this, with the arguments as JSON:\n\
         <tool_call>\n{{\"name\": \"<function name>\", \"arguments\": {{}}}}\n</tool_call>",
        list.join("\n")
    )
}

/// A new call id, as OpenAI spells them.
pub fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: arguments.to_string(),
        }
    }

    /// Outputs in each family's format, as the models write them.
    #[test]
    fn calls_are_read_in_each_family_format() {
        // Qwen 2.5 / Qwen 3 / SmolLM3 (Hermes), two calls after some text.
        let qwen = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>";
        assert_eq!(
            ToolFormat::Hermes.parse(qwen),
            (
                "Let me check.".to_string(),
                vec![
                    call("get_weather", json!({"city": "Paris", "unit": "celsius"})),
                    call("get_time", json!({"tz": "CET"}))
                ]
            )
        );
        // Llama 3.1-3.3, with and without the python tag.
        let llama = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        assert_eq!(
            ToolFormat::Llama3.parse(llama).1,
            vec![call("get_weather", json!({"city": "Paris"}))]
        );
        let tagged = format!("<|python_tag|>{llama}");
        assert_eq!(ToolFormat::Llama3.parse(&tagged).1.len(), 1);
        // Mistral.
        let mistral =
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]";
        assert_eq!(
            ToolFormat::Mistral.parse(mistral).1,
            vec![call("get_weather", json!({"city": "Paris"}))]
        );
        // Arguments written as a JSON string.
        let stringy = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>";
        assert_eq!(
            ToolFormat::Hermes.parse(stringy).1,
            vec![call("f", json!({"x": 1}))]
        );
        // Plain answers, and broken calls, stay text.
        for text in ["The weather is fine.", "<tool_call>{not json</tool_call>"] {
            assert_eq!(ToolFormat::Hermes.parse(text), (text.to_string(), vec![]));
        }
        assert!(ToolFormat::Llama3.parse("Sure: {\"a\": 1}").1.is_empty());
    }

    #[test]
    fn the_template_says_the_format() {
        assert_eq!(ToolFormat::of_template("{{ messages }}"), None);
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<tool_call>{% endif %}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<|python_tag|>{% endif %}"),
            Some(ToolFormat::Llama3)
        );
        assert_eq!(
            ToolFormat::of_template("{% if tools %}[TOOL_CALLS]{% endif %}"),
            Some(ToolFormat::Mistral)
        );
    }

    #[test]
    fn streaming_holds_back_only_what_may_be_a_call() {
        let f = ToolFormat::Hermes;
        assert_eq!(f.safe_prefix("Hello there"), 11);
        assert_eq!(f.safe_prefix("Hello <tool"), 6);
        assert_eq!(f.safe_prefix("Hello <tool_call>{\"na"), 6);
        assert_eq!(f.safe_prefix("a < b"), 5);
        assert_eq!(ToolFormat::Llama3.safe_prefix("  {\"name\""), 0);
        assert_eq!(ToolFormat::Llama3.safe_prefix("Hi"), 2);
    }

    #[test]
    fn choices_and_tools_are_checked_by_field() {
        let mut errors = Errors::default();
        let tools = parse_tools(
            &json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                    {"type": "function", "function": {"name": "bad name"}},
                    {"type": "retrieval"}]),
            &mut errors,
        );
        assert_eq!(tools.len(), 1);
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["tools[1].function.name", "tools[2].type"]);
        let mut errors = Errors::default();
        assert_eq!(parse_choice(None, &tools, &mut errors), Choice::Auto);
        let named = json!({"type": "function", "function": {"name": "g"}});
        parse_choice(Some(&named), &tools, &mut errors);
        assert_eq!(errors.0[0].field, "tool_choice.function.name");
    }
}
