//! Jobs in flight: submitting a validated request to the scheduler, the
//! bridge from the scheduler thread's events to the async side, and the
//! registry of cancel flags that `/cancel` and draining use.
//!
//! A job is cancelled in three ways, all ending in the scheduler's
//! `End(CANCELLED)`: `/cancel` or the drain deadline sets its flag; the
//! response stream is dropped (the client went away), which sets the flag
//! through [`JobGuard`]'s `Drop` and makes the sink return `false`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use engine::scheduler::{Event, Job, SubmitError};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tracing::{info, warn, Span};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::validate::ValidRequest;
use crate::AppState;

/// Token id the scheduler gives the text it releases at the end of a job
/// (held back while it might have been a stop string); not a generated token.
const TAIL_TEXT: u32 = u32::MAX;

/// Cancel flags of the jobs in flight, by job id.
#[derive(Clone, Default)]
pub struct Jobs {
    active: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        // A panic while holding this lock leaves a consistent map (every
        // operation is a single insert or remove), so poisoning is ignored.
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, id: &str) -> Result<JobGuard, ApiError> {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut active = self.lock();
        if active.contains_key(id) {
            return Err(ApiError::DuplicateJob(id.to_string()));
        }
        active.insert(id.to_string(), cancel.clone());
        Ok(JobGuard {
            jobs: self.clone(),
            id: id.to_string(),
            cancel,
        })
    }

    /// Ask job `id` to stop; `false` when no such job is in flight.
    pub fn cancel(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some(flag) => {
                flag.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Ask every job in flight to stop; returns how many there were.
    pub fn cancel_all(&self) -> usize {
        let active = self.lock();
        for flag in active.values() {
            flag.store(true, Ordering::Release);
        }
        active.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A job's place in the registry; dropping it (the job ended, or its
/// response was dropped mid-way) cancels the job if it still runs and
/// frees the id.
pub struct JobGuard {
    jobs: Jobs,
    id: String,
    cancel: Arc<AtomicBool>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
        self.jobs.lock().remove(&self.id);
    }
}

/// A submitted job: its events, in the scheduler's order.
pub struct RunningJob {
    pub events: UnboundedReceiver<Event>,
    pub seed: u64,
    pub prompt_tokens: usize,
    _guard: JobGuard,
}

/// Queue a validated request under `id`; `api` labels its metrics.
pub fn submit(
    state: &AppState,
    id: &str,
    api: &'static str,
    request: ValidRequest,
) -> Result<RunningJob, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable(
            "the worker is shutting down and takes no new jobs".into(),
        ));
    }
    let guard = state.jobs.register(id)?;
    // Unbounded: the scheduler thread must never block on a slow client,
    // and a job sends at most one event per generated token plus three.
    let (tx, events) = mpsc::unbounded_channel();
    let seed = request.params.sampling.seed;
    let prompt_tokens = request.prompt.len();
    let metrics = state.metrics.clone();
    let mut last_token: Option<Instant> = None;
    let mut log = JobLog {
        span: Span::current(),
        id: id.to_string(),
        ended: false,
    };
    let sink = Box::new(move |event: Event| {
        record(&metrics, api, &event, &mut last_token);
        log.event(&event);
        tx.send(event).is_ok()
    });
    state
        .model
        .scheduler
        .submit(Job {
            prompt: request.prompt,
            params: request.params,
            cancel: guard.cancel.clone(),
            sink,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::QueueFull,
            SubmitError::Stopped => ApiError::Unavailable("the scheduler has stopped".into()),
        })?;
    Ok(RunningJob {
        events,
        seed,
        prompt_tokens,
        _guard: guard,
    })
}

/// Logs each job's end once, whatever ended it (its last token, a stop, a
/// cancel, a client that went away, a failure), in the request's span. It
/// lives in the scheduler's sink, which sees every job to its end even when
/// nobody reads the events any more.
struct JobLog {
    span: Span,
    id: String,
    ended: bool,
}

impl JobLog {
    fn event(&mut self, event: &Event) {
        let job_id = self.id.as_str();
        match event {
            Event::End(finish) => self.span.in_scope(|| {
                info!(
                    job_id,
                    stop_reason = finish.stop_reason.as_str(),
                    prompt_tokens = finish.prompt_tokens,
                    cached_tokens = finish.cached_tokens,
                    tokens_out = finish.tokens_out,
                    decode_ms = finish.decode_time.as_millis() as u64,
                    "job finished"
                )
            }),
            Event::Error { message } => self
                .span
                .in_scope(|| warn!(job_id, error = message.as_str(), "job failed")),
            _ => return,
        }
        self.ended = true;
    }
}

impl Drop for JobLog {
    fn drop(&mut self) {
        if !self.ended {
            let job_id = self.id.as_str();
            self.span
                .in_scope(|| warn!(job_id, "job dropped: the scheduler stopped before it ended"));
        }
    }
}

/// Update the metrics for one event; runs on the scheduler thread as the event happens.
fn record(metrics: &Metrics, api: &str, event: &Event, last_token: &mut Option<Instant>) {
    match event {
        Event::Token { id, .. } if *id != TAIL_TEXT => {
            let now = Instant::now();
            if let Some(previous) = last_token.replace(now) {
                metrics
                    .inter_token_latency
                    .observe((now - previous).as_secs_f64());
            }
            metrics.generated_tokens.inc();
        }
        Event::End(finish) => {
            metrics
                .jobs
                .with_label_values(&[api, finish.stop_reason.as_str()])
                .inc();
            metrics.prompt_tokens.inc_by(finish.prompt_tokens as u64);
            metrics
                .prefix_cache_hit_tokens
                .inc_by(finish.cached_tokens as u64);
            if let Some(ttft) = finish.time_to_first_token {
                metrics.time_to_first_token.observe(ttft.as_secs_f64());
            }
        }
        Event::Error { .. } => metrics.jobs.with_label_values(&[api, "ERROR"]).inc(),
        _ => {}
    }
}
