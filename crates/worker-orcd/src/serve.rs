//! `serve`: run the worker's HTTP service (crates/server) on one model.

use std::io::IsTerminal;
use std::path::Path;
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
    #[arg(long)]
    pub port: u16,
    /// Address to listen on: loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[command(flatten)]
    pub gpu: run::GpuArgs,
    /// The id the ready callback reports [default: worker-orcd-PORT].
    #[arg(long)]
    pub worker_id: Option<String>,
    /// POST {worker_id, model_ref, vram_bytes, uri, capabilities} here once serving; retried with backoff until accepted.
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 8)]
    pub max_concurrent: usize,
    /// Jobs waiting for a slot beyond those; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /execute, /cancel and /v1/*.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Seconds running jobs may go on after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
}

pub fn run_serve(args: &ServeArgs) -> Result<()> {
    init_logging();
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
        let path = run::resolve_model(&args.model.model)?;
        let options = ModelOptions {
            ctx_size: args.model.ctx_size,
            max_concurrent: args.max_concurrent,
            max_queue: args.max_queue,
            ..ModelOptions::default()
        };
        let device = args.model.device.clone();
        let gpu = args.gpu.clone();
        let activations = args.model.activations();
        let model = tokio::task::spawn_blocking(move || match device.as_str() {
            "cuda" => load_cuda(&path, &options, &gpu),
            _ => Model::load_with(&path, &options, |file, spec, _| {
                let (model, info) = server::cpu_backend(file, spec)?;
                Ok((model.with_activations(activations), info))
            }),
        })
        .await
        .context("loading the model")??;
        let port = listener.local_addr()?.port();
        let config = ServerConfig {
            api_key: args.api_key.clone(),
            worker_id: args
                .worker_id
                .clone()
                .unwrap_or_else(|| format!("worker-orcd-{port}")),
            callback_url: args.callback_url.clone(),
            model_ref: None,
            drain_timeout: Duration::from_secs(args.drain_timeout),
        };
        server::run(listener, model, config, shutdown_signal()).await
    })
}

/// The model on a GPU: its KV pages and workspace sized as the scheduler will use them.
fn load_cuda(path: &Path, options: &ModelOptions, gpu: &run::GpuArgs) -> Result<Model> {
    Model::load_with(path, options, |file, _spec, sizing| {
        let options = gpu.options(sizing.kv_pages, sizing.step_tokens);
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

/// Logs to stderr; `RUST_LOG` filters them [default: info].
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
