//! The ready callback: once the worker serves, it tells the orchestrator
//! where it is and what it runs. A refused or failed callback is logged
//! and retried with exponential backoff until it is accepted or the worker
//! stops; it never stops the worker.

use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

/// First delay between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One attempt's limit, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Body of the ready callback.
#[derive(Clone, Debug, Serialize)]
pub struct ReadyPayload {
    pub worker_id: String,
    /// The model file as given to `--model`.
    pub model_ref: String,
    /// Memory the model holds on its device: on a GPU, what loading took
    /// (measured); on the CPU, the weights plus the whole KV budget.
    pub vram_bytes: u64,
    /// Where the worker listens, e.g. `http://127.0.0.1:8080`.
    pub uri: String,
    pub capabilities: Capabilities,
}

#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    pub model: String,
    pub architecture: String,
    pub quant: String,
    pub device: String,
    pub context_length: usize,
    pub max_concurrent: usize,
    /// The OpenAI-compatible routes (`/v1/...`) are served too.
    pub openai_compatible: bool,
    pub streaming: bool,
}

/// Check a callback URL at startup: an `http` or `https` URL with a host.
/// One that can never work fails at once instead of being retried forever.
pub fn check_url(url: &str) -> anyhow::Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("--callback-url {url:?} is not a URL: {e}"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "http" | "https"),
        "--callback-url {url:?}: the scheme must be http or https, not {:?}",
        parsed.scheme()
    );
    anyhow::ensure!(
        parsed.host_str().is_some_and(|h| !h.is_empty()),
        "--callback-url {url:?} has no host"
    );
    Ok(parsed)
}

/// `backoff` less up to half of it, at random, so that a fleet of workers
/// restarted together does not retry in step.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(1.0 - rand::random::<f64>() * 0.5)
}

/// POST `payload` to `url` until it is accepted (2xx), backing off between
/// attempts (doubling up to [`MAX_BACKOFF`], with jitter); a refusal (4xx,
/// 5xx) is logged with its status and retried the same way. The caller
/// aborts it when the worker begins to drain. `url` was checked by [`check_url`].
pub async fn announce(url: String, payload: ReadyPayload) {
    let client = match reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            warn!(
                url,
                error = causes(&e),
                "cannot build the HTTP client for the ready callback"
            );
            return;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1u32.. {
        match client.post(&url).json(&payload).send().await {
            Ok(response) if response.status().is_success() => {
                info!(url, attempt, "ready callback accepted");
                return;
            }
            Ok(response) => warn!(
                url,
                attempt,
                status = response.status().as_u16(),
                retry_in_ms = backoff.as_millis() as u64,
                "ready callback refused"
            ),
            Err(e) => warn!(
                url,
                attempt,
                error = causes(&e),
                retry_in_ms = backoff.as_millis() as u64,
                "ready callback failed"
            ),
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// An error with its causes (reqwest's own message is only "error sending request").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
