//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered
//! with minijinja the way llama-cpp-python's `Jinja2ChatFormatter` renders it
//! with Python's jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! `raise_exception`, Python string methods, Python's `json.dumps` for `tojson`).

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use gguf::Metadata;

use crate::TokenizerError;

const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const TEMPLATE_NAME: &str = "chat_template";

/// ChatML, used when a file has no template but its vocabulary has `<|im_start|>`.
const CHATML: &str = include_str!("templates/chatml.jinja");
/// Gemma 3's turn template (google/gemma-3-*-it), used when a file has no
/// template but its vocabulary has `<start_of_turn>` and `<end_of_turn>`.
const GEMMA: &str = include_str!("templates/gemma3.jinja");

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the `bos_token` and `eos_token` it is
/// rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bytes", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// The template of a GGUF file, with its BOS and EOS token texts.
    ///
    /// Without `tokenizer.chat_template` the file gets ChatML if its
    /// vocabulary has `<|im_start|>`, Gemma's turn template if it has
    /// `<start_of_turn>` (Gemma GGUF files often ship without a template),
    /// and otherwise this is [`TokenizerError::NoTemplate`].
    pub fn from_gguf(meta: &Metadata) -> Result<Self, TokenizerError> {
        let tokens = meta.get_string_array("tokenizer.ggml.tokens")?;
        let (bos, eos) = crate::vocab::bos_eos_ids(meta, tokens.len())?;
        let text = |id: Option<u32>| id.map(|id| tokens[id as usize].clone()).unwrap_or_default();
        let source = match meta.get(KEY_TEMPLATE) {
            Some(_) => meta.get_str(KEY_TEMPLATE)?.to_string(),
            None => {
                let has = |t: &str| tokens.iter().any(|x| x == t);
                if has("<|im_start|>") {
                    CHATML.to_string()
                } else if has("<start_of_turn>") && has("<end_of_turn>") {
                    GEMMA.to_string()
                } else {
                    return Err(TokenizerError::NoTemplate(format!(
                        "the file has no {KEY_TEMPLATE} and its vocabulary has neither <|im_start|> (ChatML) \
                         nor <start_of_turn> (Gemma); pass a template explicitly"
                    )));
                }
            }
        };
        Self::new(source, text(bos), text(eos))
    }

    /// The template to chat with: `explicit` (a template's source, e.g. from
    /// `--chat-template FILE`) when given, else the file's (as
    /// [`from_gguf`](Self::from_gguf)); either way with the file's BOS and
    /// EOS texts, and checked by rendering one user message, so that a
    /// template that does not parse or raises on the simplest conversation
    /// is an error at load rather than on the first chat request.
    pub fn load(meta: &Metadata, explicit: Option<&str>) -> Result<Self, TokenizerError> {
        let template = match explicit {
            Some(source) => {
                let tokens = meta.get_string_array("tokenizer.ggml.tokens")?;
                let (bos, eos) = crate::vocab::bos_eos_ids(meta, tokens.len())?;
                let text =
                    |id: Option<u32>| id.map(|id| tokens[id as usize].clone()).unwrap_or_default();
                Self::new(source, text(bos), text(eos))?
            }
            None => Self::from_gguf(meta)?,
        };
        template.render(&[Message::new("user", "Hello")], true)?;
        Ok(template)
    }

    /// Compile `source`; `bos_token` and `eos_token` are the texts the
    /// template sees under those names.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, TokenizerError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TokenizerError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation; with `add_generation_prompt` the text ends
    /// where the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_value(
            Value::from_serialize(messages),
            Value::from(()),
            add_generation_prompt,
        )
    }

    /// Render messages of any shape (tool calls, content parts) and an
    /// optional tool list, as JSON values in the OpenAI chat format.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let tools = tools.map_or(Value::from(()), Value::from_serialize);
        self.render_value(
            Value::from_serialize(messages),
            tools,
            add_generation_prompt,
        )
    }

    fn render_value(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::Template(describe(&e)))?;
        // The variables llama-cpp-python passes; the unused ones are None there too.
        let ctx = minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => add_generation_prompt,
            tools => tools,
            functions => (),
            function_call => (),
            tool_choice => (),
        };
        // The template comes from the model file: bound what it may write
        // (and, through the environment's fuel, how long it may run).
        let mut out = BoundedOutput::default();
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| TokenizerError::Template("the template wrote invalid UTF-8".into())),
            Err(_) if out.overflowed => Err(TokenizerError::Template(format!(
                "the template wrote more than {MAX_RENDERED_BYTES} bytes"
            ))),
            Err(e) => Err(TokenizerError::Template(describe(&e))),
        }
    }
}

/// Most bytes a rendered conversation may have. Requests are at most 1 MiB,
/// so a real template's output stays far below; a hostile one (nested loops
/// writing a long string) is stopped here instead of exhausting memory.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;
/// Template instructions one render may run (minijinja's fuel): a few
/// hundred per message for real templates; nested loops over `range` run out
/// within a fraction of a second instead of for hours.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// A writer that refuses bytes past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An error message with minijinja's detail and location.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        msg.push_str(": ");
        msg.push_str(&inner.to_string());
        source = inner.source();
    }
    msg
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

/// `tojson` as Python's `json.dumps` writes it, which is what
/// llama-cpp-python and transformers use: `", "` and `": "` separators,
/// keys in insertion order, non-ASCII kept, and the `indent`,
/// `ensure_ascii`, `separators` and `sort_keys` arguments.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a number or a string",
                ))
            }
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) if seps.len() == 2 => (seps[0].clone(), seps[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let writer = JsonWriter {
        indent,
        ensure_ascii,
        sort_keys,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    writer.write(&value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonWriter {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonWriter {
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let Ok(i) = i64::try_from(value.clone()) {
                    if value.is_integer() {
                        out.push_str(&i.to_string());
                        return Ok(());
                    }
                }
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float(f));
            }
            ValueKind::String => self.write_str(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container('[', ']', items.len(), depth, out, |i, out| {
                    self.write(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.write_container('{', '}', keys.len(), depth, out, |i, out| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => self.write_str(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&value.get_item(key)?, depth + 1, out)
                })?;
            }
            _ => self.write_str(&value.to_string(), out),
        }
        Ok(())
    }

    fn write_container(
        &self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            item(i, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0C}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7E) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e+16`, `NaN`).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Scientific notation with a signed two-digit exponent.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    format!("{f:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(
        source: &str,
        messages: &[Message],
        generation: bool,
    ) -> Result<String, TokenizerError> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, generation)
    }

    #[test]
    fn chatml_renders() {
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        assert_eq!(
            render(CHATML, &msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Found by the load fuzzer: a file's template can loop for hours or
    /// write gigabytes; both stop with an error, quickly.
    #[test]
    fn hostile_templates_are_bounded_in_time_and_output() {
        let msgs = [Message::new("user", "x")];
        let start = std::time::Instant::now();
        let err = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% set k = j %}{% endfor %}{% endfor %}",
            &msgs,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fuel"), "{err}");
        let err = render(
            "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
            &msgs,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("more than 16777216 bytes"), "{err}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let msgs = [Message::new("user", "a"), Message::new("user", "b")];
        let err = render(GEMMA, &msgs, true).unwrap_err().to_string();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn broken_templates_are_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(TokenizerError::Template(_))
        ));
        let err = render(
            "{{ messages[0].content.nope() }}",
            &[Message::new("user", "x")],
            false,
        )
        .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let out = render(
            "{{ messages[0].content.strip().upper() }}",
            &[Message::new("user", "  hi ")],
            false,
        )
        .unwrap();
        assert_eq!(out, "HI");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let tools = serde_json::json!([{"name": "f", "n": [1, 2.5, true, null], "s": "é\"\n"}]);
        let out = t
            .render_json(&serde_json::json!([]), Some(&tools), false)
            .unwrap();
        assert_eq!(
            out,
            "[{\"name\": \"f\", \"n\": [1, 2.5, true, null], \"s\": \"é\\\"\\n\"}]|{\n  \"name\": \"f\",\n  \"n\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"s\": \"é\\\"\\n\"\n}"
        );
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
    }
}
