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
pub mod tokenize;
pub mod tools;
pub mod validate;
pub mod worker_api;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
/// Longest correlation id taken from a request; longer ones, or ones with
/// characters outside `A-Z a-z 0-9 . _ : -`, are replaced by a new id.
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
    /// Origins (`https://app.example.com`) whose web pages may call the API
    /// (CORS); none by default, so browsers keep other sites' pages out.
    pub cors_origins: Vec<String>,
    /// A connection must send a request's headers within this long (an idle
    /// keep-alive connection, its next request's); otherwise it is closed.
    pub header_timeout: Duration,
    /// A request's body must arrive within this long (408 otherwise).
    pub body_timeout: Duration,
    /// Connections held open at once; more are closed as they arrive.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_key: None,
            worker_id: "worker-orcd".into(),
            callback_url: None,
            model_ref: None,
            drain_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl ServerConfig {
    /// Settings that can never work are refused before the model loads.
    pub fn check(&self) -> Result<()> {
        if self.api_key.as_ref().is_some_and(|k| k.trim().is_empty()) {
            anyhow::bail!(
                "the API key is empty: an empty key would leave the worker open; give a key or none"
            );
        }
        if let Some(url) = &self.callback_url {
            callback::check_url(url)?;
        }
        for origin in &self.cors_origins {
            cors_origin(origin)?;
        }
        anyhow::ensure!(
            self.max_connections >= 1,
            "--max-connections must be at least 1"
        );
        anyhow::ensure!(
            !self.header_timeout.is_zero() && !self.body_timeout.is_zero(),
            "the header and body timeouts must be more than 0"
        );
        Ok(())
    }
}

/// `scheme://host[:port]`, as browsers send it in `Origin`.
fn cors_origin(origin: &str) -> Result<HeaderValue> {
    let parsed = reqwest::Url::parse(origin)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .filter(|u| u.path() == "/" && u.query().is_none() && !origin.ends_with('/'));
    anyhow::ensure!(
        parsed.is_some(),
        "--cors-origin {origin:?}: expected an origin such as https://app.example.com (scheme, host and port only)"
    );
    Ok(HeaderValue::from_str(origin)?)
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
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let router = Router::new()
        .route("/health", get(worker_api::health))
        .route("/live", get(worker_api::live))
        .route("/ready", get(worker_api::ready))
        .route("/load", get(worker_api::load))
        .route("/metrics", get(worker_api::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), observe));
    // Outermost, so that a browser's preflight is answered before auth.
    let router = match cors_layer(&state.config.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// CORS for the allowed origins (none: no CORS headers, so browsers let no
/// other site's page read a response or send a JSON body).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::Method;
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    // Checked by ServerConfig::check; one that is not valid is left out.
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| cors_origin(o).ok()).collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, CORRELATION_ID])
            .expose_headers([CORRELATION_ID])
            .max_age(Duration::from_secs(600)),
    )
}

/// Give each request a span carrying its correlation id (the caller's
/// `X-Correlation-Id`, or a new one), echo the id, count the response.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(&CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_correlation_id(v));
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
        correlation_id = correlation_id.as_str(),
        method = request.method().as_str(),
        route = route.as_str()
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

/// A caller's id that may go into logs and headers as it is: 1 to 128 of
/// `A-Z a-z 0-9 . _ : -` (the `job_id` alphabet), so that it cannot forge a
/// log line or a field.
fn is_correlation_id(id: &str) -> bool {
    (1..=MAX_CORRELATION_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The token of an `Authorization: Bearer <token>` value; the scheme name
/// is case-insensitive (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
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
        .and_then(bearer_token)
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
    config.check()?;
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
    let drained = {
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
    let server = serve_connections(
        &listener,
        router(state.clone()),
        &state.config,
        true,
        drained,
    );
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
        () = server => {}
        () = deadline => warn!("connections still open after the drain deadline; stopping anyway"),
    }
    if let Some(task) = announce {
        task.abort();
    }
    info!("stopped");
    Ok(())
}

/// Accept connections and serve `app` on each until `until` resolves; then
/// stop accepting and wait for the open connections to finish their
/// requests. Each connection must send a request's headers within the
/// header timeout (an idle keep-alive connection too) and at most
/// `max_connections` are open at once: a client that opens many and sends
/// nothing (slowloris) is closed instead of holding the worker's files.
/// Serves `app` on `listener` until `until`, then lets the open
/// connections finish. Without `keep_alive` every response closes its
/// connection: the loading phase's server hands the port over to the
/// loaded one, and a client's idle keep-alive connection closed at that
/// moment would fail the request it was about to send on it.
async fn serve_connections(
    listener: &TcpListener,
    app: Router,
    config: &ServerConfig,
    keep_alive: bool,
    until: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let connections = GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(keep_alive);
    let mut last_refusal_logged: Option<Instant> = None;
    tokio::pin!(until);
    loop {
        let tcp = tokio::select! {
            () = &mut until => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    warn!(error = e.to_string(), "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Closed at once (dropped): a flood must not queue up file descriptors.
            if last_refusal_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                last_refusal_logged = Some(Instant::now());
                warn!(
                    max_connections = config.max_connections,
                    "connection limit reached: closing new connections"
                );
            }
            continue;
        };
        // Tokens go out one small write at a time; do not let Nagle hold them.
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = connections.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            // A client that goes away or times out is not an error of the worker's.
            let _ = connection.await;
            drop(permit);
        });
    }
    connections.shutdown().await;
}

/// Serve on `listener` while `load` loads the model, then as [`run`]: the
/// port answers from the start, `/health` (liveness) with 200 and
/// `loading`, `/ready` with 503, every other route with a retriable 503. A
/// failed load is returned; a shutdown asked for while loading returns at once.
pub async fn run_after_loading(
    listener: TcpListener,
    load: impl Future<Output = Result<Model>>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use futures_util::FutureExt;
    config.check()?;
    let shutdown = shutdown.shared();
    let loading = Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "loading"})) }),
        )
        .route(
            "/ready",
            get(|| async { worker_api::ready_response("loading") }),
        )
        .route("/live", get(worker_api::live))
        .fallback(|| async {
            ApiError::Unavailable("the worker is loading its model".into()).into_response()
        });
    let mut loaded = None;
    {
        let load = load.map(|model| loaded = Some(model));
        let until = async {
            tokio::select! {
                () = load => {}
                () = shutdown.clone() => {}
            }
        };
        serve_connections(&listener, loading, &config, false, until).await;
    }
    match loaded {
        None => {
            info!("shut down while loading");
            Ok(())
        }
        Some(Err(e)) => Err(e),
        Some(Ok(model)) => run(listener, model, config, shutdown).await,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for (value, token) in [
            ("Bearer k3y", Some("k3y")),
            ("bearer k3y", Some("k3y")),
            ("BEARER  k3y", Some("k3y")),
            ("Basic k3y", None),
            ("Bearerk3y", None),
            ("k3y", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn correlation_ids_are_restricted_to_a_safe_alphabet() {
        assert!(is_correlation_id("req-42.a_b:c"));
        for bad in [
            "",
            "x}:_server::worker_api:_job_finished_job_id=\"evil\"",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!is_correlation_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let with = |edit: &dyn Fn(&mut ServerConfig)| {
            let mut config = ServerConfig::default();
            edit(&mut config);
            config.check().map_err(|e| e.to_string())
        };
        assert!(with(&|_| {}).is_ok());
        let err = with(&|c| c.api_key = Some(String::new())).unwrap_err();
        assert!(err.contains("the API key is empty"), "{err}");
        assert!(with(&|c| c.api_key = Some("  ".into())).is_err());
        for url in [
            "notaurl",
            "ftp://host/x",
            "http://",
            "https://",
            "mailto:ops@example.com",
        ] {
            let err = with(&|c| c.callback_url = Some(url.into())).unwrap_err();
            assert!(err.contains("--callback-url"), "{url}: {err}");
        }
        assert!(with(&|c| c.callback_url = Some("https://orch.example:8443/ready".into())).is_ok());
        for origin in [
            "*",
            "example.com",
            "https://a.example/path",
            "https://a.example/",
        ] {
            assert!(
                with(&|c| c.cors_origins = vec![origin.into()]).is_err(),
                "{origin}"
            );
        }
        assert!(with(&|c| c.cors_origins = vec!["http://localhost:3000".into()]).is_ok());
    }
}
