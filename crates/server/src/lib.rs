//! The worker's HTTP service: the worker API an orchestrator drives
//! (`/execute` streaming a job as server-sent events, `/cancel`, `/health`,
//! `/metrics`), an OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`) and the OpenAPI description of both
//! (`/openapi.json`).
//!
//! It exists as its own crate so that HTTP stays out of the engine and out
//! of the binary: requests are validated here into [`validate::ValidRequest`]s
//! whose errors name the field, then handed to the engine's scheduler, the
//! one thread that runs the model for every front end. Each job's events
//! come back through a channel and go out as they happen; a job whose
//! client goes away is cancelled and its KV pages return to the pool.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let model = server::Model::load("model.gguf".as_ref(), &server::ModelOptions::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = async { tokio::signal::ctrl_c().await.ok(); };
//! server::run(listener, model, server::ServerConfig::default(), shutdown).await
//! # }
//! ```

pub mod callback;
mod de;
pub mod error;
mod jobs;
pub mod metrics;
mod model;
pub mod openai;
pub mod openapi;
pub mod validate;
pub mod worker_api;

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tracing::{info, info_span, warn, Instrument};

pub use callback::{Capabilities, ReadyPayload};
pub use error::{ApiError, FieldError, MAX_BODY_BYTES};
pub use jobs::Jobs;
pub use metrics::Metrics;
pub use model::{cpu_backend, BackendInfo, Model, ModelInfo, ModelOptions, Sizing};

/// Header carrying the caller's request id; echoed and logged with the job.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// Longest correlation id taken from a request; longer (or non-visible-ASCII) ones are replaced.
const MAX_CORRELATION_ID: usize = 128;

/// How the service runs around the model.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer <key>` on every route but `/health`, `/metrics` and `/openapi.json`.
    pub api_key: Option<String>,
    /// The id the ready callback reports.
    pub worker_id: String,
    /// Where to POST the ready callback, if anywhere.
    pub callback_url: Option<String>,
    /// The model as the orchestrator named it (`model_ref` in the callback).
    pub model_ref: Option<String>,
    /// After shutdown is asked for, running jobs may finish for this long; then they are cancelled.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_key: None,
            worker_id: "worker-orcd".into(),
            callback_url: None,
            model_ref: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub model: Model,
    pub metrics: Arc<Metrics>,
    pub jobs: Jobs,
    pub config: ServerConfig,
    pub started: Instant,
    /// Unix time the worker started (`created` of `/v1/models`).
    pub created_unix: u64,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(model: Model, config: ServerConfig) -> AppState {
        AppState {
            model,
            metrics: Arc::new(Metrics::new()),
            jobs: Jobs::default(),
            config,
            started: Instant::now(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Validate on a blocking thread: tokenizing a long prompt or rendering
    /// a chat template must not hold up the threads serving `/health`.
    pub async fn validate_off_thread<T, F>(self: &Arc<Self>, validate: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&AppState) -> Result<T, Vec<FieldError>> + Send + 'static,
    {
        let state = self.clone();
        tokio::task::spawn_blocking(move || validate(&state))
            .await
            .map_err(|e| ApiError::Internal(format!("validation failed: {e}")))?
            .map_err(ApiError::Invalid)
    }
}

/// All routes, with body limit, bearer auth and correlation ids.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/execute", post(worker_api::execute))
        .route("/cancel", post(worker_api::cancel))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(worker_api::health))
        .route("/metrics", get(worker_api::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Give each request a span carrying its correlation id (the caller's
/// `X-Correlation-Id`, or a new one), echo the id, count the response.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(&CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_CORRELATION_ID
                && v.bytes().all(|b| b.is_ascii_graphic())
        });
    let correlation_id = match given {
        Some(id) => id.to_string(),
        None => format!("{:016x}", rand::random::<u64>()),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let span = info_span!(
        "request",
        correlation_id = %correlation_id,
        method = %request.method(),
        route = %route
    );
    let mut response = next.run(request).instrument(span).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response.headers_mut().insert(
        CORRELATION_ID,
        HeaderValue::from_str(&correlation_id).expect("visible ASCII"),
    );
    response
}

/// With `--api-key`, require `Authorization: Bearer <key>`.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.config.api_key else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        return next.run(request).await;
    }
    if request.uri().path().starts_with("/v1/") {
        ApiError::Unauthorized.openai().into_response()
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Compare without stopping at the first difference, so timing does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serve on `listener` until `shutdown` resolves, then drain: new jobs are
/// refused with 503, running ones may finish for `config.drain_timeout` and
/// are then cancelled (each still gets its final event); once none is left
/// the listener closes, and the server returns when every response has ended.
pub async fn run(
    listener: TcpListener,
    model: Model,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let address = listener.local_addr()?;
    let uri = format!("http://{address}");
    let state = Arc::new(AppState::new(model, config));
    info!(
        %uri,
        model = state.model.info.id,
        architecture = state.model.info.architecture,
        quant = state.model.info.quant,
        context = state.model.info.context_length,
        max_concurrent = state.model.info.max_concurrent,
        "serving"
    );
    let announce = state
        .config
        .callback_url
        .clone()
        .map(|url| tokio::spawn(callback::announce(url, ready_payload(&state, uri.clone()))));

    let (drain_tx, mut drain_rx) = tokio::sync::watch::channel(false);
    let graceful = {
        let state = state.clone();
        // A draining worker is no longer ready: stop announcing it.
        let stop_announcing = announce.as_ref().map(|task| task.abort_handle());
        async move {
            shutdown.await;
            state.draining.store(true, Ordering::Release);
            if let Some(task) = stop_announcing {
                task.abort();
            }
            info!(
                jobs = state.jobs.len(),
                deadline_s = state.config.drain_timeout.as_secs_f64(),
                "shutting down: draining running jobs"
            );
            let _ = drain_tx.send(true);
            // Keep accepting connections while jobs run, so that /health says
            // `draining` and new jobs get a retriable 503 rather than a refused connection.
            while !state.jobs.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let listener = listener.tap_io(|tcp| {
        // Tokens go out one small write at a time; do not let Nagle hold them.
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(graceful)
        .into_future();
    let deadline = {
        let state = state.clone();
        async move {
            let _ = drain_rx.wait_for(|draining| *draining).await;
            tokio::time::sleep(state.config.drain_timeout).await;
            let cancelled = state.jobs.cancel_all();
            if cancelled > 0 {
                warn!(
                    cancelled,
                    "drain deadline reached: cancelling the jobs still running"
                );
            }
            // Cancelled jobs end within a decode step; give their streams time to close.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    tokio::select! {
        result = server => result?,
        () = deadline => warn!("connections still open after the drain deadline; stopping anyway"),
    }
    if let Some(task) = announce {
        task.abort();
    }
    info!("stopped");
    Ok(())
}

fn ready_payload(state: &AppState, uri: String) -> ReadyPayload {
    let info = &state.model.info;
    let kv_budget = state.model.scheduler.pool().total_pages() as u64 * info.kv_page_bytes;
    ReadyPayload {
        worker_id: state.config.worker_id.clone(),
        model_ref: state
            .config
            .model_ref
            .clone()
            .unwrap_or_else(|| info.path.clone()),
        vram_bytes: info.device_bytes.unwrap_or(info.weight_bytes + kv_budget),
        uri,
        capabilities: Capabilities {
            model: info.id.clone(),
            architecture: info.architecture.clone(),
            quant: info.quant.clone(),
            device: info.device.clone(),
            context_length: info.context_length,
            max_concurrent: info.max_concurrent,
            openai_compatible: true,
            streaming: true,
        },
    }
}
