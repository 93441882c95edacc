//! The operations endpoint a host serves while it runs ([`Host::with_operations`]):
//!
//! | path | answers |
//! |---|---|
//! | `GET /metrics` | the host's [`Metrics`] in the Prometheus text format (OpenMetrics) |
//! | `GET /healthz` | `200 ok` while the host runs |
//! | `GET /readyz` | `200 ready` when the database answers, its schema is this build's and it takes a write; `503` with the reason otherwise, and while the host drains at shutdown |
//!
//! The gauges read from the store (`cairn_instances`, `cairn_outbox_*`, ...) are refreshed by a
//! scrape at most every [`GAUGE_REFRESH`]: a scrape in between shows the last values, and a host
//! nobody scrapes reads nothing. A readiness probe gives the database [`READY_WITHIN`] to answer.
//!
//! [`Host::with_operations`]: super::Host::with_operations

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::clock::SharedClock;
use crate::store::Store;

/// How often a scrape may read the gauges from the store.
pub const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// How long `/readyz` waits for the database.
pub const READY_WITHIN: Duration = Duration::from_secs(2);

/// What the endpoint serves from.
pub(super) struct Operations {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    /// Cancelled when the host is asked to stop: it drains, and is not ready.
    pub draining: CancellationToken,
    /// When the gauges were last read.
    pub refreshed: tokio::sync::Mutex<Option<Instant>>,
}

/// Serves `listener` until `stop` is cancelled.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    ops: Arc<Operations>,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve metrics and health: the listener is unusable");
            return;
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ops);
    tracing::info!(addr = ?addr, "serving /metrics, /healthz and /readyz");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the metrics and health endpoint stopped");
    }
}

async fn metrics(State(ops): State<Arc<Operations>>) -> impl IntoResponse {
    {
        let mut refreshed = ops.refreshed.lock().await;
        if refreshed.is_none_or(|at| at.elapsed() >= GAUGE_REFRESH) {
            *refreshed = Some(Instant::now());
            if let Err(e) = ops
                .metrics
                .refresh(ops.store.as_ref(), ops.clock.now())
                .await
            {
                tracing::warn!(error = %e, "reading the gauges from the database failed; they show their last values");
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Arc<Operations>>) -> (StatusCode, String) {
    if ops.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the host is draining (shutting down)\n".to_owned(),
        );
    }
    match tokio::time::timeout(READY_WITHIN, ops.store.ready()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the database did not take a write within {READY_WITHIN:?} (down, or a lock held elsewhere)\n"
            ),
        ),
    }
}
