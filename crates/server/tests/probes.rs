//! What a fleet's infrastructure reads: liveness and readiness probes from
//! the moment the port is bound, load signals a router can poll, and the
//! gauges an autoscaler needs.

mod common;

use std::time::Duration;

use common::{SseReader, TestServer};
use serde_json::{json, Value};
use server::{Model, ServerConfig};

async fn status_and_json(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// While the model loads the port already answers: alive, not ready, and
/// every job route says so with a retriable 503; once loaded, ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_answers_probes_while_the_model_loads() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let load = async move {
        released.await.unwrap();
        tokio::task::spawn_blocking(|| Model::load(&common::model_path(), &common::options()))
            .await
            .unwrap()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run_after_loading(
        listener,
        load,
        ServerConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");
    let (status, body) = status_and_json(&client, url("/health")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("loading")));
    let (status, body) = status_and_json(&client, url("/ready")).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("loading")));
    let live = client.get(url("/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    // No keep-alive while loading: the loaded server takes the port over,
    // and a pooled connection closed then would fail a client's next request.
    assert_eq!(
        live.headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );
    let response = client
        .post(url("/execute"))
        .json(&json!({"job_id": "early", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));

    release.send(()).unwrap();
    let start = std::time::Instant::now();
    loop {
        let (status, body) = status_and_json(&client, url("/ready")).await;
        if status == 200 {
            assert_eq!(body["status"], "ready");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = status_and_json(&client, url("/health")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A shutdown asked for while loading returns without waiting for the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_loading_returns_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let never = std::future::pending::<anyhow::Result<Model>>();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        server::run_after_loading(listener, never, ServerConfig::default(), async {}),
    )
    .await
    .expect("returns at once");
    assert!(result.is_ok());
    // A failed load is the server's error.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let failed = async { Err(anyhow::anyhow!("no such model")) };
    let err = server::run_after_loading(
        listener,
        failed,
        ServerConfig::default(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.to_string(), "no such model");
}

/// `/load` and the autoscaling gauges follow the jobs; `/ready` turns 503 on drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_signals_and_gauges_follow_the_jobs() {
    let config = ServerConfig {
        drain_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_with(common::options(), config).await;
    let idle = server.get_json("/load").await;
    assert_eq!(idle["ready"], true);
    assert_eq!(
        (idle["running"].as_u64(), idle["queued"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(idle["max_concurrent"], 4);
    assert_eq!(idle["available"], 4 + 16);
    assert_eq!(idle["kv_free_ratio"], 1.0);

    let body = json!({"job_id": "busy", "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0});
    let mut stream = SseReader::new(server.post("/execute", &body).await);
    while stream.next().await.unwrap().event != "token" {}
    let busy = server.get_json("/load").await;
    assert_eq!(busy["running"], 1);
    assert_eq!(busy["available"], 4 + 16 - 1);
    let free = busy["kv_free_ratio"].as_f64().unwrap();
    assert!(free > 0.0 && free < 1.0, "{busy}");

    let metrics = server.metrics().await;
    let samples = common::prometheus::parse(&metrics);
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
            .value
    };
    assert_eq!(value("worker_orcd_running_jobs"), 1.0);
    assert_eq!(value("worker_orcd_queued_jobs"), 0.0);
    assert_eq!(value("worker_orcd_max_concurrent_jobs"), 4.0);
    assert_eq!(value("worker_orcd_ready"), 1.0);
    assert!((value("worker_orcd_kv_used_ratio") - (1.0 - free)).abs() < 0.05);
    // Every name follows one prefix.
    for sample in &samples {
        assert!(sample.name.starts_with("worker_orcd_"), "{}", sample.name);
    }

    let stopped = server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = status_and_json(&server.client, server.url("/ready")).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
    // Still alive (liveness must not restart a draining worker).
    let (status, _) = status_and_json(&server.client, server.url("/live")).await;
    assert_eq!(status, 200);
    let draining = server.get_json("/load").await;
    assert_eq!(draining["ready"], false);
    let metrics = server.metrics().await;
    assert!(metrics.contains("worker_orcd_ready 0"), "{metrics}");
    drop(stream);
    tokio::time::timeout(Duration::from_secs(15), stopped)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
