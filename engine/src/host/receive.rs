//! Receive locations: outside input turned into published messages.
//!
//! Besides the publish API, the CLI and the `inbox` table (read by the host loop itself), a host
//! can run these:
//!
//! * [`ReceiveLocation::FileDrop`]: a folder; each `*.json` file in it is one message. The file is
//!   removed only after the message is committed, so a crash in between publishes it again under
//!   the same id (deduplicated, G5). A file that names no `id` is published as
//!   `file:NAME:HASH`, where `HASH` is the first 16 hex digits of the SHA-256 of the file's bytes:
//!   the same file seen again is the same message, and a new file under a name used before is a
//!   new message (stored, never deleted unseen). A file that can never be published (not an
//!   envelope, larger than the maximum message size allows, refused by the store's checks) is
//!   moved to `rejected/` beside a `.error.txt` that says why, and the files after it are
//!   published; a file past the limit is moved aside without being read.
//! * [`ReceiveLocation::Http`]: `POST /messages` with the same JSON envelope; the answer is
//!   `202 Accepted` only after the message is committed. The caller's id (`id` in the envelope or
//!   an `Idempotency-Key` header) deduplicates retries. Input that can never be stored gets a 4xx
//!   with a JSON `error` (400 malformed or refused, 401 without the token, 413 too large); only
//!   a database that is unavailable for now gets `503` with `"retry": true`. See
//!   [`HttpSettings`] for the token, the timeouts and the connection limit.
//!
//! The envelope, for both (no other fields):
//!
//! ```json
//! { "type": "order.placed", "id": "optional, else from the file or a new id",
//!   "properties": { "region": "eu" }, "body": { "order_id": "o-1" } }
//! ```
//!
//! A file or a request may be up to [`ENVELOPE_ALLOWANCE`] bytes larger than the maximum message
//! size (the client's, [`HostConfig::max_message_bytes`](super::HostConfig) for a host's), for the
//! rest of the envelope; the body itself, as compact JSON, must be within the maximum.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Client, ClientError};
use crate::store::{text_properties, NewMessage, PublishOutcome};

/// How much larger than the maximum message size a dropped file or an HTTP request may be: room
/// for the rest of the envelope (type, id, properties, whitespace).
pub const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// How long, on shutdown, the HTTP location lets requests in flight finish.
const HTTP_DRAIN: Duration = Duration::from_secs(2);

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
        /// The token, the timeouts and the connection limit.
        settings: HttpSettings,
    },
}

impl ReceiveLocation {
    /// An HTTP endpoint on `addr` with the default [`HttpSettings`] (no token).
    pub fn http(addr: SocketAddr) -> Self {
        ReceiveLocation::Http {
            addr,
            settings: HttpSettings::default(),
        }
    }
}

/// Settings of the HTTP receive location.
///
/// A connection is served while it moves: it is closed when a request's head (its line and
/// headers) takes longer than `header_read_timeout` to arrive, counted from when the server
/// starts waiting for it (so a kept-alive connection waiting for its next request is closed after
/// that long too), and when nothing is read or written for `idle_timeout` while no request is
/// being answered (a request body that stalls). At most `max_connections` connections are served
/// at once; the next ones wait, unaccepted (in the listen backlog, holding none of the host's
/// file descriptors), until one of them closes, which the timeouts bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// When set, every request must carry `Authorization: Bearer TOKEN` (else 401).
    pub token: Option<HttpToken>,
    /// How long a request's head may take to arrive (default 10 s).
    pub header_read_timeout: Duration,
    /// How long a connection may sit with nothing read or written and no request being answered
    /// (default 60 s).
    pub idle_timeout: Duration,
    /// Connections served at once (default 1,024).
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            token: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// A bearer token; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpToken(String);

impl HttpToken {
    /// A token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpToken(<redacted>)")
    }
}

impl std::str::FromStr for HttpToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("the HTTP token is empty".to_owned());
        }
        Ok(Self(s.to_owned()))
    }
}

/// The JSON a file or a request carries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The door its messages come in through, for the metrics.
    pub(crate) fn door(&self) -> super::metrics::Door {
        match self {
            ReceiveLocation::FileDrop { .. } => super::metrics::Door::File,
            ReceiveLocation::Http { .. } => super::metrics::Door::Http,
        }
    }

    /// Runs until `stop` is cancelled.
    pub(crate) async fn run(self, client: Client, stop: CancellationToken) {
        match self {
            ReceiveLocation::FileDrop { dir, poll } => file_drop(dir, poll, client, stop).await,
            ReceiveLocation::Http { addr, settings } => {
                http(addr, settings, client, stop).await;
            }
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

/// The id of a message from the file `name` that names none: the name and a hash of the bytes.
fn file_message_id(name: &str, bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("file:{name}:{hex}")
}

/// Publishes every `*.json` file in `dir`, oldest name first.
async fn drain_folder(dir: &Path, client: &Client) -> io::Result<()> {
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") && entry.file_type().await?.is_file() {
            names.push(path);
        }
    }
    names.sort();
    let max_file = client
        .max_message_bytes()
        .saturating_add(ENVELOPE_ALLOWANCE);
    for path in names {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match read_at_most(&path, max_file).await {
            Ok(Some(text)) => text,
            Ok(None) => {
                let why = format!(
                    "the file is larger than {max_file} bytes: the maximum message size of {} \
                     bytes (`--max-message-bytes`) and {ENVELOPE_ALLOWANCE} bytes for the rest of \
                     the envelope; it was not read",
                    client.max_message_bytes()
                );
                reject(dir, &path, &name, &why).await?;
                continue;
            }
            // Taken away since the folder was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let message = match Envelope::parse(&text) {
            Ok(envelope) => envelope.into_message(|| file_message_id(&name, &text)),
            Err(why) => {
                reject(dir, &path, &name, &why).await?;
                continue;
            }
        };
        match client.publish_batch(vec![message]).await {
            // Committed (or already stored): only now may the file go.
            Ok(_) => tokio::fs::remove_file(&path).await?,
            Err(e) if e.is_retryable() => {
                tracing::warn!(file = %path.display(), error = %e, "file drop: the database is unavailable; the file stays for the next pass");
                return Ok(());
            }
            // It can never be published as it is: its final answer.
            Err(e) => reject(dir, &path, &name, &e.to_string()).await?,
        }
    }
    Ok(())
}

/// The bytes of the file at `path`, or `None` when it is longer than `max` bytes, in which case
/// at most `max + 1` bytes of it were read (its length is checked first).
async fn read_at_most(path: &Path, max: usize) -> io::Result<Option<Vec<u8>>> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    let file = tokio::fs::File::open(path).await?;
    if file.metadata().await?.len() > limit {
        return Ok(None);
    }
    // The file may have grown since.
    let mut text = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut text)
        .await?;
    Ok((text.len() <= max).then_some(text))
}

/// Moves the file aside to `rejected/`, with the reason beside it: never over an earlier one.
async fn reject(dir: &Path, path: &Path, name: &str, why: &str) -> io::Result<()> {
    let rejected = dir.join("rejected");
    tokio::fs::create_dir_all(&rejected).await?;
    let mut target = name.to_owned();
    if tokio::fs::try_exists(rejected.join(&target)).await? {
        target = format!("{}-{name}", uuid::Uuid::now_v7());
    }
    tokio::fs::write(rejected.join(format!("{target}.error.txt")), why).await?;
    tokio::fs::rename(path, rejected.join(&target)).await?;
    tracing::warn!(file = %path.display(), moved_to = %rejected.join(&target).display(), error = %why, "file drop: rejected a file");
    Ok(())
}

/// What every request of the HTTP location shares.
struct Door {
    client: Client,
    token: Option<[u8; 32]>,
    /// The largest request body read.
    max_request: usize,
}

async fn http(addr: SocketAddr, settings: HttpSettings, client: Client, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(%addr, error = %e, "HTTP receive location: cannot listen; it is not running");
            return;
        }
    };
    tracing::info!(
        %addr,
        token = settings.token.is_some(),
        max_connections = settings.max_connections,
        "HTTP receive location started: POST /messages"
    );
    let door = Arc::new(Door {
        max_request: client
            .max_message_bytes()
            .saturating_add(ENVELOPE_ALLOWANCE),
        token: settings.token.as_ref().map(HttpToken::digest),
        client,
    });
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A free slot first: connections past the limit wait unaccepted.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::warn!(%addr, error = %e, "HTTP receive location: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        connections.spawn(serve_connection(
            stream,
            door.clone(),
            settings.clone(),
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    // Requests in flight get their answers (each connection shuts down gracefully); bounded.
    let drained = tokio::time::timeout(HTTP_DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    tracing::info!(%addr, "HTTP receive location stopped");
}

/// When a connection last read or wrote, and how many of its requests are being answered.
#[derive(Default)]
struct Activity {
    start: Option<Instant>,
    last_ms: AtomicU64,
    answering: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Some(Instant::now()),
            ..Self::default()
        })
    }

    fn elapsed_ms(&self) -> u64 {
        self.start
            .map(|s| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn touch(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// Whether nothing moved for `limit` and no request is being answered.
    fn idle_for(&self, limit: Duration) -> bool {
        let quiet = self
            .elapsed_ms()
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        self.answering.load(Ordering::Relaxed) == 0 && u128::from(quiet) >= limit.as_millis()
    }

    fn answering(self: &Arc<Self>) -> Answering {
        self.answering.fetch_add(1, Ordering::Relaxed);
        Answering(self.clone())
    }
}

/// A request being answered (its body read, its message being published).
struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.touch();
        self.0.answering.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection that records when it reads or writes.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves one connection until it closes, times out or the location stops.
async fn serve_connection(
    stream: TcpStream,
    door: Arc<Door>,
    settings: HttpSettings,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Activity::new();
    let io = TokioIo::new(Tracked {
        stream,
        activity: activity.clone(),
    });
    let answers = activity.clone();
    let service = hyper::service::service_fn(move |request| {
        let door = door.clone();
        let activity = answers.clone();
        async move { Ok::<_, Infallible>(door.answer(request, &activity).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    let mut connection = pin!(builder.serve_connection(io, service));
    let check =
        (settings.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(check);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTP receive location: connection closed");
                }
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                if activity.idle_for(settings.idle_timeout) {
                    tracing::debug!("HTTP receive location: closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// An answer: `status` with a JSON body.
fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut answer = Response::new(Full::new(Bytes::from(body.to_string())));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

/// An error answer: `{"error": why, "retry": false}` (and the id, when known).
fn refusal(status: StatusCode, id: Option<&str>, why: &str) -> Response<Full<Bytes>> {
    let mut body = serde_json::json!({ "error": why, "retry": false });
    if let Some(id) = id {
        body["id"] = serde_json::json!(id);
    }
    json_answer(status, &body)
}

/// Compares two digests in constant time.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

impl Door {
    /// Whether the request carries the token, when one is set.
    fn authorised(&self, request: &Request<Incoming>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            })
            .map(|(_, token)| token.trim());
        // Digests of equal length, compared in constant time: the comparison tells nothing of
        // how much of a wrong token was right.
        let digest: [u8; 32] = Sha256::digest(given.unwrap_or_default().as_bytes()).into();
        given.is_some() && same_digest(&digest, expected)
    }

    async fn answer(
        &self,
        request: Request<Incoming>,
        activity: &Arc<Activity>,
    ) -> Response<Full<Bytes>> {
        if request.uri().path() != "/messages" {
            return refusal(StatusCode::NOT_FOUND, None, "not found: POST /messages");
        }
        if request.method() != Method::POST {
            let mut answer = refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                "method not allowed: POST /messages",
            );
            answer
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return answer;
        }
        if !self.authorised(&request) {
            let mut answer = refusal(
                StatusCode::UNAUTHORIZED,
                None,
                "missing or wrong token: send `Authorization: Bearer TOKEN`",
            );
            answer.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            return answer;
        }
        let too_large = || {
            refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                &format!(
                    "the request is larger than {} bytes: the maximum message size of {} bytes                      (`--max-message-bytes`) and {ENVELOPE_ALLOWANCE} bytes for the rest of the                      envelope",
                    self.max_request,
                    self.client.max_message_bytes()
                ),
            )
        };
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > u64::try_from(self.max_request).unwrap_or(u64::MAX)) {
            return too_large();
        }
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match Limited::new(request.into_body(), self.max_request)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return too_large(),
            Err(e) => {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    None,
                    &format!("cannot read the request body: {e}"),
                )
            }
        };
        let _answering = activity.answering();
        self.publish(&body, key).await
    }

    async fn publish(&self, body: &[u8], key: Option<String>) -> Response<Full<Bytes>> {
        let envelope = match Envelope::parse(body) {
            Ok(envelope) => envelope,
            Err(why) => return refusal(StatusCode::BAD_REQUEST, None, &why),
        };
        let message =
            envelope.into_message(|| key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()));
        let id = message.id.clone();
        match self.client.publish_batch(vec![message]).await {
            Ok(outcomes) => {
                let outcome = match outcomes.first() {
                    Some(PublishOutcome::Routed(instance)) => {
                        serde_json::json!({ "id": id, "outcome": "routed", "instance": instance })
                    }
                    Some(PublishOutcome::Unrouted) => {
                        serde_json::json!({ "id": id, "outcome": "unrouted" })
                    }
                    Some(PublishOutcome::ToPorts) => {
                        serde_json::json!({ "id": id, "outcome": "to_ports" })
                    }
                    Some(PublishOutcome::Zombie(instance)) => {
                        serde_json::json!({ "id": id, "outcome": "zombie", "instance": instance })
                    }
                    _ => serde_json::json!({ "id": id, "outcome": "duplicate" }),
                };
                json_answer(StatusCode::ACCEPTED, &outcome)
            }
            Err(e) if e.is_retryable() => json_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "id": id, "error": e.to_string(), "retry": true }),
            ),
            Err(e) => {
                let status = match &e {
                    ClientError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    e if e.is_refusal() => StatusCode::BAD_REQUEST,
                    // Not retryable, yet not known to be the input's fault.
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                // The caller has the answer; a person need look only at a database error.
                if status == StatusCode::INTERNAL_SERVER_ERROR {
                    tracing::warn!(%id, %status, error = %e, "HTTP receive location: the database refused a message");
                } else {
                    tracing::debug!(%id, %status, error = %e, "HTTP receive location: refused a message");
                }
                refusal(status, Some(&id), &e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_message_id_changes_with_the_content_and_not_otherwise() {
        let a = file_message_id("reuse.json", b"{\"type\": \"a\"}");
        assert!(a.starts_with("file:reuse.json:"), "{a}");
        assert_eq!(a.len(), "file:reuse.json:".len() + 16, "{a}");
        assert_eq!(a, file_message_id("reuse.json", b"{\"type\": \"a\"}"));
        assert_ne!(a, file_message_id("reuse.json", b"{\"type\": \"b\"}"));
        assert_ne!(a, file_message_id("other.json", b"{\"type\": \"a\"}"));
    }

    #[test]
    fn a_token_is_never_shown_and_only_the_same_token_matches() {
        let token: HttpToken = "s3cret".parse().expect("a token");
        let settings = HttpSettings {
            token: Some(token.clone()),
            ..HttpSettings::default()
        };
        assert!(!format!("{settings:?}").contains("s3cret"));
        assert!(same_digest(
            &token.digest(),
            &HttpToken::new("s3cret").digest()
        ));
        assert!(!same_digest(
            &token.digest(),
            &HttpToken::new("s3cre").digest()
        ));
        assert!("".parse::<HttpToken>().is_err());
    }

    #[test]
    fn an_envelope_with_an_unknown_field_is_refused() {
        let err = Envelope::parse(br#"{"type": "t", "bdy": {}}"#).expect_err("refused");
        assert!(err.contains("unknown field"), "{err}");
        assert!(Envelope::parse(br#"{"type": "t", "body": {"s": "\ud800"}}"#).is_err());
    }
}
