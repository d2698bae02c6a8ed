//! Load test (ignored by default; a minute per client count): N clients each
//! stream `/execute` jobs back to back for a fixed time, and every request
//! must come back as a complete stream with exactly one final event.
//!
//! ```sh
//! cargo test --release -p server --test load -- --ignored --nocapture
//! LOAD_CLIENTS=32 LOAD_SECONDS=60 LOAD_MAX_TOKENS=32 cargo test --release -p server --test load -- --ignored --nocapture
//! # against a running worker instead of one in this process:
//! LOAD_URL=http://127.0.0.1:8080 cargo test --release -p server --test load -- --ignored --nocapture
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_execute_stream, SseReader, TestServer};
use serde_json::json;
use server::{ModelOptions, ServerConfig};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one client saw.
#[derive(Default)]
struct ClientReport {
    requests: usize,
    completed: usize,
    tokens: usize,
    failures: Vec<String>,
    ttft: Vec<Duration>,
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "List three uses of a paperclip:",
    "Once upon a time, in a village by the mountains,",
];

async fn client(
    http: reqwest::Client,
    base: String,
    id: usize,
    deadline: Instant,
    max_tokens: u32,
) -> ClientReport {
    let mut report = ClientReport::default();
    while Instant::now() < deadline {
        let n = report.requests;
        report.requests += 1;
        let body = json!({
            "job_id": format!("load-{id}-{n}"),
            "prompt": PROMPTS[(id + n) % PROMPTS.len()],
            "max_tokens": max_tokens,
            "seed": (id * 1000 + n) as u64,
        });
        let sent = Instant::now();
        let response = match http
            .post(format!("{base}/execute"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => r,
            Ok(r) => {
                report.failures.push(format!(
                    "HTTP {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ));
                continue;
            }
            Err(e) => {
                report.failures.push(format!("request: {e}"));
                continue;
            }
        };
        let mut reader = SseReader::new(response);
        let mut events = Vec::new();
        let mut first_token = None;
        while let Some(event) = reader.next().await {
            if event.event == "token" && first_token.is_none() {
                first_token = Some(sent.elapsed());
            }
            events.push(event);
        }
        // Panics (a broken grammar) are failures of the whole test.
        let (_, end) = check_execute_stream(&events);
        match events.last().map(|e| e.event.as_str()) {
            Some("end") => {
                report.completed += 1;
                report.tokens += end["tokens_out"].as_u64().unwrap() as usize;
                report.ttft.extend(first_token);
            }
            _ => report.failures.push(format!("error event: {end}")),
        }
    }
    report
}

async fn run(base: &str, clients: usize, seconds: u64, max_tokens: u32) -> (usize, usize, f64) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|id| {
            tokio::spawn(client(
                http.clone(),
                base.to_string(),
                id,
                deadline,
                max_tokens,
            ))
        })
        .collect();
    let mut total = ClientReport::default();
    for task in tasks {
        let r = task
            .await
            .expect("a client panicked: a stream broke the event grammar");
        total.requests += r.requests;
        total.completed += r.completed;
        total.tokens += r.tokens;
        total.failures.extend(r.failures);
        total.ttft.extend(r.ttft);
    }
    let elapsed = start.elapsed().as_secs_f64();
    total.ttft.sort();
    let pct = |p: f64| {
        total
            .ttft
            .get(((total.ttft.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let throughput = total.tokens as f64 / elapsed;
    println!(
        "{clients:>3} clients: {} requests, {} completed, {} failed, {} tokens in {elapsed:.1} s = {throughput:.1} tok/s; \
         TTFT p50 {:.0} ms, p99 {:.0} ms",
        total.requests,
        total.completed,
        total.failures.len(),
        total.tokens,
        pct(0.5),
        pct(0.99),
    );
    assert!(total.failures.is_empty(), "failures: {:?}", total.failures);
    assert_eq!(total.requests, total.completed, "requests lost");
    (total.requests, total.tokens, throughput)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "load test: about a minute per client count; run with --ignored --nocapture"]
async fn streaming_clients_for_a_minute() {
    let client_counts: Vec<usize> = std::env::var("LOAD_CLIENTS")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("LOAD_CLIENTS: comma-separated counts")
        })
        .collect();
    let seconds = env_or("LOAD_SECONDS", 60u64);
    let max_tokens = env_or("LOAD_MAX_TOKENS", 32u32);
    let most = *client_counts.iter().max().unwrap();
    let (_server, base) = match std::env::var("LOAD_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let options = ModelOptions {
                ctx_size: Some(512),
                max_concurrent: most,
                max_queue: most * 2,
                ..ModelOptions::default()
            };
            let server = TestServer::start_with(options, ServerConfig::default()).await;
            let base = server.url("");
            (Some(Arc::new(server)), base)
        }
    };
    println!("load test: {base}, {seconds} s per run, max_tokens {max_tokens}");
    for clients in client_counts {
        run(&base, clients, seconds, max_tokens).await;
        if let Some(server) = &_server {
            let health = server.wait_idle(Duration::from_secs(30)).await;
            assert_eq!(health["kv_pages"]["used"], 0, "{health}");
        }
    }
}
