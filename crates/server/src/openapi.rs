//! The OpenAPI description, generated from the route and body types, with
//! the event streams described event by event.

use std::sync::OnceLock;

use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{error, openai, tokenize, worker_api};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "worker-orcd",
        description = "One GGUF model served by one worker: the worker API an orchestrator drives, and an OpenAI-compatible API."
    ),
    paths(
        worker_api::execute,
        worker_api::cancel,
        worker_api::health,
        worker_api::live,
        worker_api::ready,
        worker_api::load,
        worker_api::metrics,
        openai::chat_completions,
        openai::completions,
        openai::models,
        tokenize::tokenize,
        tokenize::detokenize,
        openapi_json,
    ),
    components(schemas(
        error::ErrorBody,
        error::FieldError,
        error::OpenAiErrorBody,
        worker_api::StartedEvent,
        worker_api::TokenEvent,
        worker_api::MetricsEvent,
        worker_api::EndEvent,
        worker_api::ErrorEvent,
        openai::ChatCompletionChunk,
        openai::Completion,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "worker", description = "The worker API"),
        (name = "openai", description = "OpenAI-compatible API"),
        (name = "tokenizer", description = "The served model's tokenizer, as llama-server has it"),
    )
)]
pub struct ApiDoc;

/// Declares the bearer scheme that `--api-key` turns on.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The whole description. Before OpenAPI 3.2's `itemSchema`, the schema of
/// a `text/event-stream` response describes one event, `{event, data}`,
/// whose `data` is a string holding JSON (`contentMediaType` and
/// `contentSchema`); utoipa has no words for that, so those schemas are set here.
pub fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the description serializes");
        let execute_events: Vec<Value> = [
            ("started", "StartedEvent"),
            ("token", "TokenEvent"),
            ("metrics", "MetricsEvent"),
            ("end", "EndEvent"),
            ("error", "ErrorEvent"),
        ]
        .into_iter()
        .map(|(name, schema)| event_schema(json!({"const": name}), json_data(&[schema])))
        .collect();
        set_stream_schema(&mut doc, "/execute", json!({"oneOf": execute_events}));
        for (path, chunk) in [
            ("/v1/chat/completions", "ChatCompletionChunk"),
            ("/v1/completions", "Completion"),
        ] {
            // Unnamed events: a chunk, an error object, or the closing `[DONE]`.
            let data = json!({
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": json_data(&[chunk, "OpenAiErrorBody"]),
            });
            set_stream_schema(
                &mut doc,
                path,
                event_schema(json!({"const": "message"}), data),
            );
        }
        exact_seed_bounds(&mut doc);
        doc
    })
}

/// Seeds are any u64. utoipa writes bounds as f64 (u64::MAX becomes 2^64)
/// and calls u64 `int64`, so the seed schemas get exact integer bounds here.
fn exact_seed_bounds(doc: &mut Value) {
    let Some(schemas) = doc["components"]["schemas"].as_object_mut() else {
        return;
    };
    for schema in schemas.values_mut() {
        if let Some(seed) = schema
            .pointer_mut("/properties/seed")
            .and_then(Value::as_object_mut)
        {
            seed.remove("format");
            seed.insert("minimum".into(), json!(0));
            seed.insert("maximum".into(), json!(u64::MAX));
        }
    }
}

/// One server-sent event with the given `event` and `data` schemas.
fn event_schema(event: Value, data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["data"],
        "properties": {"event": event, "data": data},
    })
}

/// A string holding JSON that matches one of the named component schemas.
fn json_data(schemas: &[&str]) -> Value {
    let refs: Vec<Value> = schemas
        .iter()
        .map(|s| json!({"$ref": format!("#/components/schemas/{s}")}))
        .collect();
    let content = if refs.len() == 1 {
        refs[0].clone()
    } else {
        json!({"anyOf": refs})
    };
    json!({"type": "string", "contentMediaType": "application/json", "contentSchema": content})
}

fn set_stream_schema(doc: &mut Value, path: &str, schema: Value) {
    let media = &mut doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"];
    assert!(
        media.is_object(),
        "{path} documents a text/event-stream response"
    );
    media["schema"] = schema;
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "worker",
    responses((status = 200, description = "OpenAPI 3.1 description", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Json<&'static Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_is_described_event_by_event() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "StartedEvent",
            "TokenEvent",
            "EndEvent",
            "ErrorEvent",
            "ChatCompletionChunk",
            "Completion",
            "OpenAiErrorBody",
        ] {
            assert!(schemas.contains_key(name), "{name}");
        }
        let execute = &doc["paths"]["/execute"]["post"]["responses"]["200"]["content"]
            ["text/event-stream"]["schema"];
        assert_eq!(execute["oneOf"].as_array().unwrap().len(), 5);
        // Every reference resolves.
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(schemas.contains_key(name), "dangling reference to {name}");
        }
    }
}
