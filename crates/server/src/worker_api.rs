//! The worker API the orchestrator drives: `/execute` (a job as a stream of
//! server-sent events), `/cancel`, `/health` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::scheduler::Event;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tracing::info;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody, WorkerJson};
use crate::jobs::{self, RunningJob};
use crate::validate::{self, Errors, SamplingFields, ValidRequest, WORKER_DEFAULTS};
use crate::AppState;

/// How often an idle stream (a job still queued) gets an SSE comment, so
/// that a client that went away is noticed and its job dropped.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// A generation job. Absent sampling fields take llama.cpp's defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// The caller's id for the job, used by `/cancel`; unique among running jobs.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9._:-]+$",
        example = "job-42"
    )]
    pub job_id: String,
    /// Report each generated token's log-probability in its `token` event [false].
    pub logprobs: Option<bool>,
    /// A grammar the output keeps to: `{"type": "json_object"}`, `{"type":
    /// "json_schema", "schema": {…}}`, `{"type": "regex", "pattern": "…"}` or
    /// `{"type": "lark", "grammar": "…"}` (llguidance's Lark dialect).
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Value>,
    /// With `logprobs`: the 0 to 20 most likely tokens at each position, with theirs [0].
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub top_logprobs: Option<u32>,
    /// Text to continue, used as given (special tokens in it are parsed); it must leave room in the context.
    #[schema(min_length = 1, example = "Once upon a time")]
    pub prompt: String,
    /// Tokens to generate at most [256]; generation also ends where the context does.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0, example = 32)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub max_tokens: Option<u32>,
    /// 0 is greedy [0.8].
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub temperature: Option<f64>,
    /// In (0, 1]; 1 disables [0.95].
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// 0 disables [40].
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 4294967295.0)]
    #[serde(default, deserialize_with = "crate::de::option_u32")]
    pub top_k: Option<u32>,
    /// In [0, 1]; 0 disables [0.05].
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f64>,
    /// In [0.01, 10]; 1 disables [1].
    #[schema(minimum = 0.01, maximum = 10.0)]
    pub repetition_penalty: Option<f64>,
    /// In [-2, 2] (OpenAI's): subtracted once from the logit of every token generated so far [0].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// In [-2, 2] (OpenAI's): subtracted from a token's logit per time it was generated [0].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// Token id (a decimal string) → bias in [-100, 100], added to the token's logit (-100 bans it).
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Random seed; one is drawn (and reported in `started`) when absent.
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 18446744073709551615.0)]
    #[serde(default, deserialize_with = "crate::de::option_u64")]
    pub seed: Option<u64>,
    /// Generation stops before any of these (at most 16, 1 to 256 bytes each); they are not emitted.
    #[schema(schema_with = validate::nullable_stop_list_schema)]
    pub stop: Option<Vec<String>>,
}

impl ExecuteRequest {
    /// Tokenize and check every field (run off the async threads: a long prompt takes a while).
    pub fn validate(
        self,
        state: &AppState,
        type_errors: Vec<crate::error::FieldError>,
    ) -> Result<ValidRequest, Vec<crate::error::FieldError>> {
        let mut errors = Errors(type_errors);
        validate::check_job_id(&self.job_id, &mut errors);
        let fields = SamplingFields {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            seed: self.seed,
            stop: self.stop.unwrap_or_default(),
            vocab_size: state.model.info.vocab_size,
            logprobs: validate::check_logprobs(self.logprobs, self.top_logprobs, &mut errors),
        };
        let mut params = validate::check_sampling(&fields, &WORKER_DEFAULTS, &mut errors);
        let grammar = self
            .grammar
            .as_ref()
            .and_then(|g| validate::parse_grammar(g, "grammar", &mut errors));
        params.constraint = validate::check_grammar(&state.model, "grammar", grammar, &mut errors);
        let prompt = validate::check_prompt(&state.model, "prompt", &self.prompt, &mut errors);
        validate::finish(errors, prompt, params)
    }
}

/// The job was accepted and queued.
#[derive(Serialize, ToSchema)]
pub struct StartedEvent {
    pub job_id: String,
    pub model: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// The seed in use (drawn by the worker when the request gave none).
    pub seed: u64,
}

/// One generated token.
#[derive(Serialize, ToSchema)]
pub struct TokenEvent {
    /// The text that became final with this token, whole UTF-8 characters only; may be empty
    /// (half a character, or text held back while it might be a stop string). Text held back
    /// at the very end comes in one more event carrying the last token's index.
    pub t: String,
    /// Index of the generated token, from 0.
    pub i: usize,
    /// With `logprobs`: the token's id and natural-log probability under the
    /// model (before sampling settings), and the most likely tokens there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TopToken>>,
}

/// One of the most likely tokens at a position.
#[derive(Serialize, ToSchema)]
pub struct TopToken {
    pub id: u32,
    /// Its text (bytes that are not whole UTF-8 characters become U+FFFD).
    pub t: String,
    pub logprob: f32,
}

/// Timing of the job, sent just before `end`.
#[derive(Serialize, ToSchema)]
pub struct MetricsEvent {
    pub prompt_tokens: usize,
    /// From acceptance (queueing and prefill included) to the first token.
    pub time_to_first_token_ms: Option<f64>,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_second: Option<f64>,
}

/// The job ended.
#[derive(Serialize, ToSchema)]
pub struct EndEvent {
    pub tokens_out: usize,
    /// Prompt tokens whose keys and values came from the prefix cache (not run again).
    pub cached_tokens: usize,
    /// Time spent generating after the first token.
    pub decode_time_ms: f64,
    /// `MAX_TOKENS`, `EOS`, `STOP_SEQUENCE` or `CANCELLED`.
    pub stop_reason: String,
}

/// The job failed.
#[derive(Serialize, ToSchema)]
pub struct ErrorEvent {
    /// `INFERENCE_FAILED` or `WORKER_STOPPED`.
    pub code: String,
    pub message: String,
    /// Whether running the same job again may succeed.
    pub retriable: bool,
}

fn sse<T: Serialize>(name: &'static str, data: &T) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default()
        .event(name)
        .json_data(data)
        .expect("event data serializes"))
}

/// Run a generation job, streamed as server-sent events.
#[utoipa::path(
    post,
    path = "/execute",
    tag = "worker",
    request_body = ExecuteRequest,
    params(("X-Correlation-Id" = Option<String>, Header, description = "Echoed back and attached to the job's log lines")),
    responses(
        (status = 200, description = "The job's events, in order: `started`, one `token` per generated token, \
            `metrics`, then exactly one `end` or `error`; each event's `data` is the JSON object named after it \
            (StartedEvent, TokenEvent, MetricsEvent, EndEvent, ErrorEvent)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid fields, each named", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = ErrorBody),
        (status = 409, description = "A job with this id is running", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 503, description = "Queue full (see Retry-After) or shutting down", body = ErrorBody),
    )
)]
pub async fn execute(
    State(state): State<Arc<AppState>>,
    WorkerJson(request, type_errors): WorkerJson<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let job_id = request.job_id.clone();
    let valid = state
        .validate_off_thread(move |s| request.validate(s, type_errors))
        .await?;
    let max_tokens = valid.params.max_tokens;
    let job = jobs::submit(&state, &job_id, "worker", valid)?;
    info!(
        job_id,
        prompt_tokens = job.prompt_tokens,
        max_tokens,
        seed = job.seed,
        "job accepted"
    );
    let started = StartedEvent {
        job_id,
        model: state.model.info.id.clone(),
        started_at: rfc3339(SystemTime::now()),
        seed: job.seed,
    };
    let stream = execute_events(started, job, state.model.tokenizer.clone());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// The job's scheduler events as SSE events (the job's end is logged by [`jobs`]).
fn execute_events(
    started: StartedEvent,
    job: RunningJob,
    tokenizer: Arc<tokenizer::Tokenizer>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        // Move the whole job in (not just its receiver): its guard must live as long as the stream.
        let mut job = job;
        yield sse("started", &started);
        loop {
            match job.events.recv().await {
                Some(Event::Started { .. }) => {}
                Some(Event::Token { index, text, id, logprob }) => {
                    let (id, logprob, top_logprobs) = match logprob {
                        Some(lp) => {
                            let top = lp.top.iter().map(|&(id, logprob)| TopToken {
                                id,
                                t: String::from_utf8_lossy(tokenizer.token_to_piece(id, true)).into_owned(),
                                logprob,
                            });
                            (Some(id), Some(lp.logprob), Some(top.collect()))
                        }
                        None => (None, None, None),
                    };
                    yield sse("token", &TokenEvent { t: text, i: index, id, logprob, top_logprobs });
                }
                Some(Event::End(finish)) => {
                    let decode_tokens = finish.tokens_out.saturating_sub(1);
                    let decode_s = finish.decode_time.as_secs_f64();
                    yield sse("metrics", &MetricsEvent {
                        prompt_tokens: finish.prompt_tokens,
                        time_to_first_token_ms: finish.time_to_first_token.map(|d| d.as_secs_f64() * 1e3),
                        decode_tokens_per_second: (decode_tokens > 0 && decode_s > 0.0)
                            .then(|| decode_tokens as f64 / decode_s),
                    });
                    yield sse("end", &EndEvent {
                        tokens_out: finish.tokens_out,
                        cached_tokens: finish.cached_tokens,
                        decode_time_ms: decode_s * 1e3,
                        stop_reason: finish.stop_reason.as_str().to_string(),
                    });
                    break;
                }
                Some(Event::Error { message }) => {
                    yield sse("error", &ErrorEvent {
                        code: "INFERENCE_FAILED".into(),
                        message,
                        retriable: true,
                    });
                    break;
                }
                None => {
                    yield sse("error", &ErrorEvent {
                        code: "WORKER_STOPPED".into(),
                        message: "the scheduler stopped before the job ended".into(),
                        retriable: true,
                    });
                    break;
                }
            }
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[schema(example = "job-42")]
    pub job_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResponse {
    pub job_id: String,
    /// Whether a job with this id was in flight (it now ends with `CANCELLED` within one decode step).
    pub found: bool,
}

/// Cancel a job. Idempotent: cancelling an unknown or finished job is not an error.
#[utoipa::path(
    post,
    path = "/cancel",
    tag = "worker",
    request_body = CancelRequest,
    responses(
        (status = 202, description = "Cancellation requested", body = CancelResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    WorkerJson(request, type_errors): WorkerJson<CancelRequest>,
) -> Result<Response, ApiError> {
    if !type_errors.is_empty() {
        return Err(ApiError::Invalid(type_errors));
    }
    let found = state.jobs.cancel(&request.job_id);
    info!(job_id = request.job_id, found, "cancel requested");
    let body = CancelResponse {
        job_id: request.job_id,
        found,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or `draining` after SIGTERM.
    pub status: String,
    pub model: String,
    pub architecture: String,
    /// Quantization mix from the file (`Q4_K_M`, …).
    pub quant: String,
    pub device: String,
    pub vocab_size: usize,
    /// Positions per sequence as served.
    pub context_length: usize,
    pub uptime_seconds: f64,
    pub memory: MemoryUsage,
    pub slots: Slots,
    pub kv_pages: KvPages,
}

/// Bytes in use; on the CPU these are host memory.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemoryUsage {
    /// The weights where they are used: the model file's tensor data on the
    /// CPU (mapped, in its block format), device memory on a GPU.
    pub weights_bytes: u64,
    /// KV cache held by running sequences.
    pub kv_cache_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Slots {
    /// Sequences decoding now.
    pub in_use: usize,
    /// Sequences that may decode at once (`--max-concurrent`).
    pub total: usize,
    /// Jobs waiting for a slot.
    pub queued: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KvPages {
    /// Pages held by running sequences.
    pub used: usize,
    /// Pages held by finished sequences' caches kept for prefix reuse
    /// (free for new sequences: taken back as they need them).
    pub cached: usize,
    pub total: usize,
}

/// Worker state, from values kept up to date by the scheduler: never waits on inference.
#[utoipa::path(
    get,
    path = "/health",
    tag = "worker",
    responses(
        (status = 200, description = "Worker state", body = HealthResponse),
        (status = 503, description = "Draining after SIGTERM: the same body, status `draining`", body = HealthResponse),
    )
)]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let info = &state.model.info;
    let pool = state.model.scheduler.pool();
    let kv_cache_bytes = state.model.kv_bytes_used();
    // Readiness probes and load balancers read the status: a draining
    // worker takes no new jobs, so it says 503 (the body is the same).
    let status = if state.is_draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = Json(HealthResponse {
        status: if state.is_draining() {
            "draining"
        } else {
            "ok"
        }
        .into(),
        model: info.id.clone(),
        architecture: info.architecture.clone(),
        quant: info.quant.clone(),
        device: info.device.clone(),
        vocab_size: info.vocab_size,
        context_length: info.context_length,
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        memory: MemoryUsage {
            weights_bytes: info.weight_bytes,
            kv_cache_bytes,
            total_bytes: info.weight_bytes + kv_cache_bytes,
        },
        slots: Slots {
            in_use: state.model.running(),
            total: info.max_concurrent,
            queued: state.model.queued(),
        },
        kv_pages: KvPages {
            used: state.model.kv_pages_in_use(),
            cached: state.model.kv_pages_cached(),
            total: pool.total_pages(),
        },
    });
    (status, body).into_response()
}

/// Liveness: 200 whenever the process serves HTTP, loading and draining
/// included, so that an orchestrator restarts only a worker that is stuck.
#[utoipa::path(
    get,
    path = "/live",
    tag = "worker",
    responses((status = 200, description = "The process serves HTTP", body = ReadyResponse))
)]
pub async fn live() -> Json<ReadyResponse> {
    Json(ReadyResponse {
        status: "alive".into(),
    })
}

/// Readiness, for Kubernetes probes and load balancers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// `ready`, `loading` or `draining` (`alive` from `/live`).
    pub status: String,
}

/// Readiness: 200 while the worker takes new jobs; 503 while it loads the
/// model or drains after SIGTERM. (`/health` is liveness: 200 while the
/// process works, 503 only while draining.)
#[utoipa::path(
    get,
    path = "/ready",
    tag = "worker",
    responses(
        (status = 200, description = "Taking new jobs", body = ReadyResponse),
        (status = 503, description = "Loading or draining", body = ReadyResponse),
    )
)]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        ready_response("draining")
    } else {
        ready_response("ready")
    }
}

/// The `/ready` answer for `status`: 200 only when `ready`.
pub fn ready_response(status: &str) -> Response {
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(ReadyResponse {
            status: status.into(),
        }),
    )
        .into_response()
}

/// How loaded the worker is, for a router choosing among replicas.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadResponse {
    /// Whether it takes new jobs (not draining).
    pub ready: bool,
    /// Jobs decoding now.
    pub running: usize,
    /// Jobs waiting for a slot.
    pub queued: usize,
    /// Jobs that may decode at once.
    pub max_concurrent: usize,
    /// Jobs it can still take before answering 503 (free slots plus free queue places).
    pub available: usize,
    /// Fraction of the KV-cache pool that is free (0 to 1).
    pub kv_free_ratio: f64,
}

/// Load signals, cheap to poll: read from counters the scheduler keeps.
#[utoipa::path(
    get,
    path = "/load",
    tag = "worker",
    responses((status = 200, description = "Load now", body = LoadResponse))
)]
pub async fn load(State(state): State<Arc<AppState>>) -> Json<LoadResponse> {
    let info = &state.model.info;
    let pool = state.model.scheduler.pool();
    let (running, queued) = (state.model.running(), state.model.queued());
    let capacity = info.max_concurrent + info.max_queue;
    Json(LoadResponse {
        ready: !state.is_draining(),
        running,
        queued,
        max_concurrent: info.max_concurrent,
        available: capacity.saturating_sub(running + queued),
        kv_free_ratio: pool.free_pages() as f64 / pool.total_pages().max(1) as f64,
    })
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "worker",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state
        .metrics
        .render(&state.model, state.started.elapsed(), !state.is_draining());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `2025-01-02T03:04:05.678Z` (UTC) for `time`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64, ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_735_689_599, 999), "2024-12-31T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
    }
}
