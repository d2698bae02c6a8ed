//! Prometheus metrics. Counters and histograms are updated as events
//! happen (token latencies on the scheduler thread, through the job's
//! sink, so a slow client does not skew them); gauges are read from the
//! scheduler when `/metrics` is scraped.

use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::model::Model;

pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route template and status code.
    pub http_requests: IntCounterVec,
    /// Jobs finished, by API (`worker`, `openai`) and how they ended (`MAX_TOKENS`, …, `ERROR`).
    pub jobs: IntCounterVec,
    pub prompt_tokens: IntCounter,
    /// Prompt tokens of finished jobs that came from the prefix cache.
    pub prefix_cache_hit_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    queue_depth: IntGauge,
    running: IntGauge,
    kv_pages_used: IntGauge,
    kv_pages_total: IntGauge,
    kv_used_ratio: Gauge,
    prefix_cache_pages: IntGauge,
    prefix_cache_sequences: IntGauge,
    max_concurrent: IntGauge,
    ready: IntGauge,
    uptime: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "worker_orcd_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let jobs = IntCounterVec::new(
            Opts::new(
                "worker_orcd_jobs_total",
                "Generation jobs finished, by API and stop reason (ERROR for failures)",
            ),
            &["api", "stop_reason"],
        )
        .expect("valid metric");
        let prompt_tokens = IntCounter::new(
            "worker_orcd_prompt_tokens_total",
            "Prompt tokens of finished jobs",
        )
        .expect("valid metric");
        let prefix_cache_hit_tokens = IntCounter::new(
            "worker_orcd_prefix_cache_hit_tokens_total",
            "Prompt tokens of finished jobs taken from the prefix cache instead of being run",
        )
        .expect("valid metric");
        let prefix_cache_pages = IntGauge::new(
            "worker_orcd_prefix_cache_pages",
            "KV pages held by finished sequences' caches kept for prefix reuse (evicted when needed)",
        )
        .expect("valid metric");
        let prefix_cache_sequences = IntGauge::new(
            "worker_orcd_prefix_cache_sequences",
            "Finished sequences' caches kept for prefix reuse",
        )
        .expect("valid metric");
        let generated_tokens =
            IntCounter::new("worker_orcd_generated_tokens_total", "Tokens generated")
                .expect("valid metric");
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "worker_orcd_time_to_first_token_seconds",
                "From submission (queueing and prefill included) to the first generated token",
            )
            .buckets(vec![
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        let inter_token_latency = Histogram::with_opts(
            HistogramOpts::new(
                "worker_orcd_inter_token_latency_seconds",
                "Time between successive generated tokens of one job",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let queue_depth = IntGauge::new("worker_orcd_queued_jobs", "Jobs waiting for a slot")
            .expect("valid metric");
        let running =
            IntGauge::new("worker_orcd_running_jobs", "Jobs decoding now").expect("valid metric");
        let kv_pages_used = IntGauge::new(
            "worker_orcd_kv_pages_used",
            "KV-cache pages held by running sequences (kept prefix caches not counted)",
        )
        .expect("valid metric");
        let kv_pages_total =
            IntGauge::new("worker_orcd_kv_pages_total", "KV-cache pages in the pool")
                .expect("valid metric");
        let kv_used_ratio = Gauge::new(
            "worker_orcd_kv_used_ratio",
            "Fraction of the KV-cache pool held by running sequences (0 to 1)",
        )
        .expect("valid metric");
        let max_concurrent = IntGauge::new(
            "worker_orcd_max_concurrent_jobs",
            "Jobs that may decode at once (--max-concurrent)",
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "worker_orcd_ready",
            "1 while the worker takes new jobs, 0 while it drains",
        )
        .expect("valid metric");
        let uptime = Gauge::new(
            "worker_orcd_uptime_seconds",
            "Seconds since the worker started",
        )
        .expect("valid metric");
        for collector in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(jobs.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(prefix_cache_hit_tokens.clone()),
            Box::new(prefix_cache_pages.clone()),
            Box::new(prefix_cache_sequences.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(inter_token_latency.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running.clone()),
            Box::new(kv_pages_used.clone()),
            Box::new(kv_pages_total.clone()),
            Box::new(kv_used_ratio.clone()),
            Box::new(max_concurrent.clone()),
            Box::new(ready.clone()),
            Box::new(uptime.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            http_requests,
            jobs,
            prompt_tokens,
            prefix_cache_hit_tokens,
            generated_tokens,
            time_to_first_token,
            inter_token_latency,
            queue_depth,
            running,
            kv_pages_used,
            kv_pages_total,
            kv_used_ratio,
            prefix_cache_pages,
            prefix_cache_sequences,
            max_concurrent,
            ready,
            uptime,
        }
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, model: &Model, uptime: Duration, ready: bool) -> String {
        self.queue_depth.set(model.queued() as i64);
        self.running.set(model.running() as i64);
        let pool = model.scheduler.pool();
        self.kv_pages_used.set(model.kv_pages_in_use() as i64);
        self.kv_pages_total.set(pool.total_pages() as i64);
        let stats = model.scheduler.stats();
        self.prefix_cache_pages.set(model.kv_pages_cached() as i64);
        self.prefix_cache_sequences
            .set(stats.kept_caches.load(Ordering::Acquire) as i64);
        self.kv_used_ratio
            .set(model.kv_pages_in_use() as f64 / pool.total_pages().max(1) as f64);
        self.max_concurrent.set(model.info.max_concurrent as i64);
        self.ready.set(i64::from(ready));
        self.uptime.set(uptime.as_secs_f64());
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
