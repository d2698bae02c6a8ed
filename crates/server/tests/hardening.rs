//! What an adversarial review found open, each closed and kept closed:
//! cross-site requests, slow clients, header and auth parsing, log
//! injection, unclear errors, a broken chat template, a context size
//! that could not be held.

mod common;

use std::time::{Duration, Instant};

use common::{SseReader, TestServer};
use serde_json::{json, Value};
use server::{Model, ModelOptions, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMPT: &str = "The capital of France is";

fn greedy(job_id: &str, max_tokens: u32) -> Value {
    json!({"job_id": job_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
}

/// Post `body` as it is, with `content_type` (none when `None`).
async fn post_typed(
    server: &TestServer,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut request = server.client.post(server.url(path)).body(body.to_string());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

/// A web page can send `text/plain`, form-encoded or untyped bodies to
/// 127.0.0.1 without a CORS preflight; the JSON routes refuse them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_routes_refuse_bodies_not_declared_json() {
    let server = TestServer::start().await;
    let job = greedy("cross-site", 2).to_string();
    let chat =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    for (path, body) in [
        ("/execute", job.as_str()),
        ("/cancel", r#"{"job_id": "x"}"#),
        ("/v1/chat/completions", chat.as_str()),
        ("/v1/completions", r#"{"prompt": "hi", "max_tokens": 2}"#),
    ] {
        for content_type in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            None,
        ] {
            let response = post_typed(&server, path, content_type, body).await;
            assert_eq!(response.status(), 415, "{path} {content_type:?}");
            let error: Value = response.json().await.unwrap();
            let code = if path.starts_with("/v1/") {
                &error["error"]["code"]
            } else {
                &error["code"]
            };
            assert_eq!(
                code.as_str().unwrap().to_ascii_uppercase(),
                "UNSUPPORTED_MEDIA_TYPE",
                "{error}"
            );
        }
        // JSON with a charset parameter, in any case, is JSON.
        let response =
            post_typed(&server, path, Some("Application/JSON; charset=utf-8"), body).await;
        assert_ne!(response.status(), 415, "{path}");
        let _ = response.bytes().await;
    }
    server.wait_idle(Duration::from_secs(10)).await;
}

/// No CORS by default; with `--cors-origin`, only those origins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_only_the_listed_origins() {
    async fn preflight(server: &TestServer, origin: &str) -> reqwest::Response {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/execute"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
            .await
            .unwrap()
    }
    let closed = TestServer::start().await;
    let response = preflight(&closed, "http://app.example").await;
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    drop(closed);

    let config = ServerConfig {
        cors_origins: vec!["http://app.example".into()],
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(common::options(), config).await;
    let response = preflight(&server, "http://app.example").await;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let allowed = response.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("content-type") && allowed.contains("authorization"),
        "{allowed}"
    );
    let response = preflight(&server, "http://evil.example").await;
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    // A real request from the allowed origin carries the header too.
    let response = server
        .client
        .get(server.url("/health"))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://app.example"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_is_case_insensitive_and_the_key_is_checked() {
    let config = ServerConfig {
        api_key: Some("k3y".into()),
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(common::options(), config).await;
    for (authorization, status) in [
        (Some("Bearer k3y"), 200),
        (Some("bearer k3y"), 200),
        (Some("BEARER k3y"), 200),
        (Some("Bearer wrong"), 401),
        (Some("Basic k3y"), 401),
        (Some("Bearer "), 401),
        (None, 401),
    ] {
        let mut request = server.client.get(server.url("/v1/models"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{authorization:?}");
    }
}

/// Opens a connection and sends `bytes`, then nothing more.
async fn stalled(addr: std::net::SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Reads until the server closes; the bytes it sent and how long that took.
async fn read_to_close(stream: &mut tokio::net::TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        start.elapsed(),
    )
}

/// Slow clients (slowloris) are dropped after the header or body timeout
/// while /health keeps answering, and connections past the cap are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_dropped_and_health_keeps_answering() {
    let config = ServerConfig {
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        max_connections: 64,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(common::options(), config).await;
    // 40 connections that never finish their headers.
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(
            stalled(
                server.addr,
                b"POST /execute HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            )
            .await,
        );
    }
    // One that sends headers but only part of its body.
    let mut slow_body = stalled(
        server.addr,
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"job_id\"",
    )
    .await;
    // Meanwhile the worker answers.
    let health = server.get_json("/health").await;
    assert_eq!(health["status"], "ok");
    for stream in &mut slow {
        let (_, took) = read_to_close(stream, Duration::from_secs(10)).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    let (response, _) = read_to_close(&mut slow_body, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("BODY_TIMEOUT"), "{response}");
    server.get_json("/health").await;
    drop(server);

    // Past the cap, new connections are closed at once; those within it serve.
    let config = ServerConfig {
        header_timeout: Duration::from_secs(3),
        max_connections: 4,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(common::options(), config).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(stalled(server.addr, b"GET /health HTTP/1.1\r\n").await);
    }
    // Let the server accept those four before the fifth.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = stalled(server.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (response, took) = read_to_close(&mut refused, Duration::from_secs(2)).await;
    assert!(
        response.is_empty() && took < Duration::from_secs(1),
        "{response:?} {took:?}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.get_json("/health").await;
}

/// A correlation id outside `[A-Za-z0-9._:-]{1,128}` could forge log lines: it is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_correlation_id_is_replaced() {
    let server = TestServer::start().await;
    for hostile in [
        r#"x}:_server::worker_api:_job_finished_job_id="evil""#,
        "a b",
        "semi;colon",
    ] {
        let response = server
            .client
            .get(server.url("/health"))
            .header("x-correlation-id", hostile)
            .send()
            .await
            .unwrap();
        let id = response.headers()["x-correlation-id"].to_str().unwrap();
        assert_ne!(id, hostile);
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }
    let response = server
        .client
        .get(server.url("/health"))
        .header("x-correlation-id", "req:42.a_b-c")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "req:42.a_b-c");
}

/// Every job's end is logged once, whatever ended it, even a client that went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ended_by_a_disconnect_is_logged_once() {
    let logs = common::capture_logs();
    let server = TestServer::start().await;
    let body =
        json!({"job_id": "gone-away", "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0});
    let mut stream = SseReader::new(server.post("/execute", &body).await);
    while stream.next().await.unwrap().event != "token" {}
    drop(stream);
    let chat = json!({"messages": [{"role": "user", "content": "Count to 100."}], "max_tokens": 300, "stream": true});
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .header("x-correlation-id", "chat-gone-away")
        .json(&chat)
        .send()
        .await
        .unwrap();
    let mut chunks = response.bytes_stream();
    use futures_util::StreamExt;
    chunks.next().await.unwrap().unwrap();
    drop(chunks);
    server.wait_idle(Duration::from_secs(10)).await;
    let text = logs.text();
    let finished = |needle: &str| {
        text.lines()
            .filter(|l| l.contains(needle) && l.contains("job finished"))
            .count()
    };
    assert_eq!(finished("job_id=\"gone-away\""), 1, "{text}");
    assert!(text.lines().any(|l| l.contains("job_id=\"gone-away\"")
        && l.contains("job finished")
        && l.contains("CANCELLED")));
    assert_eq!(finished("correlation_id=\"chat-gone-away\""), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear_and_complete() {
    let server = TestServer::start().await;
    let fields_of = |error: &Value| -> Vec<(String, String)> {
        error["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["field"].as_str().unwrap().to_string(),
                    e["constraint"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pair = |f: &str, c: &str| (f.to_string(), c.to_string());
    // Several ill-typed fields beside range errors: every one is listed.
    let response = server
        .post(
            "/execute",
            &json!({"job_id": "v", "prompt": "hi", "temperature": "hot", "top_k": -5, "min_p": 3, "seed": "s"}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        fields_of(&error),
        [
            pair("temperature", "type"),
            pair("top_k", "type"),
            pair("seed", "type"),
            pair("min_p", "range")
        ],
        "{error}"
    );
    // A body that is not an object says so, without serde's internals.
    let response = server.post("/execute", &json!(["job_id", "prompt"])).await;
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["message"],
        "body: the body must be a JSON object, not an array"
    );
    // Chat content of the wrong shape, and max_tokens 0 named once.
    for (body, param, needle) in [
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
            "must be a string or an array of text parts",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": 3}),
            "stop",
            "must be a string or an array of strings",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            "max_tokens",
            "max_tokens: must be at least 1",
        ),
        // Content is required, except of an assistant turn.
        (
            json!({"messages": [{"role": "user", "content": null}]}),
            "messages[0].content",
            "content is required",
        ),
        (
            json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user"}]}),
            "messages[1].content",
            "content is required",
        ),
    ] {
        let response = server.post("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        assert!(message.contains(needle), "{body}: {message}");
        assert!(
            !message.contains("untagged") && !message.contains("variant"),
            "{message}"
        );
        assert_eq!(message.matches(needle).count(), 1, "{message}");
    }
    // An assistant turn without content is accepted.
    let response = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}, {"role": "user", "content": "again"}], "max_tokens": 1}),
        )
        .await;
    assert_eq!(response.status(), 200);
}

/// /health says 503 while draining (readiness probes), with the same body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_draining() {
    let config = ServerConfig {
        drain_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_with(common::options(), config).await;
    let body =
        json!({"job_id": "drain-me", "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0});
    let mut long = SseReader::new(server.post("/execute", &body).await);
    while long.next().await.unwrap().event != "token" {}
    let response = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stopped = server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let health: Value = response.json().await.unwrap();
    assert_eq!(health["status"], "draining");
    assert!(health["slots"]["in_use"].as_u64().is_some());
    let events = long.collect().await;
    assert_eq!(events.last().unwrap().event, "end", "{events:?}");
    tokio::time::timeout(Duration::from_secs(15), stopped)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `--ctx-size` past the training context is refused unless asked for, and
/// a KV budget past the machine's memory is refused at load: no request can
/// later make the process allocate beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_the_machine_cannot_hold_is_refused_at_load() {
    let load = |options: ModelOptions| async move {
        tokio::task::spawn_blocking(move || {
            Model::load(&common::model_path(), &options).map(|_| ())
        })
        .await
        .unwrap()
        .map_err(|e| format!("{e:#}"))
    };
    let err = load(ModelOptions {
        ctx_size: Some(1 << 32),
        ..ModelOptions::default()
    })
    .await
    .unwrap_err();
    assert!(
        err.contains(
            "--ctx-size 4294967296 is more than the 8192 positions the model was trained on"
        ),
        "{err}"
    );
    let err = load(ModelOptions {
        ctx_size: Some(1 << 24),
        ctx_beyond_training: true,
        ..ModelOptions::default()
    })
    .await
    .unwrap_err();
    assert!(
        err.contains("of KV cache, but only") && err.contains("--max-concurrent 8"),
        "{err}"
    );
    let err = load(ModelOptions {
        ctx_size: Some(1),
        ..ModelOptions::default()
    })
    .await
    .unwrap_err();
    assert!(err.contains("--ctx-size 1: it must be at least 2"), "{err}");
}

/// A chat template that does not parse is logged at load with its error;
/// `chat_template` (`--chat-template FILE`) replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chat_template_is_logged_and_can_be_replaced() {
    let logs = common::capture_logs();
    let source = gguf::GgufFile::open(common::model_path()).unwrap();
    let mut metadata = source.metadata().clone();
    metadata.set(
        "tokenizer.chat_template",
        gguf::Value::String("{% if %}broken".into()),
    );
    let mut writer = gguf::GgufWriter::with_metadata(metadata);
    for t in source.tensors() {
        writer
            .add_tensor(
                t.name.clone(),
                t.ty,
                &t.dims,
                source.tensor_data(t).to_vec(),
            )
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken-template.gguf");
    writer.write_to_path(&path).unwrap();

    let start = |chat_template: Option<String>| {
        let path = path.clone();
        async move {
            let options = ModelOptions {
                chat_template,
                ..common::options()
            };
            TestServer::start_model(&path, options, ServerConfig::default()).await
        }
    };
    let server = start(None).await;
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("chat template cannot be used") && l.contains("chat template:")),
        "{text}"
    );
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let response = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--chat-template"),
        "{error}"
    );
    drop(server);

    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let server = start(Some(chatml.into())).await;
    let response = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(response.status(), 200);
    // A given template that does not work is an error at load.
    let options = ModelOptions {
        chat_template: Some("{% for %}".into()),
        ..common::options()
    };
    let err = Model::load(&path, &options).map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("--chat-template"), "{err:#}");
}
