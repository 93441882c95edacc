//! W8's clients: `callers` tasks posting one message a request to an HTTP endpoint, and the bare
//! HTTP server that gives the same clients' ceiling on this machine (the same requests answered
//! `202` with no engine behind them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::BenchError;

/// Posts `n` messages of type `kind` (ids `{prefix}-{i}`) to `endpoint` from `callers` tasks, one
/// message a request, once the endpoint answers. Returns each request's latency in ms and the
/// wall time of all of them in seconds.
pub(super) async fn post_one_a_request(
    endpoint: &str,
    kind: &'static str,
    prefix: &'static str,
    n: usize,
    callers: usize,
) -> Result<(Vec<f64>, f64), BenchError> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(endpoint).send().await.is_err() {
        if Instant::now() > deadline {
            return Err(BenchError::Stalled(format!("{endpoint} did not answer")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers.min(n) {
        let (http, next, endpoint) = (http.clone(), next.clone(), endpoint.to_owned());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, BenchError>(lat);
                }
                let t = Instant::now();
                let body =
                    json!({ "type": kind, "id": format!("{prefix}-{i}"), "body": { "i": i } });
                let reply = http
                    .post(&endpoint)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .map_err(|e| BenchError::Task(format!("POST {endpoint}: {e}")))?;
                if reply.status() != reqwest::StatusCode::ACCEPTED {
                    return Err(BenchError::Stalled(format!(
                        "POST {endpoint} answered {}",
                        reply.status()
                    )));
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut lat = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        lat.extend(done.map_err(|e| BenchError::Task(e.to_string()))??);
    }
    Ok((lat, started.elapsed().as_secs_f64()))
}

/// Serves `POST /messages` on a free loopback port until `stop`: reads the JSON body and answers
/// `202`, with no engine behind it (and `GET` with `200`, for the readiness probe).
pub(super) async fn bare_server(stop: CancellationToken) -> Result<SocketAddr, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BenchError::Task(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Task(e.to_string()))?;
    let app = axum::Router::new().route(
        "/messages",
        axum::routing::post(|axum::Json(_): axum::Json<serde_json::Value>| async {
            axum::http::StatusCode::ACCEPTED
        })
        .get(|| async { axum::http::StatusCode::OK }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(addr)
}
