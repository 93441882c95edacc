//! [`Client`]: publishes messages and starts instances, in-process or from the CLI, checking
//! every input before it reaches the store; [`ClientError`], what its calls return. A host's own
//! client starts instances eagerly (`host/eager.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Notify;
use uuid::Uuid;

use super::eager::Eager;
use super::grouped::Grouped;
use super::metrics::{Door, Metrics};
use crate::clock::{SharedClock, SystemClock};
use crate::registry::Registry;
use crate::store::{NewInstance, NewMessage, PublishOutcome, Store, StoreError};

/// Errors from [`Client`] calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The orchestration is not registered.
    #[error("no orchestration named {0:?} is registered; registered: {1}")]
    UnknownOrchestration(String, String),
    /// Input that can never be stored (a NUL character in a message's id, type or properties):
    /// refused, nothing was written. The text names the message and what is wrong.
    #[error("refused: {0}")]
    Refused(String),
    /// Input past the maximum message size ([`Client::max_message_bytes`]): refused, nothing
    /// was written.
    #[error("refused: {0}")]
    TooLarge(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ClientError {
    /// Whether the same call may succeed later (the database was unavailable). Refused input
    /// never does.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Store(e) if e.is_retryable())
    }

    /// Whether the input was refused (it can never be stored as it is), rather than the store
    /// failing.
    pub fn is_refusal(&self) -> bool {
        match self {
            ClientError::Refused(_)
            | ClientError::TooLarge(_)
            | ClientError::UnknownOrchestration(..) => true,
            ClientError::Store(e) => e.is_refusal(),
        }
    }
}

/// Publishes messages and starts instances, in-process or from the CLI.
///
/// A host's own client ([`Host::client`](super::Host::client)) starts instances eagerly while the host runs and keeps
/// up: it runs each new instance's first transition and writes the instance with its first
/// persistence point, leased to that host, which takes it from memory without claiming it (an
/// instance whose first transition makes no point is written leased, and the host runs it); see
/// `host/eager.rs`.
/// Starts that would leave more than [`HostConfig::eager_backlog`](super::HostConfig::eager_backlog) instances waiting for the
/// host (memory stays bounded when a client starts faster than the host runs), and all starts of
/// a client made with [`Client::new`], are left to whichever host claims them first.
///
/// Every publish and start is checked before it reaches the store: a message whose id, type or
/// properties (explicit, or promoted from the body's top-level fields) hold a NUL character is
/// refused ([`ClientError::Refused`]), and so is a body or a start's input larger than
/// [`Client::max_message_bytes`] as JSON text ([`ClientError::TooLarge`]). Every door that
/// publishes through a client (the API, the CLI, the file drop, HTTP) refuses the same input the
/// same way on every backend.
#[derive(Clone, Debug)]
pub struct Client {
    pub(super) store: Arc<dyn Store>,
    pub(super) registry: Registry,
    pub(super) clock: SharedClock,
    pub(super) wake: Arc<Notify>,
    pub(super) eager: Option<Eager>,
    pub(super) max_message_bytes: usize,
    /// Where its publishes are counted, when its host keeps metrics, and under which door.
    pub(super) metrics: Option<(Arc<Metrics>, Door)>,
    pub(super) writes: Arc<Writes>,
}

/// The most messages or instances one shared write takes (a single larger call is written alone).
const MOST_ITEMS_A_WRITE: usize = 1_000;

/// The writes that a client's concurrent calls, and those of its clones (and every client of a
/// host), share: group commit for callers (`host/grouped.rs`). Each answer still comes only
/// after its own data is durable (G1).
#[derive(Debug)]
pub(super) struct Writes {
    publishes: Grouped<NewMessage, PublishOutcome>,
    starts: Grouped<NewInstance, ()>,
}

impl Default for Writes {
    fn default() -> Self {
        Self {
            publishes: Grouped::new(MOST_ITEMS_A_WRITE),
            starts: Grouped::new(MOST_ITEMS_A_WRITE),
        }
    }
}

impl Client {
    /// A client on `store` that resolves orchestration names in `registry`, with the default
    /// maximum message size ([`DEFAULT_MAX_MESSAGE_BYTES`](crate::store::DEFAULT_MAX_MESSAGE_BYTES)).
    pub fn new(store: Arc<dyn Store>, registry: Registry) -> Self {
        Self {
            store,
            registry,
            clock: Arc::new(SystemClock),
            wake: Arc::new(Notify::new()),
            eager: None,
            max_message_bytes: crate::store::DEFAULT_MAX_MESSAGE_BYTES,
            writes: Arc::default(),
            metrics: None,
        }
    }

    /// The same client, its publishes counted under `door` (a receive location's client).
    pub(crate) fn through(mut self, door: Door) -> Self {
        if let Some((_, d)) = &mut self.metrics {
            *d = door;
        }
        self
    }

    /// Replaces the maximum message size: the largest body (or start input), as JSON text, this
    /// client accepts. A host's own client has [`HostConfig::max_message_bytes`](super::HostConfig::max_message_bytes).
    #[must_use]
    pub fn with_max_message_bytes(mut self, max_bytes: usize) -> Self {
        self.max_message_bytes = max_bytes;
        self
    }

    /// The largest body (or start input), as JSON text, this client accepts.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Checks that every message can be stored; names the first that cannot.
    fn check_messages(&self, messages: &[NewMessage]) -> Result<(), ClientError> {
        let max = self.max_message_bytes;
        for (i, msg) in messages.iter().enumerate() {
            let Err(why) = msg.check_storable(max) else {
                continue;
            };
            let which = if messages.len() == 1 {
                format!("message {:?}", msg.id)
            } else {
                format!("message {} of {} ({:?})", i + 1, messages.len(), msg.id)
            };
            let why = format!("{which}: {why}");
            // Only on this error path is the body measured a second time.
            return Err(if crate::store::json_len(&msg.body) > max {
                ClientError::TooLarge(why)
            } else {
                ClientError::Refused(why)
            });
        }
        Ok(())
    }

    /// Checks a start's input against the maximum message size.
    fn check_input(&self, which: &str, input: &serde_json::Value) -> Result<(), ClientError> {
        crate::store::check_body_size(
            &format!("the input of {which}"),
            input,
            self.max_message_bytes,
        )
        .map_err(ClientError::TooLarge)
    }

    /// Publishes a message; it is durable when this returns (G1). With no `id`, a new one is made.
    ///
    /// # Errors
    /// [`ClientError::Refused`] or [`ClientError::TooLarge`] (see [`Client`]; nothing was
    /// written), or the store failed.
    pub async fn publish(
        &self,
        message_type: &str,
        body: serde_json::Value,
        id: Option<String>,
        properties: BTreeMap<String, String>,
    ) -> Result<(String, PublishOutcome), ClientError> {
        let id = id.unwrap_or_else(|| Uuid::now_v7().to_string());
        let msg = NewMessage::published(id.clone(), message_type, body, properties);
        let outcome = self.publish_batch(vec![msg]).await?.pop();
        Ok((id, outcome.unwrap_or(PublishOutcome::Duplicate)))
    }

    /// Publishes many messages in one transaction (with those of concurrent calls: see
    /// [`Client`]); they are durable when this returns.
    ///
    /// # Errors
    /// One message is refused ([`ClientError::Refused`], [`ClientError::TooLarge`], naming it),
    /// or the store failed; nothing was published.
    pub async fn publish_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<PublishOutcome>, ClientError> {
        self.check_messages(&messages)?;
        let (store, clock) = (self.store.clone(), self.clock.clone());
        let out = self
            .writes
            .publishes
            .call(messages, move |batch| {
                let (store, now) = (store.clone(), clock.now());
                async move { store.publish(batch, now).await }
            })
            .await?;
        if let Some((metrics, door)) = &self.metrics {
            let stored = out
                .iter()
                .filter(|o| !matches!(o, PublishOutcome::Duplicate))
                .count();
            metrics.published(*door, stored);
        }
        self.wake.notify_one();
        Ok(out)
    }

    /// Starts an instance of the current version of `orchestration` (the newest registered, or
    /// the one pinned with [`Registry::register_default`](crate::Registry::register_default)).
    ///
    /// # Errors
    /// [`ClientError::UnknownOrchestration`], [`ClientError::TooLarge`] (the input is past the
    /// maximum message size), or the store failed.
    pub async fn start(
        &self,
        orchestration: &str,
        input: serde_json::Value,
    ) -> Result<Uuid, ClientError> {
        self.check_input(orchestration, &input)?;
        let def = self.registry.current(orchestration).ok_or_else(|| {
            let names: Vec<_> = self.registry.definitions().map(|d| d.name()).collect();
            ClientError::UnknownOrchestration(orchestration.to_owned(), names.join(", "))
        })?;
        let id = Uuid::now_v7();
        let instance = NewInstance {
            id,
            orchestration: def.name().to_owned(),
            version: def.version(),
            parent: None,
            input,
        };
        self.start_instances(vec![instance]).await?;
        Ok(id)
    }

    /// Starts many instances in one transaction: `(orchestration, input)` pairs, each resolved to
    /// the current version (see [`Client::start`]). Returns their ids, in order.
    ///
    /// # Errors
    /// [`ClientError::UnknownOrchestration`] or [`ClientError::TooLarge`] (naming the start;
    /// nothing was started), or the store failed.
    pub async fn start_many(
        &self,
        starts: Vec<(String, serde_json::Value)>,
    ) -> Result<Vec<Uuid>, ClientError> {
        let mut instances = Vec::with_capacity(starts.len());
        let count = starts.len();
        for (i, (orchestration, input)) in starts.into_iter().enumerate() {
            self.check_input(
                &format!("start {} of {count} ({orchestration})", i + 1),
                &input,
            )?;
            let def = self.registry.current(&orchestration).ok_or_else(|| {
                let names: Vec<_> = self.registry.definitions().map(|d| d.name()).collect();
                ClientError::UnknownOrchestration(orchestration.clone(), names.join(", "))
            })?;
            instances.push(NewInstance {
                id: Uuid::now_v7(),
                orchestration: def.name().to_owned(),
                version: def.version(),
                parent: None,
                input,
            });
        }
        let ids = instances.iter().map(|i| i.id).collect();
        self.start_instances(instances).await?;
        Ok(ids)
    }

    /// Writes the instances, with those of concurrent calls; a host's own client hands them to
    /// its host (see [`Client`]).
    async fn start_instances(&self, instances: Vec<NewInstance>) -> Result<(), StoreError> {
        let (store, registry, clock) = (
            self.store.clone(),
            self.registry.clone(),
            self.clock.clone(),
        );
        let (eager, wake) = (self.eager.clone(), self.wake.clone());
        self.writes
            .starts
            .call(instances, move |batch| {
                let (store, registry, eager, wake) =
                    (store.clone(), registry.clone(), eager.clone(), wake.clone());
                let now = clock.now();
                async move {
                    let n = batch.len();
                    match eager.as_ref().filter(|e| e.takes(n)) {
                        Some(eager) => eager.start(&store, &registry, batch, now).await?,
                        None => {
                            store.start_instances(batch, None, now).await?;
                            wake.notify_one();
                        }
                    }
                    Ok(vec![(); n])
                }
            })
            .await
            .map(drop)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}
