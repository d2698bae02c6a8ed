//! Errors a request can meet before its stream starts, how each API
//! spells them, and the JSON body extractors that turn malformed, oversized
//! or ill-typed bodies into those errors (naming the field where serde can).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// Largest request body accepted; bigger ones get 413. A prompt this long
/// is far past any context the worker serves.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// One reason a request is invalid.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field, as a JSON path (`stop[3]`, `messages[0].role`); `body` for the request as a whole.
    pub field: String,
    /// The rule it broke: `required`, `type`, `range`, `length`, `max_items`, `unknown_field`, `json`, `context`, ….
    pub constraint: String,
    pub message: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        constraint: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            constraint: constraint.into(),
            message: message.into(),
        }
    }
}

/// Why a request was not started.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the fields that are wrong.
    Invalid(Vec<FieldError>),
    /// 413: the body is over [`MAX_BODY_BYTES`].
    TooLarge,
    /// 401: `--api-key` is set and the request lacks it.
    Unauthorized,
    /// 409: a job with this id is running.
    DuplicateJob(String),
    /// 503 with `Retry-After`: the queue is full.
    QueueFull,
    /// 503: the worker is draining or its scheduler has stopped.
    Unavailable(String),
    /// 500.
    Internal(String),
}

impl ApiError {
    pub fn field(field: &str, constraint: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid(vec![FieldError::new(field, constraint, message)])
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::DuplicateJob(_) => StatusCode::CONFLICT,
            ApiError::QueueFull | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The worker API's error code.
    fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "INVALID_REQUEST",
            ApiError::TooLarge => "BODY_TOO_LARGE",
            ApiError::Unauthorized => "UNAUTHORIZED",
            ApiError::DuplicateJob(_) => "DUPLICATE_JOB",
            ApiError::QueueFull => "QUEUE_FULL",
            ApiError::Unavailable(_) => "UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    /// Whether the same request may succeed later.
    fn retriable(&self) -> bool {
        matches!(
            self,
            ApiError::QueueFull | ApiError::Unavailable(_) | ApiError::DuplicateJob(_)
        )
    }

    fn message(&self) -> String {
        match self {
            ApiError::Invalid(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            ApiError::TooLarge => format!("the request body is over {MAX_BODY_BYTES} bytes"),
            ApiError::Unauthorized => {
                "missing or wrong bearer token (Authorization: Bearer <key>)".into()
            }
            ApiError::DuplicateJob(id) => format!("job {id:?} is already running"),
            ApiError::QueueFull => {
                "the worker's queue is full; retry after the Retry-After delay".into()
            }
            ApiError::Unavailable(why) | ApiError::Internal(why) => why.clone(),
        }
    }

    fn headers(&self, response: &mut Response) {
        let headers = response.headers_mut();
        match self {
            ApiError::QueueFull => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
    }

    /// The OpenAI API's spelling of this error.
    pub fn openai(self) -> OpenAiError {
        OpenAiError(self)
    }
}

/// Body of every worker-API error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// `INVALID_REQUEST`, `BODY_TOO_LARGE`, `UNAUTHORIZED`, `DUPLICATE_JOB`, `QUEUE_FULL`, `UNAVAILABLE`, `INTERNAL`.
    pub code: String,
    pub message: String,
    /// Whether the same request may succeed later.
    pub retriable: bool,
    /// For `INVALID_REQUEST`: every field that is wrong (else empty).
    pub errors: Vec<FieldError>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code().into(),
            message: self.message(),
            retriable: self.retriable(),
            errors: match &self {
                ApiError::Invalid(errors) => errors.clone(),
                _ => Vec::new(),
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        self.headers(&mut response);
        response
    }
}

/// An [`ApiError`] in the OpenAI API's shape: `{"error": {message, type, param, code}}`.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

/// Body of every OpenAI-API error.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`, ….
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending field, when there is one.
    pub param: Option<String>,
    pub code: Option<String>,
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let kind = match &e {
            ApiError::Invalid(_) | ApiError::TooLarge | ApiError::DuplicateJob(_) => {
                "invalid_request_error"
            }
            ApiError::Unauthorized => "authentication_error",
            ApiError::QueueFull | ApiError::Unavailable(_) => "overloaded_error",
            ApiError::Internal(_) => "server_error",
        };
        let param = match &e {
            ApiError::Invalid(errors) => errors.first().map(|f| f.field.clone()),
            _ => None,
        };
        let body = OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: e.message(),
                kind: kind.into(),
                param,
                code: Some(e.code().to_ascii_lowercase()),
            },
        };
        let mut response = (e.status(), Json(body)).into_response();
        e.headers(&mut response);
        response
    }
}

/// Parse a JSON body into `T`; errors name the field (a JSON path) where serde can tell.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let under = |name: String| {
            if path == "." {
                name
            } else {
                format!("{path}.{name}")
            }
        };
        let (field, constraint) = if message.starts_with("unknown field `") {
            // The path already ends with the unknown field's name.
            (path, "unknown_field")
        } else if let Some(name) = quoted_after(&message, "missing field `") {
            (under(name), "required")
        } else if inner.is_syntax() || inner.is_eof() {
            ("body".to_string(), "json")
        } else if path == "." {
            ("body".to_string(), "type")
        } else {
            (path, "type")
        };
        ApiError::field(&field, constraint, message)
    })?;
    // Trailing characters after the value.
    deserializer
        .end()
        .map_err(|e| ApiError::field("body", "json", e.to_string()))?;
    Ok(value)
}

/// `unknown field `x`, expected …` with prefix `unknown field `` → `x`.
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    Some(rest[..rest.find('`')?].to_string())
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::field("body", "read", rejection.body_text())
        }
    })
}

/// A JSON body for the worker API; its rejections are worker-API errors.
pub struct WorkerJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for WorkerJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(WorkerJson)
    }
}

/// A JSON body for the OpenAI API; its rejections are OpenAI-shaped.
pub struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        Ok(OpenAiJson(parse_json(&bytes)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        text: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        count: u32,
        items: Option<Vec<Inner>>,
    }

    fn first(bytes: &str) -> FieldError {
        match parse_json::<Outer>(bytes.as_bytes()).unwrap_err() {
            ApiError::Invalid(errors) => errors[0].clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = first(r#"{"count": -1}"#);
        assert_eq!((e.field.as_str(), e.constraint.as_str()), ("count", "type"));
        let e = first(r#"{"count": 1, "extra": 2}"#);
        assert_eq!(
            (e.field.as_str(), e.constraint.as_str()),
            ("extra", "unknown_field")
        );
        let e = first(r#"{"count": 1, "items": [{"text": "a"}, {"text": 3}]}"#);
        assert_eq!(
            (e.field.as_str(), e.constraint.as_str()),
            ("items[1].text", "type")
        );
        let e = first(r#"{"count": 1, "items": [{"txt": "a"}]}"#);
        assert_eq!(e.field, "items[0].txt");
        let e = first(r#"{}"#);
        assert_eq!(
            (e.field.as_str(), e.constraint.as_str()),
            ("count", "required")
        );
        let e = first(r#"{"count": 1"#);
        assert_eq!((e.field.as_str(), e.constraint.as_str()), ("body", "json"));
        let e = first(r#"{"count": NaN}"#);
        assert_eq!(e.field, "body");
        let e = first(r#"[1]"#);
        assert_eq!(e.field, "body");
        let e = first(r#"{"count": 1} trailing"#);
        assert_eq!((e.field.as_str(), e.constraint.as_str()), ("body", "json"));
        assert!(parse_json::<Outer>(br#" {"count": 1} "#).is_ok());
    }
}
