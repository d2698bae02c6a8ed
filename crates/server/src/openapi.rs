//! The OpenAPI description, generated from the route and body types.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{error, openai, worker_api};

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
        worker_api::metrics,
        openai::chat_completions,
        openai::completions,
        openai::models,
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
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "worker", description = "The worker API"),
        (name = "openai", description = "OpenAI-compatible API"),
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

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "worker",
    responses((status = 200, description = "OpenAPI 3.1 description", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
