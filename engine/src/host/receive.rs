//! Receive locations: outside input turned into published messages.
//!
//! Besides the publish API, the CLI and the `inbox` table (read by the host loop itself), a host
//! can run these:
//!
//! * [`ReceiveLocation::FileDrop`]: a folder; each `*.json` file in it is one message. The file is
//!   removed only after the message is committed, so a crash in between publishes it again under
//!   the same id (deduplicated, G5). A file that cannot be read is moved to `rejected/` beside a
//!   `.error.txt` that says why.
//! * [`ReceiveLocation::Http`]: `POST /messages` with the same JSON envelope; the answer is
//!   `202 Accepted` only after the message is committed. The caller's id (`id` in the envelope or
//!   an `Idempotency-Key` header) deduplicates retries.
//!
//! The envelope, for both:
//!
//! ```json
//! { "type": "order.placed", "id": "optional, else the file name or a new id",
//!   "properties": { "region": "eu" }, "body": { "order_id": "o-1" } }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::Client;
use crate::store::{text_properties, NewMessage, PublishOutcome};

/// Where a host takes messages from, besides the publish API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveLocation {
    /// Each `*.json` file dropped in `dir` is a message (see the module docs).
    FileDrop {
        /// The folder.
        dir: PathBuf,
        /// How often to look.
        poll: Duration,
    },
    /// An HTTP endpoint, `POST /messages`.
    Http {
        /// Where to listen.
        addr: SocketAddr,
    },
}

/// The JSON a file or a request carries.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    message_type: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    body: serde_json::Value,
}

impl Envelope {
    fn parse(text: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(text).map_err(|e| {
            format!(
                "not a message envelope ({{\"type\", \"id\"?, \"properties\"?, \"body\"}}): {e}"
            )
        })
    }

    fn into_message(self, default_id: impl FnOnce() -> String) -> NewMessage {
        NewMessage::published(
            self.id.unwrap_or_else(default_id),
            self.message_type,
            self.body,
            text_properties(self.properties),
        )
    }
}

impl ReceiveLocation {
    /// Runs until `stop` is cancelled.
    pub(crate) async fn run(self, client: Client, stop: CancellationToken) {
        match self {
            ReceiveLocation::FileDrop { dir, poll } => file_drop(dir, poll, client, stop).await,
            ReceiveLocation::Http { addr } => http(addr, client, stop).await,
        }
    }
}

async fn file_drop(dir: PathBuf, poll: Duration, client: Client, stop: CancellationToken) {
    tracing::info!(dir = %dir.display(), "file drop receive location started");
    loop {
        if let Err(e) = drain_folder(&dir, &client).await {
            tracing::warn!(dir = %dir.display(), error = %e, "file drop: cannot read the folder; retrying");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Publishes every `*.json` file in `dir`, oldest name first.
async fn drain_folder(dir: &Path, client: &Client) -> std::io::Result<()> {
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") && entry.file_type().await?.is_file() {
            names.push(path);
        }
    }
    names.sort();
    for path in names {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = tokio::fs::read(&path).await?;
        let message = match Envelope::parse(&text) {
            Ok(envelope) => envelope.into_message(|| format!("file:{name}")),
            Err(why) => {
                reject(dir, &path, &name, &why).await?;
                continue;
            }
        };
        match client.publish_batch(vec![message]).await {
            // Committed (or already stored): only now may the file go.
            Ok(_) => tokio::fs::remove_file(&path).await?,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "file drop: publish failed; the file stays for the next pass");
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn reject(dir: &Path, path: &Path, name: &str, why: &str) -> std::io::Result<()> {
    let rejected = dir.join("rejected");
    tokio::fs::create_dir_all(&rejected).await?;
    tokio::fs::write(rejected.join(format!("{name}.error.txt")), why).await?;
    tokio::fs::rename(path, rejected.join(name)).await?;
    tracing::warn!(file = %path.display(), error = %why, "file drop: rejected a file");
    Ok(())
}

async fn http(addr: SocketAddr, client: Client, stop: CancellationToken) {
    let app = Router::new()
        .route("/messages", post(accept))
        .with_state(client);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(%addr, error = %e, "HTTP receive location: cannot listen; it is not running");
            return;
        }
    };
    tracing::info!(%addr, "HTTP receive location started: POST /messages");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(%addr, error = %e, "HTTP receive location stopped");
    }
}

async fn accept(
    State(client): State<Client>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, Json<serde_json::Value>) {
    let envelope = match Envelope::parse(&body) {
        Ok(envelope) => envelope,
        Err(why) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": why })),
            )
        }
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let message = envelope.into_message(|| key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()));
    let id = message.id.clone();
    match client.publish_batch(vec![message]).await {
        Ok(outcomes) => {
            let outcome = match outcomes.first() {
                Some(PublishOutcome::Routed(instance)) => {
                    serde_json::json!({ "id": id, "outcome": "routed", "instance": instance })
                }
                Some(PublishOutcome::Unrouted) => {
                    serde_json::json!({ "id": id, "outcome": "unrouted" })
                }
                _ => serde_json::json!({ "id": id, "outcome": "duplicate" }),
            };
            (StatusCode::ACCEPTED, Json(outcome))
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "id": id, "error": e.to_string(), "retry": true })),
        ),
    }
}
