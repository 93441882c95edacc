//! The engine host: runs instances against a store.
//!
//! One loop owns the in-memory instances. Each round it claims routed messages and due timers,
//! rehydrates the instances they belong to (taking their leases), runs their transitions, and
//! commits the persistence points that are due in one group commit. Committed sends go to the
//! [dispatcher](dispatcher), which delivers them through the send ports. Instances idle for
//! longer than [`HostConfig::dehydrate_after`] are saved and dropped from memory. When the
//! shutdown token is cancelled the loop stops claiming, saves every instance it holds that changed
//! since its last persistence point (the `shutdown` point), lets running deliveries finish for a
//! while, and gives up its leases: all of it within [`HostConfig::drain_timeout`] (and
//! [`RELEASE_WITHIN`] for the leases), whatever the database does.

mod commit;
mod dispatcher;
mod eager;
pub mod instance;
pub mod ports;
pub mod receive;
pub mod scopes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::dispatcher::{DispatchSettings, Dispatcher};
use self::eager::{Eager, Handed, Written};
use self::instance::{Delivery, FaultText, LiveInstance};
use self::ports::Ports;
use crate::clock::{SharedClock, SystemClock};
use crate::registry::Registry;
use crate::store::{
    Activation, CommitOutcome, DueTimer, HeldStart, InstanceRecord, InstanceStatus, NewInstance,
    NewMessage, NewReceives, OutboxRow, PersistencePoint, PublishOutcome, Reason, Store,
    StoreError, StoredMessage,
};

/// An instance that ended (completed, failed, terminated or suspended) at a committed persistence
/// point, as reported to the channel given to [`Host::with_endings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The instance.
    pub instance_id: Uuid,
    /// Its status after the point.
    pub status: InstanceStatus,
}

/// Settings of a host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// How often to look for work when nothing woke the host.
    pub poll_interval: Duration,
    /// Messages (and timers) claimed per round.
    pub batch_size: u32,
    /// Up to how many instances started by the host's own client may wait in memory for the
    /// host ([`Client`]); a start that would leave more waiting is stored for any host to claim.
    pub eager_backlog: usize,
    /// An instance idle this long is saved and dropped from memory (the `dehydrate` point).
    pub dehydrate_after: Duration,
    /// How long a lease on an instance lasts without renewal.
    pub lease_duration: Duration,
    /// How long a send stays locked to the host delivering it.
    pub outbox_lock: Duration,
    /// Concurrent deliveries.
    pub send_concurrency: usize,
    /// On shutdown, how long the host may take to stop: to finish the round under way, write
    /// the shutdown points and let running deliveries finish. Whatever is not done by then is
    /// dropped as a crash would drop it, and resumes from the last persistence point. Giving up
    /// the leases then takes at most [`RELEASE_WITHIN`] more, so that [`Host::run`] returns
    /// within `drain_timeout` + 1 s of being asked to stop, even with the database unreachable.
    pub drain_timeout: Duration,
    /// With `until_idle`, a timer due within this horizon still counts as work.
    pub idle_horizon: Duration,
    /// Stop once there is nothing left to do (see [`Host::run`]).
    pub until_idle: bool,
    /// Poison protection: a message claimed more than this many times without being consumed
    /// (its delivery crashed the host, panicked or failed the instance each time) suspends its
    /// instance, naming the message, instead of being delivered again.
    pub max_deliveries: u32,
    /// How often to look for operators' requests in the `control` table and for rows in the
    /// `inbox` table (at once again while the inbox has rows).
    pub control_interval: Duration,
    /// An unrouted message no subscription has matched for this long is dead-lettered.
    pub unrouted_ttl: Duration,
    /// How often to mark zombies and dead-letter expired unrouted messages.
    pub housekeeping_interval: Duration,
    /// The largest message body, as JSON text, that any door (the publish API, the CLI, the
    /// `inbox` table, the file drop, HTTP) accepts; larger ones are refused with a clear error.
    pub max_message_bytes: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            batch_size: 256,
            eager_backlog: 1024,
            dehydrate_after: Duration::from_secs(1),
            lease_duration: Duration::from_secs(30),
            outbox_lock: Duration::from_secs(60),
            send_concurrency: 64,
            drain_timeout: Duration::from_secs(5),
            idle_horizon: Duration::from_secs(2),
            until_idle: false,
            max_deliveries: 10,
            control_interval: Duration::from_millis(250),
            unrouted_ttl: Duration::from_secs(7 * 24 * 3600),
            housekeeping_interval: Duration::from_secs(5),
            max_message_bytes: crate::store::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Errors that stop a host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The store failed in a way retrying does not fix.
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
/// A host's own client ([`Host::client`]) starts instances eagerly while the host runs and keeps
/// up: it runs each new instance's first transition and writes the instance with its first
/// persistence point, leased to that host, which takes it from memory without claiming it (an
/// instance whose first transition makes no point is written leased, and the host runs it); see
/// `host/eager.rs`.
/// Starts that would leave more than [`HostConfig::eager_backlog`] instances waiting for the
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
    store: Arc<dyn Store>,
    registry: Registry,
    clock: SharedClock,
    wake: Arc<Notify>,
    eager: Option<Eager>,
    max_message_bytes: usize,
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
        }
    }

    /// Replaces the maximum message size: the largest body (or start input), as JSON text, this
    /// client accepts. A host's own client has [`HostConfig::max_message_bytes`].
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

    /// Publishes many messages in one transaction.
    ///
    /// # Errors
    /// One message is refused ([`ClientError::Refused`], [`ClientError::TooLarge`], naming it),
    /// or the store failed; nothing was published.
    pub async fn publish_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<PublishOutcome>, ClientError> {
        self.check_messages(&messages)?;
        let out = self.store.publish(messages, self.clock.now()).await?;
        self.wake.notify_one();
        Ok(out)
    }

    /// Starts an instance of the newest registered version of `orchestration`.
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
        let def = self.registry.latest(orchestration).ok_or_else(|| {
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
    /// the newest registered version. Returns their ids, in order.
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
            let def = self.registry.latest(&orchestration).ok_or_else(|| {
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

    /// Writes the instances; a host's own client hands them to its host (see [`Client`]).
    async fn start_instances(&self, instances: Vec<NewInstance>) -> Result<(), StoreError> {
        let now = self.clock.now();
        match self.eager.as_ref().filter(|e| e.takes(instances.len())) {
            Some(eager) => {
                eager
                    .start(&self.store, &self.registry, instances, now)
                    .await
            }
            None => {
                self.store.start_instances(instances, None, now).await?;
                self.wake.notify_one();
                Ok(())
            }
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// What a host did, for its closing log line and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Events delivered to instances.
    pub events: u64,
    /// Persistence points committed, by reason.
    pub points: BTreeMap<&'static str, u64>,
    /// Points refused because another writer held a newer epoch.
    pub fenced: u64,
    /// Instances suspended by a fault.
    pub faults: u64,
}

/// An engine host. Build it with [`Host::new`], then [`Host::run`] it.
pub struct Host {
    store: Arc<dyn Store>,
    registry: Registry,
    ports: Ports,
    config: HostConfig,
    clock: SharedClock,
    id: String,
    wake: Arc<Notify>,
    receive: Vec<receive::ReceiveLocation>,
    endings: Option<mpsc::UnboundedSender<Ended>>,
    /// Where its clients hand the instances they started for it (see [`Client`]), and where
    /// [`Host::run`] takes them.
    held_tx: mpsc::UnboundedSender<Vec<Handed>>,
    held_rx: Option<mpsc::UnboundedReceiver<Vec<Handed>>>,
    /// How many of them wait in `held_rx`.
    held_waiting: Arc<AtomicUsize>,
    /// Whether it has recovered and runs, so takes held starts.
    running: Arc<AtomicBool>,
    /// Its send ports, for its clients' first transitions; set when it runs.
    client_ports: Arc<OnceLock<Ports>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("id", &self.id)
            .field("store", &self.store.backend())
            .field("registry", &self.registry)
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// A host running the definitions in `registry` with the send ports in `ports`.
    pub fn new(store: Arc<dyn Store>, registry: Registry, ports: Ports) -> Self {
        let (held_tx, held_rx) = mpsc::unbounded_channel();
        Self {
            store,
            registry,
            ports,
            config: HostConfig::default(),
            clock: Arc::new(SystemClock),
            id: format!("host-{}", Uuid::new_v4()),
            wake: Arc::new(Notify::new()),
            receive: Vec::new(),
            endings: None,
            held_tx,
            held_rx: Some(held_rx),
            held_waiting: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicBool::new(false)),
            client_ports: Arc::new(OnceLock::new()),
        }
    }

    /// Adds a receive location (a file drop folder, an HTTP endpoint) the host runs while it
    /// runs; see [`receive`].
    #[must_use]
    pub fn with_receive_location(mut self, location: receive::ReceiveLocation) -> Self {
        self.receive.push(location);
        self
    }

    /// Reports every instance that ends at a persistence point this host commits (completed,
    /// failed, terminated or suspended) to `endings`, right after the commit. For waiting on
    /// results in-process (benchmarks, tests); a closed channel is ignored.
    #[must_use]
    pub fn with_endings(mut self, endings: mpsc::UnboundedSender<Ended>) -> Self {
        self.endings = Some(endings);
        self
    }

    /// Replaces the settings.
    #[must_use]
    pub fn with_config(mut self, config: HostConfig) -> Self {
        self.config = config;
        self
    }

    /// Replaces the send ports.
    #[must_use]
    pub fn with_ports(mut self, ports: Ports) -> Self {
        self.ports = ports;
        self
    }

    /// Replaces the clock (tests).
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// This host's id, as written in `instances.owner` and `hosts.id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A client whose publishes wake this host at once, and whose starts this host runs (see
    /// [`Client`]). Take it once the host is configured: its starts are leased for
    /// [`HostConfig::lease_duration`] as it is then.
    pub fn client(&self) -> Client {
        Client {
            store: self.store.clone(),
            registry: self.registry.clone(),
            clock: self.clock.clone(),
            wake: self.wake.clone(),
            max_message_bytes: self.config.max_message_bytes,
            eager: Some(Eager {
                host: self.id.clone(),
                lease: self.config.lease_duration,
                outbox_lock: self.config.outbox_lock,
                ports: self.client_ports.clone(),
                to_host: self.held_tx.clone(),
                running: self.running.clone(),
                waiting: self.held_waiting.clone(),
                most_waiting: self.config.eager_backlog,
            }),
        }
    }

    /// Writes the activating subscriptions of the registered definitions (the newest version of
    /// each wins). [`Host::run`] does it too; call it first when publishing activating messages
    /// before the host runs.
    ///
    /// # Errors
    /// The store failed.
    pub async fn sync_activations(&self) -> Result<(), StoreError> {
        let mut newest: BTreeMap<(String, String), Activation> = BTreeMap::new();
        for d in self.registry.definitions() {
            for t in d.activated_by() {
                let a = Activation {
                    message_type: (*t).to_owned(),
                    orchestration: d.name().to_owned(),
                    version: d.version(),
                    convoy: d.convoy_keys(),
                };
                newest.insert((a.message_type.clone(), a.orchestration.clone()), a);
            }
        }
        let activations: Vec<_> = newest.into_values().collect();
        self.store
            .sync_activations(&activations, self.clock.now())
            .await
    }

    /// Runs until `shutdown` is cancelled (or, with [`HostConfig::until_idle`], until no instance
    /// has work left: no routed message, no send pending, no timer due within the idle horizon).
    ///
    /// # Errors
    /// The store failed at start (migrations, recovery) or in a way retrying cannot fix.
    ///
    /// # Cancel safety
    /// Cancel through `shutdown`, not by dropping the future: dropping skips the shutdown
    /// persistence points (which is safe, like a crash, but slower to recover from).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<HostStats, HostError> {
        let Some(held_starts) = self.held_rx.take() else {
            unreachable!("run takes the host, so its receiver is taken once");
        };
        let runner_waiting = self.held_waiting.clone();
        let now = self.clock.now();
        self.store.recover(&self.id, now).await?;
        self.sync_activations().await?;
        // From now on what this host's clients start is leased to it (and no recovery of its own
        // can release it).
        let _ = self.client_ports.set(self.ports.clone());
        self.running.store(true, Ordering::SeqCst);

        let stop_workers = CancellationToken::new();
        let (to_dispatch, rows) = mpsc::unbounded_channel();
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        // When the host must be done stopping; set once it is asked to.
        let drain_until = Arc::new(OnceLock::new());
        let dispatcher = Dispatcher {
            store: self.store.clone(),
            ports: self.ports.clone(),
            clock: self.clock.clone(),
            settings: DispatchSettings {
                host: self.id.clone(),
                poll_interval: self.config.poll_interval.max(Duration::from_millis(50)),
                outbox_lock: self.config.outbox_lock,
                concurrency: self.config.send_concurrency,
                drain_timeout: self.config.drain_timeout,
                drain_until: drain_until.clone(),
            },
            wake_host: self.wake.clone(),
            in_flight: in_flight.clone(),
            replies: replies_tx,
        };
        let dispatcher = tokio::spawn(dispatcher.run(rows, stop_workers.clone()));
        let listener = {
            let store = self.store.clone();
            let wake = self.wake.clone();
            let stop = stop_workers.clone();
            tokio::spawn(async move { store.listen(wake, stop).await })
        };
        let heartbeat = tokio::spawn(heartbeat(
            self.store.clone(),
            self.clock.clone(),
            self.id.clone(),
            self.config.lease_duration,
            stop_workers.clone(),
        ));
        // Receive locations stop taking input as soon as the host is asked to stop.
        let stop_receiving = shutdown.child_token();
        let receiving: Vec<_> = self
            .receive
            .iter()
            .map(|location| {
                let location = location.clone();
                tokio::spawn(location.run(self.client(), stop_receiving.clone()))
            })
            .collect();
        tracing::info!(host.id = %self.id, backend = self.store.backend(),
            definitions = ?self.registry, ports = ?self.ports, "host started");

        let mut runner = Runner {
            ports: self.ports.clone(),
            host: self,
            cache: HashMap::new(),
            unrunnable: HashSet::new(),
            unwritten: HashSet::new(),
            to_dispatch,
            replies,
            early_reply: None,
            held_starts,
            held_waiting: runner_waiting,
            early_starts: Vec::new(),
            in_flight,
            stats: HostStats::default(),
            last_report: Instant::now(),
            last_control: None,
            last_inbox: None,
            last_housekeeping: None,
            last_claim: None,
            last_timer_claim: None,
            timer_due: None,
            claim: true,
            claim_timers: true,
            panicked: Vec::new(),
            last_panic: HashMap::new(),
        };
        // Stopping is bounded, whatever the database does: from the moment the host is asked
        // to stop (or, with `until_idle`, finds nothing left to do), the round under way, the
        // shutdown points, the receive locations and the dispatcher's drain get `drain_timeout`
        // in all. What is not done by then is dropped as a crash would drop it: the instances
        // resume from their last persistence point, the sends stay in the outbox and are
        // delivered again under their ids, the claimed messages are delivered again.
        let mut heartbeat = heartbeat;
        let mut listener = listener;
        let mut dispatcher = dispatcher;
        let mut receiving = receiving;
        let stopping = shutdown.child_token();
        let drain = runner.host.config.drain_timeout;
        let deadline = async {
            stopping.cancelled().await;
            let at = tokio::time::Instant::now() + drain;
            let _ = drain_until.set(at);
            tokio::time::sleep_until(at).await;
        };
        let work = async {
            let result = runner.run_loop(&shutdown).await;
            stopping.cancel();
            // Clients start no more instances for this host; those it was handed and did not
            // run are given up with the rest of its leases below.
            runner.held_starts.close();
            stop_receiving.cancel();
            for task in &mut receiving {
                let _ = task.await;
            }
            runner.shutdown().await;
            stop_workers.cancel();
            let _ = (&mut heartbeat).await;
            let _ = (&mut listener).await;
            let _ = (&mut dispatcher).await;
            result
        };
        let result = tokio::select! {
            result = work => result,
            () = deadline => {
                tracing::warn!(drain_timeout = ?drain,
                    "shutdown: out of time (is the database reachable?); what was not committed resumes from its last persistence point");
                Ok(())
            }
        };
        stop_receiving.cancel();
        stop_workers.cancel();
        for task in receiving.iter().chain([&heartbeat, &listener, &dispatcher]) {
            task.abort();
        }
        match tokio::time::timeout(
            RELEASE_WITHIN,
            runner
                .host
                .store
                .release(&runner.host.id, runner.host.clock.now()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give up leases at shutdown; they expire on their own");
            }
            Err(_) => tracing::warn!(
                "giving up leases at shutdown took too long; they expire on their own"
            ),
        }
        tracing::info!(host.id = %runner.host.id, stats = ?runner.stats, "host stopped");
        result.map(|()| runner.stats)
    }
}

/// At shutdown, how long giving up the leases may take after the drain (the database may be
/// unreachable: the leases then expire on their own).
pub const RELEASE_WITHIN: Duration = Duration::from_secs(1);

async fn heartbeat(
    store: Arc<dyn Store>,
    clock: SharedClock,
    host: String,
    lease: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let now = clock.now();
                let until = now + chrono::Duration::from_std(lease).unwrap_or_default();
                if let Err(e) = store.heartbeat(&host, now, until).await {
                    tracing::warn!(error = %e, "lease renewal failed; retrying at the next beat");
                }
            }
        }
    }
}

struct Runner {
    host: Host,
    ports: Ports,
    cache: HashMap<Uuid, LiveInstance>,
    unrunnable: HashSet<Uuid>,
    /// Instances that may hold receives not yet written to the database.
    unwritten: HashSet<Uuid>,
    to_dispatch: mpsc::UnboundedSender<OutboxRow>,
    /// Replies of requests delivered by this host's dispatcher, for the instances in memory.
    replies: mpsc::UnboundedReceiver<(OutboxRow, serde_json::Value)>,
    /// A reply taken off `replies` while waiting for work, handed over first next round.
    early_reply: Option<(OutboxRow, serde_json::Value)>,
    /// Instances this host's clients started for it, leased to it, start messages claimed.
    held_starts: mpsc::UnboundedReceiver<Vec<Handed>>,
    /// How many wait in `held_starts` (its clients stop handing over more past a batch).
    held_waiting: Arc<AtomicUsize>,
    /// Held starts taken off `held_starts` while waiting for work, run first next round.
    early_starts: Vec<Handed>,
    in_flight: Arc<AtomicUsize>,
    stats: HostStats,
    last_report: Instant,
    last_control: Option<Instant>,
    last_inbox: Option<Instant>,
    last_housekeeping: Option<Instant>,
    /// When messages were last claimed from the store: at least every poll interval, whatever
    /// else keeps the host busy.
    last_claim: Option<Instant>,
    /// When timers were last claimed from the store.
    last_timer_claim: Option<Instant>,
    /// The earliest timer this host wrote to the store since it last claimed timers.
    timer_due: Option<DateTime<Utc>>,
    /// Whether the store may hold work for this host that the next round must claim: set by a
    /// wake-up (a publish, a start, a recorded delivery, a NOTIFY), by a round that claimed
    /// something or wrote something a claim could find, and by the poll interval.
    claim: bool,
    /// Whether timers must be claimed at the next claim (an operator's request applied, or
    /// instances given back).
    claim_timers: bool,
    /// Instances dropped from memory this round because a transition panicked on a message:
    /// their locks go back, the message keeping its delivery count.
    panicked: Vec<(Uuid, i64)>,
    /// The last panic of each message that panicked, named when it is suspended as poison.
    last_panic: HashMap<i64, String>,
}

/// Work claimed for one instance in one round, in arrival order.
enum Work {
    Message(StoredMessage),
    Timer(DueTimer),
    /// A reply the dispatcher handed over, not stored as a message.
    Reply(OutboxRow, serde_json::Value),
}

impl Runner {
    async fn run_loop(&mut self, shutdown: &CancellationToken) -> Result<(), HostError> {
        let mut backoff = Duration::from_millis(100);
        let wake = self.host.wake.clone();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // A wake-up that came while the last round ran: the store may have work.
            if woken(&wake).await {
                self.claim = true;
            }
            match self.round().await {
                Ok(worked) => {
                    backoff = Duration::from_millis(100);
                    self.report();
                    if worked {
                        continue;
                    }
                    if self.host.config.until_idle && self.is_idle().await {
                        tracing::info!("no work left; stopping (--until-idle)");
                        return Ok(());
                    }
                    // A reply handed over in memory needs no claim: it wakes the host through
                    // its channel. Anything else that may have put work in the store notifies.
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(()),
                        Some(reply) = self.replies.recv() => {
                            self.early_reply = Some(reply);
                        }
                        Some(starts) = self.held_starts.recv() => self.took_starts(starts),
                        _ = wake.notified() => {
                            self.claim = true;
                        }
                        _ = tokio::time::sleep(self.host.config.poll_interval) => {
                            self.claim = true;
                        }
                    }
                }
                Err(e) if e.is_retryable() => {
                    self.claim = true;
                    tracing::warn!(error = %e, retry_in = ?backoff, "store unavailable; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    self.claim = true;
                    tracing::error!(error = %e, "store error; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn report(&mut self) {
        if self.last_report.elapsed() >= Duration::from_secs(10) {
            self.last_report = Instant::now();
            tracing::info!(in_memory = self.cache.len(), events = self.stats.events,
                points = ?self.stats.points, fenced = self.stats.fenced, faults = self.stats.faults,
                sends_in_flight = self.in_flight.load(Ordering::SeqCst), "progress");
        }
    }

    fn lease_until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + chrono::Duration::from_std(self.host.config.lease_duration).unwrap_or_default()
    }

    /// One round: claim, run, commit. Returns whether anything was done.
    async fn round(&mut self) -> Result<bool, StoreError> {
        let store = self.host.store.clone();
        let host = self.host.id.clone();
        let now = self.host.clock.now();
        let batch = self.host.config.batch_size;
        let controlled = self.apply_controls(now).await?;
        let received = self.take_inbox(now).await?;
        self.housekeeping(now).await?;
        let poll = self.host.config.poll_interval;
        if controlled {
            // An instance resumed may have a timer due.
            self.claim_timers = true;
        }
        if controlled
            || received
            || self.last_claim.is_none_or(|at| at.elapsed() >= poll)
            || self.timer_due.is_some_and(|t| t <= now)
        {
            self.claim = true;
        }
        let (messages, timers) = if self.claim {
            self.claim = false;
            self.last_claim = Some(Instant::now());
            let messages = match store.claim_messages(&host, now, batch).await {
                Ok(messages) => messages,
                Err(e) => {
                    self.claim = true;
                    return Err(e);
                }
            };
            let timers = if self.claim_timers
                || self.last_timer_claim.is_none_or(|at| at.elapsed() >= poll)
                || self.timer_due.is_some_and(|t| t <= now)
            {
                match store.claim_timers(&host, now, batch).await {
                    Ok(timers) => {
                        self.claim_timers = false;
                        self.last_timer_claim = Some(Instant::now());
                        self.timer_due = self.timer_due.filter(|t| *t > now);
                        timers
                    }
                    Err(e) => {
                        self.claim = true;
                        self.give_back(messages.iter().map(|m| m.instance_id)).await;
                        return Err(e);
                    }
                }
            } else {
                Vec::new()
            };
            (messages, timers)
        } else {
            (Vec::new(), Vec::new())
        };
        let mut points = Vec::new();
        let mut work: Vec<(Uuid, Work)> = self.take_held_starts(now, &mut points);
        let worked = !messages.is_empty() || !timers.is_empty() || !work.is_empty();
        // A full batch: there may be more. Half a batch counts as full, as a PostgreSQL claim
        // takes at most half a batch for instances the host holds and fills the rest with
        // others' only as far as there are any. (Less is all there was; what is published since
        // wakes the host.)
        let full = (batch as usize / 2).max(1);
        if messages.len() >= full || timers.len() >= full {
            self.claim = true;
        }

        work.reserve(messages.len() + timers.len());
        let held = work.len();
        work.extend(
            messages
                .into_iter()
                .map(|m| (m.instance_id, Work::Message(m))),
        );
        work.extend(timers.into_iter().map(|t| (t.instance_id, Work::Timer(t))));
        if work.len() > held {
            if let Err(e) = self.rehydrate(&work[held..], now, &mut points).await {
                self.claim = true;
                self.give_back(work.iter().map(|(id, _)| *id)).await;
                return Err(e);
            }
        }
        for (id, item) in work {
            self.unwritten.insert(id);
            self.deliver(id, item, now, &mut points);
        }
        let replied = self.take_replies(now, &mut points).await;
        let fired = self.fire_memory_timers(now, &mut points);
        self.dehydrate_idle(now, &mut points);
        if !points.is_empty() {
            self.commit(points).await;
        }
        self.retry_panicked().await;
        self.write_receives(now).await;
        Ok(worked || fired || controlled || received || replied)
    }

    /// Hands replies the dispatcher took to the instances in memory; a reply for an instance
    /// this host does not hold is recorded as a message, as any reply used to be.
    async fn take_replies(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> bool {
        let mut elsewhere = Vec::new();
        let mut any = false;
        while let Some((row, reply)) = self
            .early_reply
            .take()
            .or_else(|| self.replies.try_recv().ok())
        {
            any = true;
            if self.cache.contains_key(&row.instance_id) {
                self.unwritten.insert(row.instance_id);
                self.deliver(row.instance_id, Work::Reply(row, reply), now, points);
            } else {
                elsewhere.push(crate::store::DeliveryOutcome::Delivered {
                    row,
                    reply: Some(reply),
                    via_backup: false,
                });
            }
        }
        if !elsewhere.is_empty() {
            // Recorded as messages, to be claimed.
            self.claim = true;
            if let Err(e) = self.host.store.record_deliveries(elsewhere, now).await {
                // The requests stay pending under their locks and are delivered again.
                tracing::warn!(error = %e, "recording replies failed; the requests will be sent again");
            }
        }
        any
    }

    /// Publishes the rows of the `inbox` table (the SQL receive location): at most every
    /// [`HostConfig::control_interval`], and at once again while it has rows.
    async fn take_inbox(&mut self, now: DateTime<Utc>) -> Result<bool, StoreError> {
        if self
            .last_inbox
            .is_some_and(|at| at.elapsed() < self.host.config.control_interval)
        {
            return Ok(false);
        }
        let taken = self
            .host
            .store
            .take_inbox(
                now,
                self.host.config.batch_size,
                self.host.config.max_message_bytes,
            )
            .await?;
        // Rows taken: look again next round rather than after the interval.
        self.last_inbox = (taken == 0).then(Instant::now);
        if taken > 0 {
            tracing::debug!(taken, "published rows of the inbox table");
        }
        Ok(taken > 0)
    }

    /// Marks zombies and dead-letters expired unrouted messages, every
    /// [`HostConfig::housekeeping_interval`].
    async fn housekeeping(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        if self
            .last_housekeeping
            .is_some_and(|at| at.elapsed() < self.host.config.housekeeping_interval)
        {
            return Ok(());
        }
        self.last_housekeeping = Some(Instant::now());
        let ttl = chrono::Duration::from_std(self.host.config.unrouted_ttl)
            .unwrap_or(chrono::Duration::MAX);
        let done = self
            .host
            .store
            .housekeeping(
                now,
                now.checked_sub_signed(ttl)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC),
            )
            .await?;
        if done.zombies > 0 {
            tracing::warn!(
                zombies = done.zombies,
                "messages arrived for instances that had ended; kept as zombies"
            );
        }
        if done.expired > 0 {
            tracing::warn!(
                expired = done.expired,
                "unrouted messages passed their time to live; dead-lettered"
            );
        }
        Ok(())
    }

    /// Carries out operators' requests from the `control` table (at most every
    /// [`HostConfig::control_interval`]). An instance this host holds in memory is dropped: the
    /// request moved its epoch, so it reloads from the database when it next has work.
    async fn apply_controls(&mut self, now: DateTime<Utc>) -> Result<bool, StoreError> {
        if self
            .last_control
            .is_some_and(|at| at.elapsed() < self.host.config.control_interval)
        {
            return Ok(false);
        }
        self.last_control = Some(Instant::now());
        let applied = self
            .host
            .store
            .apply_controls(&self.host.id, now, 100)
            .await?;
        let mut dropped = Vec::new();
        for request in &applied {
            match &request.result {
                Ok(status) => {
                    tracing::info!(control.id = request.id, instance.id = ?request.instance_id,
                    %status, "carried out a control request")
                }
                Err(why) => {
                    tracing::warn!(control.id = request.id, instance.id = ?request.instance_id,
                    error = %why, "rejected a control request")
                }
            }
            if let Some(id) = request.instance_id {
                self.unrunnable.remove(&id);
                if self.cache.remove(&id).is_some() {
                    dropped.push(id);
                }
            }
        }
        if !dropped.is_empty() {
            self.release_after_failure(&dropped, &[]).await;
        }
        Ok(!applied.is_empty())
    }

    /// Gives back the locks of instances dropped after a panic; the message that panicked keeps
    /// its delivery count, so that it is suspended as poison after
    /// [`HostConfig::max_deliveries`] attempts.
    async fn retry_panicked(&mut self) {
        if self.panicked.is_empty() {
            return;
        }
        let panicked = std::mem::take(&mut self.panicked);
        // The messages go back to the store, to be claimed again.
        self.claim = true;
        let ids: Vec<Uuid> = panicked.iter().map(|(id, _)| *id).collect();
        let seqs: Vec<i64> = panicked.iter().map(|(_, seq)| *seq).collect();
        self.release_after_failure(&ids, &seqs).await;
    }

    /// Writes the subscriptions of receives declared without a persistence point, so that
    /// messages route to the instance at once rather than at its next point.
    async fn write_receives(&mut self, now: DateTime<Utc>) {
        if self.unwritten.is_empty() {
            return;
        }
        let batch: Vec<NewReceives> = self
            .unwritten
            .iter()
            .filter_map(|id| self.cache.get(id))
            .filter_map(|i| {
                let rows = i.unwritten_receives();
                (!rows.is_empty()).then_some(NewReceives {
                    instance_id: i.id,
                    epoch: i.epoch,
                    rows,
                })
            })
            // What can never be stored waits for the instance's next point, which is refused
            // on its own (host/commit.rs).
            .filter(|receives| receives.check_storable().is_ok())
            .collect();
        if batch.is_empty() {
            self.unwritten.clear();
            return;
        }
        let store = self.host.store.clone();
        match store.subscribe(&self.host.id, &batch, now).await {
            Ok(outcomes) => {
                // New subscriptions route the unrouted messages they match.
                self.claim = true;
                self.unwritten.clear();
                let mut fenced = Vec::new();
                for (receives, outcome) in batch.iter().zip(outcomes) {
                    match outcome {
                        CommitOutcome::Committed => {
                            if let Some(i) = self.cache.get_mut(&receives.instance_id) {
                                i.receives_written(&receives.rows);
                            }
                        }
                        CommitOutcome::Fenced => {
                            self.cache.remove(&receives.instance_id);
                            fenced.push(receives.instance_id);
                        }
                    }
                }
                if !fenced.is_empty() {
                    self.release_after_failure(&fenced, &[]).await;
                }
            }
            // Kept in `unwritten`: tried again next round.
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "writing new receives failed; retrying")
            }
            // Refused: the instances' next points write the same subscriptions, each alone if
            // need be.
            Err(e) => {
                tracing::warn!(error = %e, "writing new receives was refused; they are written with the instances' next points");
                self.unwritten.clear();
            }
        }
    }

    /// Fires due timers of instances in memory: a delay declared without a persistence point
    /// since exists only here. (A timer fires once: the first delivery cancels the wait, so the
    /// same timer claimed from the database later is dropped.)
    fn fire_memory_timers(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> bool {
        let due: Vec<DueTimer> = self
            .cache
            .values()
            .flat_map(|i| {
                i.waits()
                    .delays
                    .iter()
                    .filter(|d| d.at <= now)
                    .map(|d| DueTimer {
                        instance_id: i.id,
                        name: d.name.clone(),
                        due_at: d.at,
                    })
            })
            .collect();
        let fired = !due.is_empty();
        for timer in due {
            self.unwritten.insert(timer.instance_id);
            self.deliver(timer.instance_id, Work::Timer(timer), now, points);
        }
        fired
    }

    /// Gives back what a failed round claimed for instances not in memory, so that it is not
    /// left locked to this host.
    async fn give_back(&self, claimed: impl Iterator<Item = Uuid>) {
        let mut ids: Vec<Uuid> = claimed.filter(|id| !self.cache.contains_key(id)).collect();
        ids.sort();
        ids.dedup();
        self.release_after_failure(&ids, &[]).await;
    }

    /// Takes the leases of instances that have work and are not in memory, and loads them.
    async fn rehydrate(
        &mut self,
        work: &[(Uuid, Work)],
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> Result<(), StoreError> {
        let mut missing: Vec<Uuid> = work
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.cache.contains_key(id) && !self.unrunnable.contains(id))
            .collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let store = self.host.store.clone();
        let records = store
            .acquire(&self.host.id, &missing, now, self.lease_until(now))
            .await?;
        let acquired: HashSet<Uuid> = records.iter().map(|r| r.id).collect();
        let not_ours: Vec<Uuid> = missing
            .into_iter()
            .filter(|id| !acquired.contains(id))
            .collect();
        if !not_ours.is_empty() {
            store.unlock(&self.host.id, &not_ours, &[]).await?;
        }
        for record in records {
            if let Err(error) = self.adopt(record, now, points) {
                store.note_unrunnable(error.0, &error.1, now).await?;
                self.unrunnable.insert(error.0);
            }
        }
        Ok(())
    }

    /// Takes the instances this host's clients started for it (they are leased to it, their
    /// start messages claimed) into memory; returns their start messages, to be delivered. At
    /// most a batch ([`HostConfig::batch_size`]) a round, as claims, so that one `start_many`
    /// of many instances does not make one huge group commit; the rest wait for the next round.
    fn take_held_starts(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> Vec<(Uuid, Work)> {
        let limit = (self.host.config.batch_size as usize).max(1);
        while self.early_starts.len() < limit {
            match self.held_starts.try_recv() {
                Ok(more) => self.took_starts(more),
                Err(_) => break,
            }
        }
        let mut starts = std::mem::take(&mut self.early_starts);
        if starts.len() > limit {
            self.early_starts = starts.split_off(limit);
        }
        let mut work = Vec::with_capacity(starts.len());
        for handed in starts {
            match handed {
                Handed::Held(held) => {
                    let HeldStart { record, message } = *held;
                    let id = record.id;
                    match self.adopt(record, now, points) {
                        Ok(()) => work.push((id, Work::Message(message))),
                        // The client resolved the definition in this host's registry.
                        Err((id, error)) => tracing::warn!(instance.id = %id, "{error}"),
                    }
                }
                Handed::Written(written) => {
                    let Written { instance, point } = *written;
                    self.stats.events += 1;
                    if let Some(instance) = instance {
                        self.cache.insert(instance.id, instance);
                    }
                    self.committed(point);
                }
            }
        }
        work
    }

    /// Keeps held starts taken off the channel for the next round; its clients may hand over
    /// as many more.
    fn took_starts(&mut self, starts: Vec<Handed>) {
        self.held_waiting.fetch_sub(starts.len(), Ordering::SeqCst);
        self.early_starts.extend(starts);
    }

    /// Loads an instance this host holds into memory, or, if it cannot be read, makes the point
    /// that suspends it. An instance of a definition this host does not have is returned with
    /// the error to record.
    fn adopt(
        &mut self,
        record: InstanceRecord,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> Result<(), (Uuid, String)> {
        let Some(def) = self
            .host
            .registry
            .get(&record.orchestration, record.version)
            .cloned()
        else {
            let error = format!(
                "orchestration {:?} version {} is not registered in host {}; deploy a build that has it \
                 (or terminate the instance)",
                record.orchestration, record.version, self.host.id
            );
            tracing::warn!(instance.id = %record.id, orchestration.name = %record.orchestration,
                orchestration.version = record.version, "{error}");
            return Err((record.id, error));
        };
        match LiveInstance::load(record, def) {
            Ok(instance) => {
                self.cache.insert(instance.id, instance);
            }
            Err(fault) => {
                let mut fault = *fault;
                tracing::warn!(instance.id = %fault.instance.id, error = %fault.error.0, "instance cannot be loaded; suspending it");
                self.stats.faults += 1;
                let mut point = fault.instance.fault_point(&fault.error, &self.host.id, now);
                point.resumable = false;
                points.push(point);
            }
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        id: Uuid,
        item: Work,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) {
        let Some(mut instance) = self.cache.remove(&id) else {
            return; // not ours, unrunnable, or ended earlier in this round
        };
        let registry = &self.host.registry;
        let ports = &self.ports;
        let has_port = |name: &str| ports.contains(name);
        let mut queue = vec![item];
        let mut keep = true;
        while let Some(item) = queue.pop() {
            self.stats.events += 1;
            let max_deliveries = i64::from(self.host.config.max_deliveries);
            let delivery = match item {
                Work::Message(msg) if msg.delivery_count > max_deliveries => {
                    instance.mark_failed(msg.seq);
                    let last = self
                        .last_panic
                        .remove(&msg.seq)
                        .map(|p| format!(" The last attempt: {p}."))
                        .unwrap_or_default();
                    Delivery::Faulted(FaultText(format!(
                        "poison message: message {} ({}) was delivered {} times without being consumed; each \
                         delivery crashed the host, panicked or failed the instance (the limit is {max_deliveries}).{last} \
                         Fix the cause and resume the instance, or terminate it",
                        msg.id, msg.message_type, msg.delivery_count - 1
                    )))
                }
                Work::Message(msg) => instance.deliver_message(msg, registry, &has_port, now),
                Work::Timer(t) => instance.deliver_timer(&t.name, registry, &has_port, now),
                Work::Reply(row, body) => {
                    instance.deliver_reply(&row, body, registry, &has_port, now)
                }
            };
            let point = match delivery {
                Delivery::Held => continue,
                Delivery::Ran(None) => None,
                Delivery::Ran(Some(reason)) => Some(self.point(&mut instance, reason, now)),
                Delivery::Faulted(text) => Some(Err(text)),
                Delivery::Panicked { error, seq } => {
                    tracing::warn!(instance.id = %instance.id, orchestration.name = instance.orchestration(),
                        error = %error.0, "transition panicked; the message is delivered again from the last persistence point");
                    self.stats.faults += 1;
                    self.panicked.push((instance.id, seq));
                    if self.last_panic.len() < 10_000 {
                        self.last_panic.insert(seq, error.0);
                    }
                    keep = false;
                    break;
                }
            };
            match point {
                None => {}
                Some(Ok(point)) => {
                    keep = !point.release;
                    points.push(point);
                }
                Some(Err(text)) => {
                    tracing::warn!(instance.id = %instance.id, orchestration.name = instance.orchestration(),
                        error = %text.0, "transition failed; suspending the instance at its last persistence point");
                    self.stats.faults += 1;
                    points.push(instance.fault_point(&text, &self.host.id, now));
                    keep = false;
                }
            }
            if !keep {
                break;
            }
            // The waits may have changed: offer held messages again, oldest first.
            let mut held = instance.take_held();
            held.reverse();
            queue.extend(held.into_iter().map(Work::Message));
        }
        if keep {
            self.cache.insert(id, instance);
        }
    }

    fn point(
        &self,
        instance: &mut LiveInstance,
        reason: Reason,
        now: DateTime<Utc>,
    ) -> Result<PersistencePoint, FaultText> {
        let lock_until =
            now + chrono::Duration::from_std(self.host.config.outbox_lock).unwrap_or_default();
        instance.persistence_point(reason, &self.host.id, now, lock_until)
    }

    fn dehydrate_idle(&mut self, now: DateTime<Utc>, points: &mut Vec<PersistencePoint>) {
        let threshold = self.host.config.dehydrate_after;
        let idle: Vec<Uuid> = self
            .cache
            .values()
            // An instance inside an atomic scope is never saved halfway through it.
            .filter(|i| i.last_active.elapsed() >= threshold && !i.in_atomic_scope())
            .map(|i| i.id)
            .collect();
        for id in idle {
            if let Some(mut instance) = self.cache.remove(&id) {
                match self.point(&mut instance, Reason::Dehydrate, now) {
                    Ok(point) => points.push(point),
                    Err(text) => points.push(instance.fault_point(&text, &self.host.id, now)),
                }
            }
        }
    }

    async fn is_idle(&self) -> bool {
        if self.in_flight.load(Ordering::SeqCst) > 0
            || !self.replies.is_empty()
            || self.early_reply.is_some()
            || !self.held_starts.is_empty()
            || !self.early_starts.is_empty()
        {
            return false;
        }
        let now = self.host.clock.now();
        let horizon =
            now + chrono::Duration::from_std(self.host.config.idle_horizon).unwrap_or_default();
        if self
            .cache
            .values()
            .any(|i| i.next_timer().is_some_and(|t| t <= horizon))
        {
            return false;
        }
        match self.host.store.activity(now).await {
            Ok(a) => {
                a.ready_messages == 0
                    && a.pending_sends == 0
                    && a.next_timer_at.is_none_or(|t| t > horizon)
            }
            Err(_) => false,
        }
    }

    /// The shutdown persistence point for every instance held that changed since its last one.
    async fn shutdown(&mut self) {
        let now = self.host.clock.now();
        let mut points = Vec::new();
        let ids: Vec<Uuid> = self.cache.keys().copied().collect();
        for id in ids {
            let Some(mut instance) = self.cache.remove(&id) else {
                continue;
            };
            if !instance.is_dirty() || instance.in_atomic_scope() {
                // Unchanged, or halfway through an atomic scope: it resumes from its last point.
                continue;
            }
            match self.point(&mut instance, Reason::Shutdown, now) {
                Ok(point) => points.push(point),
                Err(text) => points.push(instance.fault_point(&text, &self.host.id, now)),
            }
        }
        let saved = points.len();
        if !points.is_empty() {
            self.commit(points).await;
        }
        tracing::info!(
            saved,
            "shutdown: saved the instances that changed since their last persistence point"
        );
    }
}

/// Takes a wake-up that came while the host was busy, without waiting for one.
async fn woken(wake: &Notify) -> bool {
    tokio::select! {
        biased;
        _ = wake.notified() => true,
        _ = std::future::ready(()) => false,
    }
}
