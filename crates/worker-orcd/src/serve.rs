//! `serve`: run the worker's HTTP service (crates/server) on one model.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use server::{BackendInfo, Model, ModelOptions, ServerConfig};
use tokio::net::TcpListener;

use crate::run;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: run::ModelArgs,
    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "WORKER_ORCD_PORT")]
    pub port: u16,
    /// Address to listen on: loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1", env = "WORKER_ORCD_HOST")]
    pub host: String,
    #[command(flatten)]
    pub gpu: run::GpuArgs,
    /// The id the ready callback reports [default: worker-orcd-PORT].
    #[arg(long, env = "WORKER_ORCD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// POST {worker_id, model_ref, vram_bytes, uri, capabilities} here once serving; retried with backoff until accepted.
    #[arg(long, env = "WORKER_ORCD_CALLBACK_URL")]
    pub callback_url: Option<String>,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 8, env = "WORKER_ORCD_MAX_CONCURRENT")]
    pub max_concurrent: usize,
    /// Jobs waiting behind full slots (one a free slot can take is not
    /// counted); more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, env = "WORKER_ORCD_MAX_QUEUE")]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /execute, /cancel and /v1/*
    /// (an empty key is refused). Prefer the environment variable or
    /// --api-key-file: a flag shows in `ps`.
    #[arg(long, env = "WORKER_ORCD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Read the API key from this file (its first line).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "api_key",
        env = "WORKER_ORCD_API_KEY_FILE"
    )]
    pub api_key_file: Option<PathBuf>,
    /// Seconds running jobs may go on after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30, env = "WORKER_ORCD_DRAIN_TIMEOUT")]
    pub drain_timeout: u64,
    /// An origin (`https://app.example.com`) whose web pages may call the
    /// API (CORS; repeatable). None by default.
    #[arg(
        long = "cors-origin",
        value_name = "ORIGIN",
        env = "WORKER_ORCD_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Connections open at once; more are closed as they arrive.
    #[arg(long, default_value_t = 1024, env = "WORKER_ORCD_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Seconds a connection has to send a request's headers.
    #[arg(long, default_value_t = 10, env = "WORKER_ORCD_HEADER_TIMEOUT")]
    pub header_timeout: u64,
    /// Seconds a request's body has to arrive.
    #[arg(long, default_value_t = 30, env = "WORKER_ORCD_BODY_TIMEOUT")]
    pub body_timeout: u64,
    /// Log lines as text or as one JSON object each.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "WORKER_ORCD_LOG_FORMAT")]
    pub log_format: String,
}

impl ServeArgs {
    /// The service's settings, checked, before anything is loaded.
    fn config(&self, port: u16) -> Result<ServerConfig> {
        let api_key = match &self.api_key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the API key from {}", path.display()))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            None => self.api_key.clone(),
        };
        let config = ServerConfig {
            api_key,
            worker_id: self
                .worker_id
                .clone()
                .unwrap_or_else(|| format!("worker-orcd-{port}")),
            callback_url: self.callback_url.clone(),
            model_ref: None,
            drain_timeout: Duration::from_secs(self.drain_timeout),
            cors_origins: self.cors_origins.clone(),
            header_timeout: Duration::from_secs(self.header_timeout),
            body_timeout: Duration::from_secs(self.body_timeout),
            max_connections: self.max_connections,
        };
        config.check()?;
        Ok(config)
    }
}

pub fn run_serve(args: &ServeArgs) -> Result<()> {
    init_logging(&args.log_format);
    run::set_threads(args.model.threads)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Bind before loading, so that a taken port fails at once.
        let listener = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let port = listener.local_addr()?.port();
        let config = args.config(port)?;
        let model_arg = args.model.model.clone();
        let options = ModelOptions {
            ctx_size: args.model.ctx_size,
            ctx_beyond_training: args.model.allow_ctx_beyond_training,
            chat_template: args.model.chat_template_source()?,
            max_concurrent: args.max_concurrent,
            max_queue: args.max_queue,
            step_tokens: args.model.step_tokens,
            prefix_cache: !args.model.no_prefix_cache,
        };
        let device = args.model.device.clone();
        let gpu = args.gpu.clone();
        let activations = args.model.activations();
        // The port answers while the model loads: /health 200, /ready 503.
        let load = async move {
            tokio::task::spawn_blocking(move || {
                let path = run::resolve_model(&model_arg)?;
                match device.as_str() {
                    "cuda" => load_cuda(&path, &options, &gpu),
                    _ => Model::load_with(&path, &options, |file, spec, sizing| {
                        let (model, info) = server::cpu_backend(file, spec, sizing.context)?;
                        Ok((model.with_activations(activations), info))
                    }),
                }
            })
            .await
            .context("loading the model")?
        };
        server::run_after_loading(listener, load, config, shutdown_signal()).await
    })
}

/// The model on a GPU: its KV pages and workspace sized as the scheduler will use them.
fn load_cuda(path: &Path, options: &ModelOptions, gpu: &run::GpuArgs) -> Result<Model> {
    Model::load_with(path, options, |file, _spec, sizing| {
        let options = gpu.options(sizing.kv_pages, sizing.step_tokens, Some(sizing.context));
        let model = cuda::CudaModel::load(file, &options)?;
        let report = model.report();
        let (pages, _) = model.kv_pages();
        let info = BackendInfo {
            device: report.device.clone(),
            weight_bytes: report.weights_bytes + report.vector_bytes,
            kv_page_bytes: report.kv_bytes / pages.max(1) as u64,
            device_bytes: Some(report.used_bytes),
        };
        Ok((model, info))
    })
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Logs to stderr, as text or one JSON object a line (`format`); `RUST_LOG`
/// filters them [default: info].
fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
