//! Send ports: where committed sends go.
//!
//! A send port is an adapter that delivers one outbox message and, for a request, returns the
//! reply. Delivery is at least once (G2): a port may see the same message id more than once after
//! a crash or a retry, and should treat the id as an idempotency key.
//!
//! Ports are configured per name: the transport (an in-process function, loopback into the
//! MessageBox, a [`FilePort`] folder, an [`HttpPort`] endpoint, or any [`SendPort`]), a
//! [`RetryPolicy`], an optional backup transport tried once the primary's attempts are spent, and
//! ordered delivery (one message at a time, in commit order, stopping on a message that keeps
//! failing). See `docs/send-ports.md`.
//!
//! ```
//! use cairn::{Ports, PortError};
//! use serde_json::json;
//!
//! let ports = Ports::new()
//!     .function("payment", |msg| async move {
//!         let amount = msg.body["amount"].as_f64().ok_or_else(|| PortError::permanent("no amount"))?;
//!         Ok(Some(json!({ "authorised": amount < 1000.0 })))
//!     })
//!     .loopback("bus");
//! assert!(ports.contains("payment") && ports.contains("bus"));
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

mod file;
mod http;

pub use file::FilePort;
pub use http::HttpPort;

/// A message handed to a send port.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// The message id; the same on every redelivery.
    pub id: String,
    /// The instance that sent it.
    pub instance_id: Uuid,
    /// The port's name.
    pub port: String,
    /// The message type.
    pub message_type: String,
    /// The body.
    pub body: serde_json::Value,
    /// Whether a reply is expected.
    pub expects_reply: bool,
    /// Delivery attempts before this one.
    pub attempt: u32,
}

/// A failed delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PortError {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

impl PortError {
    /// A failure worth retrying (timeouts, unavailable targets).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry will fix: the message is dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// The future a port's delivery returns.
pub type Delivering =
    Pin<Box<dyn Future<Output = Result<Option<serde_json::Value>, PortError>> + Send>>;

/// An adapter that delivers messages.
pub trait SendPort: Send + Sync {
    /// Delivers one message; returns the reply for a request.
    fn deliver(&self, message: OutboundMessage) -> Delivering;
}

impl<F, Fut> SendPort for F
where
    F: Fn(OutboundMessage) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Option<serde_json::Value>, PortError>> + Send + 'static,
{
    fn deliver(&self, message: OutboundMessage) -> Delivering {
        Box::pin(self(message))
    }
}

/// Retry with exponential backoff, then dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all before the message is dead-lettered.
    pub max_attempts: u32,
    /// The first wait.
    pub base: Duration,
    /// Each wait is this many times the one before.
    pub factor: f64,
    /// The longest wait.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base: Duration::from_millis(200),
            factor: 2.0,
            cap: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after `attempts` failed attempts, with up to 20% jitter.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = self.factor.powi(attempts.saturating_sub(1).min(30) as i32);
        let wait = self.base.as_secs_f64() * exp;
        let wait = wait.min(self.cap.as_secs_f64());
        let jitter = 1.0 + rand::random::<f64>() * 0.2;
        Duration::from_secs_f64(wait * jitter)
    }
}

/// How a port delivers.
#[derive(Clone)]
pub(crate) enum PortKind {
    /// An adapter.
    Adapter(Arc<dyn SendPort>),
    /// Publish into this host's MessageBox (deduplicated by message id).
    Loopback,
}

#[derive(Clone)]
pub(crate) struct PortConfig {
    pub kind: PortKind,
    pub retry: RetryPolicy,
    /// Tried once the primary's attempts are spent, with as many attempts again.
    pub backup: Option<Arc<dyn SendPort>>,
    /// One message at a time, in commit order; stops on a message that keeps failing.
    pub ordered: bool,
    /// The published messages it subscribes to by itself: (message type, filter).
    pub subscriptions: Vec<(String, String)>,
}

impl PortConfig {
    fn new(kind: PortKind) -> Self {
        Self {
            kind,
            retry: RetryPolicy::default(),
            backup: None,
            ordered: false,
            subscriptions: Vec::new(),
        }
    }
}

/// The send ports a host delivers to, by name.
#[derive(Clone, Default)]
pub struct Ports {
    pub(crate) by_name: BTreeMap<String, PortConfig>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Ports {
    /// No ports.
    pub fn new() -> Self {
        Self::default()
    }

    /// An in-process function port (one-way, or request-response when it returns `Some`).
    #[must_use]
    pub fn function<F, Fut>(self, name: &str, f: F) -> Self
    where
        F: Fn(OutboundMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<serde_json::Value>, PortError>> + Send + 'static,
    {
        self.adapter(name, Arc::new(f))
    }

    /// Any [`SendPort`].
    #[must_use]
    pub fn adapter(mut self, name: &str, port: Arc<dyn SendPort>) -> Self {
        self.by_name
            .insert(name.to_owned(), PortConfig::new(PortKind::Adapter(port)));
        self
    }

    /// A loopback port: what is sent to it is published into the MessageBox under the same id,
    /// and routed like any other message.
    #[must_use]
    pub fn loopback(mut self, name: &str) -> Self {
        self.by_name
            .insert(name.to_owned(), PortConfig::new(PortKind::Loopback));
        self
    }

    /// Sets the retry policy of a port added before.
    #[must_use]
    pub fn retry(mut self, name: &str, retry: RetryPolicy) -> Self {
        if let Some(port) = self.by_name.get_mut(name) {
            port.retry = retry;
        }
        self
    }

    /// A file port: each message is written to `dir` as `<message id>.json`, atomically.
    #[must_use]
    pub fn file(self, name: &str, dir: impl Into<std::path::PathBuf>) -> Self {
        self.adapter(name, Arc::new(FilePort::new(dir)))
    }

    /// An HTTP port: each message is POSTed to `url` with its id as the `Idempotency-Key`.
    #[must_use]
    pub fn http(self, name: &str, url: &str) -> Self {
        self.adapter(name, Arc::new(HttpPort::new(url)))
    }

    /// Gives a port added before a backup transport: once the port's attempts are spent, the
    /// message is tried on `backup`, with the same retry policy, before it is dead-lettered.
    #[must_use]
    pub fn backup(mut self, name: &str, backup: Arc<dyn SendPort>) -> Self {
        if let Some(port) = self.by_name.get_mut(name) {
            port.backup = Some(backup);
        }
        self
    }

    /// Marks a port added before as ordered: it delivers one message at a time in commit order,
    /// and stops on a message whose attempts are spent (the row is `held`) until an operator
    /// resumes it (`cairn outbox resume ID`) or dead-letters it (`cairn outbox dead-letter ID`).
    #[must_use]
    pub fn ordered(mut self, name: &str) -> Self {
        if let Some(port) = self.by_name.get_mut(name) {
            port.ordered = true;
        }
        self
    }

    /// Subscribes a port added before to published messages of `message_type` that pass
    /// `filter` ([`crate::filter`]; empty for all): BizTalk's messaging-only routing, a receive
    /// location to a send port with no orchestration. Each such message is sent to the port
    /// through the outbox (id `<message id>@<port>`), with the port's retries, backup, leases and
    /// dead letters; a message no instance or activation takes, but a port does, is `consumed`.
    /// The host writes the subscription when it starts (`subscriptions.port`).
    #[must_use]
    pub fn subscribe(mut self, name: &str, message_type: &str, filter: &str) -> Self {
        if let Some(port) = self.by_name.get_mut(name) {
            port.subscriptions
                .push((message_type.to_owned(), filter.to_owned()));
        }
        self
    }

    /// Every port subscription: (port, message type, filter).
    pub fn subscriptions(&self) -> Vec<(String, String, String)> {
        self.by_name
            .iter()
            .flat_map(|(name, p)| {
                p.subscriptions
                    .iter()
                    .map(move |(t, f)| (name.clone(), t.clone(), f.clone()))
            })
            .collect()
    }

    /// The names of the ordered ports.
    pub fn ordered_names(&self) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|(_, p)| p.ordered)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether a port of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}
