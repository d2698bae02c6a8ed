//! A real server on a free loopback port, serving SmolLM2-135M from the
//! model cache, and helpers to read its server-sent events.

#![allow(dead_code)] // each test binary uses its own part of this

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use server::{Model, ModelOptions, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn model_path() -> PathBuf {
    let dir = match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME or WORKER_ORCD_MODELS"))
            .join(".cache/worker-orcd/models"),
    };
    let path = dir.join(MODEL_FILE);
    assert!(
        path.exists(),
        "test model {} is missing: run scripts/fetch-models.sh (or set WORKER_ORCD_MODELS to the folder holding it)",
        path.display()
    );
    path
}

/// Small contexts keep the tests' KV memory and prompts small.
pub fn options() -> ModelOptions {
    ModelOptions {
        ctx_size: Some(512),
        max_concurrent: 4,
        max_queue: 16,
        ..ModelOptions::default()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(options(), ServerConfig::default()).await
    }

    pub async fn start_with(options: ModelOptions, config: ServerConfig) -> TestServer {
        Self::start_model(&model_path(), options, config).await
    }

    pub async fn start_model(
        path: &std::path::Path,
        options: ModelOptions,
        config: ServerConfig,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let path = path.to_path_buf();
        let model = tokio::task::spawn_blocking(move || Model::load(&path, &options))
            .await
            .unwrap()
            .expect("loading the test model");
        let (tx, rx) = oneshot::channel();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(server::run(listener, model, config, shutdown));
        TestServer {
            addr,
            // Idle connections are dropped before the shortest header
            // timeout a test gives the server (1 s), which closes them: a
            // reused one it had closed would fail with a reset.
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_millis(500))
                .build()
                .expect("a client"),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Wait until no job holds KV pages or a slot (at most `limit`).
    pub async fn wait_idle(&self, limit: Duration) -> Value {
        let start = std::time::Instant::now();
        loop {
            let health = self.get_json("/health").await;
            let idle = health["kv_pages"]["used"] == 0
                && health["slots"]["in_use"] == 0
                && health["slots"]["queued"] == 0;
            if idle || start.elapsed() > limit {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ask for shutdown (as SIGTERM does) and wait for the server to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap().await.unwrap()
    }

    /// Ask for shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One server-sent event: its `event:` name (empty when none) and `data:`.
#[derive(Clone, Debug)]
pub struct Sse {
    pub event: String,
    pub data: String,
}

impl Sse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| {
            panic!(
                "event {:?} data is not JSON ({e}): {}",
                self.event, self.data
            )
        })
    }
}

/// Reads server-sent events from a streaming response as they arrive.
pub struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> SseReader {
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(Sse {
                    event,
                    data: data.join("\n"),
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("no event for 60 s")?
                .expect("reading the stream");
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8 chunk"));
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<Sse> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// The events of one `/execute` call.
pub async fn execute(server: &TestServer, body: &Value) -> Vec<Sse> {
    SseReader::new(server.post("/execute", body).await)
        .collect()
        .await
}

/// Check the event grammar of an `/execute` stream (started, token*, metrics?, end|error)
/// and return (text, end event).
pub fn check_execute_stream(events: &[Sse]) -> (String, Value) {
    assert!(!events.is_empty());
    assert_eq!(events[0].event, "started", "{events:?}");
    let last = events.last().unwrap();
    assert!(
        last.event == "end" || last.event == "error",
        "last event {last:?}"
    );
    let finals = events
        .iter()
        .filter(|e| e.event == "end" || e.event == "error")
        .count();
    assert_eq!(finals, 1, "exactly one final event: {events:?}");
    let mut text = String::new();
    let mut next_index = 0;
    let mut saw_metrics = false;
    for event in &events[1..events.len() - 1] {
        match event.event.as_str() {
            "token" => {
                assert!(!saw_metrics, "token after metrics");
                let data = event.json();
                let i = data["i"].as_u64().unwrap();
                // The text held back at the end comes with the last token's index.
                assert!(
                    i == next_index || i + 1 == next_index,
                    "token index {i} after {next_index}"
                );
                next_index = i + 1;
                text.push_str(data["t"].as_str().unwrap());
            }
            "metrics" => saw_metrics = true,
            other => panic!("unexpected event {other:?} mid-stream"),
        }
    }
    let end = last.json();
    if last.event == "end" {
        assert_eq!(
            end["tokens_out"].as_u64().unwrap(),
            next_index,
            "{events:?}"
        );
    }
    (text, end)
}

/// POST a body of `size` bytes of JSON string (`{"prompt": "aaaa…"}`) over a
/// raw connection, reading the response while writing; returns the status
/// and the response body (what arrived before the server closed).
pub async fn post_raw(addr: SocketAddr, path: &str, size: usize, chunked: bool) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let length = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", size + 14)
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{length}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let mut body = Vec::with_capacity(size + 14);
        body.extend_from_slice(br#"{"prompt": ""#);
        body.resize(size + 12, b'a');
        body.extend_from_slice(br#""}"#);
        for piece in body.chunks(64 << 10) {
            if chunked {
                write
                    .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                write.write_all(piece).await?;
                write.write_all(b"\r\n").await?;
            } else {
                write.write_all(piece).await?;
            }
        }
        if chunked {
            write.write_all(b"0\r\n\r\n").await?;
        }
        std::io::Result::Ok(())
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    let text = loop {
        let n = tokio::time::timeout(Duration::from_secs(30), read.read(&mut buffer))
            .await
            .expect("a response within 30 s")
            .unwrap_or(0);
        response.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&response).into_owned();
        let complete = text.find("\r\n\r\n").is_some_and(|end| {
            let length = text[..end].lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            length.is_some_and(|l| text.len() >= end + 4 + l)
        });
        if n == 0 || complete {
            break text;
        }
    };
    // The server may close before the whole body was sent: that is not a failure.
    writer.abort();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// The tests' Python: `$WORKER_ORCD_PYTHON`, else the repository's target/pyenv.
pub fn python() -> PathBuf {
    existing_python(
        std::env::var_os("WORKER_ORCD_PYTHON").map(PathBuf::from),
        "target/pyenv",
        "run scripts/setup-python.sh (or set WORKER_ORCD_PYTHON)",
    )
}

/// The fleet venv's Python (LiteLLM among its packages):
/// `$WORKER_ORCD_FLEETENV/bin/python`, else the repository's target/fleetenv.
pub fn fleet_python() -> PathBuf {
    existing_python(
        std::env::var_os("WORKER_ORCD_FLEETENV").map(|env| PathBuf::from(env).join("bin/python")),
        "target/fleetenv",
        "run scripts/setup-python.sh scripts/requirements-fleet.txt target/fleetenv (or set WORKER_ORCD_FLEETENV)",
    )
}

/// `given`, else the python of the repository's venv `venv`; it must exist.
fn existing_python(given: Option<PathBuf>, venv: &str, setup: &str) -> PathBuf {
    let path = given.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(venv)
            .join("bin/python")
    });
    assert!(
        path.exists(),
        "Python {} is missing: {setup}",
        path.display()
    );
    path
}

/// Runs a Python `script` with `args`; its standard output is one JSON
/// report, returned. A failed script fails the test with its output.
pub async fn python_report(python: PathBuf, script: &'static str, args: Vec<String>) -> Value {
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg("-c")
            .arg(script)
            .args(&args)
            .output()
            .expect("running python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the script's report is not JSON ({e}): {stdout}"));
    println!("{report}");
    report
}

/// Log lines of this test binary, captured from the moment this is first called.
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub fn capture_logs() -> Logs {
    use std::sync::{Arc, Mutex, OnceLock};
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buffer = BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Writer(sink.clone()))
            .init();
        buffer
    });
    Logs(buffer.clone())
}

struct Writer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A strict reader of the Prometheus text exposition format (0.0.4).
pub mod prometheus {
    use std::collections::HashMap;

    #[derive(Debug)]
    pub struct Sample {
        pub name: String,
        pub labels: Vec<(String, String)>,
        pub value: f64,
    }

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s.parse().unwrap_or_else(|e| panic!("bad value {s:?}: {e}")),
        }
    }

    /// Parse every line, panicking on anything malformed; checks that
    /// each sample's family has a TYPE and that histograms are consistent.
    pub fn parse(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let keyword = parts.next().unwrap();
                let name = parts.next().expect("a metric name");
                assert!(is_name(name), "{line}");
                if keyword == "TYPE" {
                    let kind = parts.next().expect("a type");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.into(), kind.into()).is_none(),
                        "TYPE twice: {line}"
                    );
                } else {
                    assert_eq!(keyword, "HELP", "{line}");
                }
                continue;
            }
            let (series, rest) = match line.find('{') {
                Some(_) => {
                    let close = line.rfind('}').expect("closing brace");
                    (&line[..close + 1], line[close + 1..].trim_start())
                }
                None => line.split_once(' ').expect("name and value"),
            };
            let (name, labels) = match series.find('{') {
                Some(open) => (
                    &series[..open],
                    parse_labels(&series[open + 1..series.len() - 1]),
                ),
                None => (series, Vec::new()),
            };
            assert!(is_name(name), "{line}");
            let mut fields = rest.split(' ');
            let v = value(fields.next().expect("a value"));
            if let Some(ts) = fields.next() {
                ts.parse::<i64>().expect("a timestamp");
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "no TYPE before {line}");
            samples.push(Sample {
                name: name.into(),
                labels,
                value: v,
            });
        }
        for (family, kind) in &types {
            if kind != "histogram" {
                continue;
            }
            let buckets: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.name == format!("{family}_bucket"))
                .collect();
            assert!(!buckets.is_empty(), "{family} has no buckets");
            let mut previous = (f64::NEG_INFINITY, 0.0);
            for b in &buckets {
                let le = value(&b.labels.iter().find(|(k, _)| k == "le").expect("le").1);
                assert!(
                    le > previous.0 && b.value >= previous.1,
                    "{family} buckets out of order"
                );
                previous = (le, b.value);
            }
            assert_eq!(previous.0, f64::INFINITY, "{family}: last bucket is +Inf");
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count"))
                .expect("_count");
            assert_eq!(
                count.value, previous.1,
                "{family}: +Inf bucket equals _count"
            );
        }
        samples
    }

    fn parse_labels(s: &str) -> Vec<(String, String)> {
        let mut labels = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (name, after) = rest.split_once("=\"").expect("label=\"value\"");
            assert!(is_name(name), "label name {name:?}");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next().expect("closing quote");
                match c {
                    '\\' => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("bad escape \\{c}"),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((name.to_string(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        labels
    }
}
