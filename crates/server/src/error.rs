//! Errors a request can meet before its stream starts, how each API
//! spells them, and the JSON body extractors that turn malformed, oversized
//! or ill-typed bodies into those errors (naming the field where serde can).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

use crate::AppState;
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
    /// 415: the body is not declared `application/json`.
    UnsupportedMediaType,
    /// 408: the body did not arrive within the server's body timeout.
    BodyTimeout,
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
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
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
            ApiError::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ApiError::BodyTimeout => "BODY_TIMEOUT",
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
            ApiError::UnsupportedMediaType => {
                "the request body must be JSON, sent with Content-Type: application/json".into()
            }
            ApiError::BodyTimeout => "the request body did not arrive in time".into(),
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
    /// `INVALID_REQUEST`, `BODY_TOO_LARGE`, `UNSUPPORTED_MEDIA_TYPE`, `BODY_TIMEOUT`, `UNAUTHORIZED`, `DUPLICATE_JOB`, `QUEUE_FULL`, `UNAVAILABLE`, `INTERNAL`.
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
            ApiError::Invalid(_)
            | ApiError::TooLarge
            | ApiError::UnsupportedMediaType
            | ApiError::BodyTimeout
            | ApiError::DuplicateJob(_) => "invalid_request_error",
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

/// Most fields of one body reported as ill-typed; past this the rest is not looked at.
const MAX_TYPE_ERRORS: usize = 32;

/// Parse a JSON body into `T`; errors name the field (a JSON path) where serde can tell.
/// Every ill-typed field is an error, not only the first.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match parse_json_lenient(bytes)? {
        (value, errors) if errors.is_empty() => Ok(value),
        (_, errors) => Err(ApiError::Invalid(errors)),
    }
}

/// Parse a JSON body into `T`, leaving out fields of the wrong type (each
/// reported), so that the rest can still be checked and the caller hears
/// of every field that is wrong at once. An error when the body is not
/// JSON, not an object, or misses a required field.
pub fn parse_json_lenient<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, Vec<FieldError>), ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let first: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let syntax = |e: serde_json::Error| ApiError::field("body", "json", e.to_string());
    if let Ok(value) = first {
        // Trailing characters after the value.
        deserializer.end().map_err(syntax)?;
        return Ok((value, Vec::new()));
    }
    // Not T: find every reason, from the parsed JSON.
    let mut json: serde_json::Value = serde_json::from_slice(bytes).map_err(syntax)?;
    if !json.is_object() {
        return Err(ApiError::field(
            "body",
            "type",
            format!("the body must be a JSON object, not {}", json_kind(&json)),
        ));
    }
    let mut errors: Vec<FieldError> = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize::<_, T>(&json) {
            Ok(value) => return Ok((value, errors)),
            Err(e) => e,
        };
        let path = e.path().clone();
        let error = field_error(&path.to_string(), &e.into_inner().to_string());
        if errors.iter().any(|seen| seen.field == error.field) {
            // The gap left where an ill-typed field was taken out is refused
            // in turn (a required field inside an array element): it is named
            // already, so take out the object field that holds it and go on.
            if remove_enclosing_field(&mut json, &path) {
                continue;
            }
            return Err(ApiError::Invalid(errors));
        }
        let removed = error.constraint != "required" && remove_path(&mut json, &path);
        errors.push(error);
        if !removed || errors.len() >= MAX_TYPE_ERRORS {
            return Err(ApiError::Invalid(errors));
        }
    }
}

/// `object`, `array`, `string`, … for messages.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A serde error at `path` as a field error.
fn field_error(path: &str, message: &str) -> FieldError {
    let under = |name: String| {
        if path == "." {
            name
        } else {
            format!("{path}.{name}")
        }
    };
    let (field, constraint) = if message.starts_with("unknown field `") {
        // The path already ends with the unknown field's name.
        (path.to_string(), "unknown_field")
    } else if let Some(name) = quoted_after(message, "missing field `") {
        (under(name), "required")
    } else if path == "." {
        ("body".to_string(), "type")
    } else {
        (path.to_string(), "type")
    };
    FieldError::new(field, constraint, message)
}

/// Remove the innermost object field that strictly encloses `path`
/// (`items` for `items[0].text`); whether there was one.
fn remove_enclosing_field(json: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some(end) = segments[..segments.len().saturating_sub(1)]
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    else {
        return false;
    };
    remove_segments(json, &segments[..=end])
}

/// Remove the value at `path` from `json`; whether there was one.
fn remove_path(json: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    let segments: Vec<&serde_path_to_error::Segment> = path.iter().collect();
    remove_segments(json, &segments)
}

fn remove_segments(
    json: &mut serde_json::Value,
    segments: &[&serde_path_to_error::Segment],
) -> bool {
    use serde_path_to_error::Segment;
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut at = json;
    for segment in parents {
        at = match (segment, at) {
            (Segment::Map { key }, serde_json::Value::Object(map)) => match map.get_mut(key) {
                Some(next) => next,
                None => return false,
            },
            (Segment::Seq { index }, serde_json::Value::Array(items)) => {
                match items.get_mut(*index) {
                    Some(next) => next,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match (last, at) {
        // `shift_remove` keeps the other fields in order, so errors come in the body's order.
        (Segment::Map { key }, serde_json::Value::Object(map)) => map.shift_remove(key).is_some(),
        // An element can't be taken out without renumbering the rest: null it,
        // which the element type then reports (or accepts) in its own words.
        (Segment::Seq { index }, serde_json::Value::Array(items)) => match items.get_mut(*index) {
            Some(item) if !item.is_null() => {
                *item = serde_json::Value::Null;
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// `unknown field `x`, expected …` with prefix `unknown field `` → `x`.
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Whether the request says its body is JSON (`application/json`, any
/// parameters). Anything else is refused, so that a web page cannot send a
/// job as a "simple" cross-site request (`text/plain`, forms), which
/// browsers send without asking the server first.
fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

async fn body_bytes(req: Request, state: &Arc<AppState>) -> Result<Bytes, ApiError> {
    if !is_json(&req) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let read = Bytes::from_request(req, state);
    match tokio::time::timeout(state.config.body_timeout, read).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::TooLarge)
        }
        Ok(Err(rejection)) => Err(ApiError::field("body", "read", rejection.body_text())),
    }
}

/// A JSON body for the worker API, with the fields of the wrong type left
/// out and listed; its rejections are worker-API errors.
pub struct WorkerJson<T>(pub T, pub Vec<FieldError>);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for WorkerJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        let (value, errors) = parse_json_lenient(&bytes)?;
        Ok(WorkerJson(value, errors))
    }
}

/// A JSON body for the OpenAI API, as [`WorkerJson`]; its rejections are OpenAI-shaped.
pub struct OpenAiJson<T>(pub T, pub Vec<FieldError>);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for OpenAiJson<T> {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        let (value, errors) = parse_json_lenient(&bytes)?;
        Ok(OpenAiJson(value, errors))
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

    fn all(bytes: &str) -> Vec<(String, String)> {
        match parse_json::<Outer>(bytes.as_bytes()).unwrap_err() {
            ApiError::Invalid(errors) => errors
                .into_iter()
                .map(|e| (e.field, e.constraint))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_ill_typed_field_is_listed() {
        let pair = |f: &str, c: &str| (f.to_string(), c.to_string());
        assert_eq!(
            all(
                r#"{"count": "x", "items": [{"text": "ok"}, {"text": 1}, {"text": []}], "extra": 1}"#
            ),
            // Within one array, the first bad element is named.
            [
                pair("count", "type"),
                pair("items[1].text", "type"),
                pair("extra", "unknown_field"),
            ]
        );
        // A required field that is ill-typed is named once, as ill-typed.
        assert_eq!(
            all(r#"{"count": -1, "items": 3}"#),
            [pair("count", "type"), pair("items", "type")]
        );
        // The lenient parse keeps what is right.
        let (outer, errors) = parse_json_lenient::<Outer>(br#"{"count": 2, "items": 5}"#).unwrap();
        assert_eq!(
            (outer.count, outer.items.is_none(), errors.len()),
            (2, true, 1)
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_says_so() {
        for (body, kind) in [
            ("[1, 2]", "an array"),
            ("\"text\"", "a string"),
            ("null", "null"),
        ] {
            let e = first(body);
            assert_eq!((e.field.as_str(), e.constraint.as_str()), ("body", "type"));
            assert_eq!(
                e.message,
                format!("the body must be a JSON object, not {kind}")
            );
        }
    }
}
