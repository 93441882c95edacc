//! Send ports: where committed sends go.
//!
//! A send port is an adapter that delivers one outbox message and, for a request, returns the
//! reply. Delivery is at least once (G2): a port may see the same message id more than once after
//! a crash or a retry, and should treat the id as an idempotency key.
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
        self.by_name.insert(
            name.to_owned(),
            PortConfig {
                kind: PortKind::Adapter(port),
                retry: RetryPolicy::default(),
            },
        );
        self
    }

    /// A loopback port: what is sent to it is published into the MessageBox under the same id,
    /// and routed like any other message.
    #[must_use]
    pub fn loopback(mut self, name: &str) -> Self {
        self.by_name.insert(
            name.to_owned(),
            PortConfig {
                kind: PortKind::Loopback,
                retry: RetryPolicy::default(),
            },
        );
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

    /// Whether a port of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}
