//! The engine host: runs instances against a store.
//!
//! One loop owns the in-memory instances. Each round it claims routed messages and due timers,
//! rehydrates the instances they belong to (taking their leases), runs their transitions, and
//! commits the persistence points that are due in one group commit. Committed sends go to the
//! dispatcher, which delivers them through the send ports. Instances idle for
//! longer than [`HostConfig::dehydrate_after`] are saved and dropped from memory. When the
//! shutdown token is cancelled the loop stops claiming, saves every instance it holds that changed
//! since its last persistence point (the `shutdown` point), lets running deliveries finish for a
//! while, and gives up its leases: all of it within [`HostConfig::drain_timeout`] (and
//! [`RELEASE_WITHIN`] for the leases), whatever the database does.
//!
//! Where things are:
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | [`Host`]: building one, its client, and [`Host::run`], which starts and stops the loop and its tasks |
//! | `config.rs` | [`HostConfig`], the settings, and their defaults |
//! | `client.rs` | [`Client`] and [`ClientError`]: publishing and starting |
//! | `eager.rs` | eager starts: a host's own client runs a new instance's first transition |
//! | `runner.rs`, `runner/` | the host loop: rounds, delivery to instances in memory, controls, shutdown points |
//! | `commit.rs` | the group commit of a round's points, and isolating a refused point |
//! | `heartbeat.rs` | this host's leases: renewed while it runs, given up when it stops |
//! | `instance.rs`, `instance/` | [`LiveInstance`](instance::LiveInstance): one instance in memory, and its persistence points |
//! | `scopes.rs` | an instance's scopes and compensation chain |
//! | `dispatcher.rs` | delivering committed sends through the send ports |
//! | `metrics.rs`, `ops.rs` | [`Metrics`], and the `/metrics`, `/healthz`, `/readyz` endpoint |
//! | `retention.rs` | deleting ended instances after the retention period; [`purge_ended`](retention::purge_ended) |
//! | `ports/`, `receive.rs` | send ports and receive locations |

mod client;
mod commit;
mod config;
mod dispatcher;
mod eager;
mod grouped;
mod heartbeat;
pub mod instance;
mod metrics;
pub mod ops;
pub mod ports;
pub mod receive;
pub mod retention;
mod runner;
pub mod scopes;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use self::client::{Client, ClientError};
pub use self::config::HostConfig;
pub use self::heartbeat::RELEASE_WITHIN;
pub use self::metrics::{Door, Metrics, TransitionOutcome};

use self::dispatcher::{DispatchSettings, Dispatcher};
use self::eager::{Eager, Handed};
use self::heartbeat::heartbeat;
use self::ports::Ports;
use self::runner::Runner;
use crate::clock::{SharedClock, SystemClock};
use crate::registry::Registry;
use crate::store::{Activation, InstanceStatus, Store, StoreError};

/// An instance that ended (completed, failed, terminated or suspended) at a committed persistence
/// point, as reported to the channel given to [`Host::with_endings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The instance.
    pub instance_id: Uuid,
    /// Its status after the point.
    pub status: InstanceStatus,
}

/// Errors that stop a host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The store failed in a way retrying does not fix.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// The writes its clients' concurrent calls share (group commit for callers).
    writes: Arc<client::Writes>,
    /// Its metrics, when it keeps them.
    metrics: Option<Arc<Metrics>>,
    /// Where it serves `/metrics`, `/healthz` and `/readyz`.
    operations: Option<std::net::TcpListener>,
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
            writes: Arc::default(),
            running: Arc::new(AtomicBool::new(false)),
            client_ports: Arc::new(OnceLock::new()),
            metrics: None,
            operations: None,
        }
    }

    /// Keeps [`Metrics`] (counted from now on, by this host and its clients). Take them with
    /// [`Host::metrics`]; [`Host::with_operations`] serves them.
    #[must_use]
    pub fn with_metrics(mut self) -> Self {
        if self.metrics.is_none() {
            self.metrics = Some(Arc::new(Metrics::new()));
        }
        self
    }

    /// Keeps [`Metrics`] and serves them on `listener` while the host runs, with `/healthz` and
    /// `/readyz` ([`ops`]). Bind it first (`127.0.0.1:0` picks a free port; its `local_addr`
    /// tells which).
    #[must_use]
    pub fn with_operations(mut self, listener: std::net::TcpListener) -> Self {
        self.operations = Some(listener);
        self.with_metrics()
    }

    /// Its metrics, if it keeps them ([`Host::with_metrics`]).
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
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

    /// Replaces the send ports with those `ports` builds from this host's [`Client`]: for ports
    /// that publish back into the MessageBox (a reply from a real system, a port that confirms
    /// what it did with a message). Call it after [`Host::with_config`], as the client takes the
    /// settings as they are then.
    ///
    /// ```no_run
    /// # async fn run(store: std::sync::Arc<dyn cairn::store::Store>) {
    /// use cairn::{Host, OutboundMessage, PortError, Ports, Registry};
    ///
    /// let host = Host::new(store, Registry::new(), Ports::new()).with_ports_from(|client| {
    ///     Ports::new().function("warehouse", move |msg: OutboundMessage| {
    ///         let client = client.clone();
    ///         async move {
    ///             let body = serde_json::json!({ "order_id": msg.body["order_id"] });
    ///             client
    ///                 .publish("shipment.confirmed", body, Some(format!("shipped-{}", msg.id)), Default::default())
    ///                 .await
    ///                 .map_err(|e| PortError::transient(e.to_string()))?;
    ///             Ok(None)
    ///         }
    ///     })
    /// });
    /// # }
    /// ```
    #[must_use]
    pub fn with_ports_from(self, ports: impl FnOnce(Client) -> Ports) -> Self {
        let ports = ports(self.client());
        self.with_ports(ports)
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
            writes: self.writes.clone(),
            metrics: self.metrics.clone().map(|m| (m, Door::Api)),
            eager: Some(Eager {
                host: self.id.clone(),
                lease: self.config.lease_duration,
                outbox_lock: self.config.outbox_lock,
                ports: self.client_ports.clone(),
                to_host: self.held_tx.clone(),
                running: self.running.clone(),
                waiting: self.held_waiting.clone(),
                most_waiting: self.config.eager_backlog,
                metrics: self.metrics.clone(),
            }),
        }
    }

    /// Writes the activating subscriptions of the registered definitions (the current version of
    /// each: the newest, or the one pinned with [`Registry::register_default`]), and of the send
    /// ports' subscriptions. [`Host::run`] does it too; call it first when publishing activating
    /// messages before the host runs.
    ///
    /// # Errors
    /// The store failed, or an orchestration's `FILTER` does not parse
    /// ([`StoreError::Refused`], naming the orchestration: fix its filter).
    pub async fn sync_activations(&self) -> Result<(), StoreError> {
        let mut newest: BTreeMap<(String, String), Activation> = BTreeMap::new();
        let current = self
            .registry
            .definitions()
            .filter_map(|d| self.registry.current(d.name()))
            .map(|d| (d.name(), d.version()))
            .collect::<std::collections::BTreeSet<_>>();
        for d in self
            .registry
            .definitions()
            .filter(|d| current.contains(&(d.name(), d.version())))
        {
            if let Err(e) = crate::filter::Filter::parse(d.filter()) {
                return Err(StoreError::Refused(format!(
                    "orchestration {} version {}: its FILTER {e}; fix the filter",
                    d.name(),
                    d.version()
                )));
            }
            for t in d.activated_by() {
                let a = Activation {
                    message_type: (*t).to_owned(),
                    orchestration: d.name().to_owned(),
                    version: d.version(),
                    convoy: d.convoy_keys(),
                    filter: d.filter().to_owned(),
                    port: None,
                };
                newest.insert((a.message_type.clone(), a.orchestration.clone()), a);
            }
        }
        let mut activations: Vec<_> = newest.into_values().collect();
        for (port, message_type, filter) in self.ports.subscriptions() {
            if let Err(e) = crate::filter::Filter::parse(&filter) {
                return Err(StoreError::Refused(format!(
                    "send port {port}'s subscription to {message_type}: its filter {e}; fix the filter"
                )));
            }
            activations.push(Activation {
                message_type,
                orchestration: String::new(),
                version: 0,
                convoy: String::new(),
                filter,
                port: Some(port),
            });
        }
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
        // From now on this host claims work only for the versions it registers; an instance of
        // another version waits for a host that has it (docs/versioning.md).
        self.store
            .record_registrations(&self.id, &self.registry.versions())
            .await?;
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
            metrics: self.metrics.clone(),
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
        let mut receiving: Vec<_> = self
            .receive
            .iter()
            .map(|location| {
                let location = location.clone();
                let client = self.client().through(location.door());
                tokio::spawn(location.run(client, stop_receiving.clone()))
            })
            .collect();
        // Served until the host has stopped; not ready from the moment it is asked to.
        let stop_serving = CancellationToken::new();
        let serving = match (self.operations.take(), &self.metrics) {
            (Some(listener), Some(metrics)) => Some(tokio::spawn(ops::serve(
                listener,
                Arc::new(ops::Operations {
                    metrics: metrics.clone(),
                    store: self.store.clone(),
                    clock: self.clock.clone(),
                    draining: shutdown.clone(),
                    refreshed: tokio::sync::Mutex::new(None),
                }),
                stop_serving.clone(),
            ))),
            _ => None,
        };
        if let Some(retain) = self.config.retain_ended {
            let retainer = retention::Retainer {
                store: self.store.clone(),
                clock: self.clock.clone(),
                retain,
                batch: self.config.retention_batch.max(1),
                interval: self.config.housekeeping_interval,
                archive: self.config.archive.clone(),
                metrics: self.metrics.clone(),
            };
            // Stopped with the receive locations: nothing to save.
            receiving.push(tokio::spawn(retainer.run(stop_receiving.clone())));
        }
        tracing::info!(host.id = %self.id, backend = self.store.backend(),
            definitions = ?self.registry, ports = ?self.ports, "host started");

        let mut runner = Runner::new(
            self,
            to_dispatch,
            replies,
            held_starts,
            runner_waiting,
            in_flight,
        );
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
        heartbeat::release(
            runner.host.store.as_ref(),
            &runner.host.id,
            &runner.host.clock,
        )
        .await;
        stop_serving.cancel();
        if let Some(serving) = serving {
            let _ = tokio::time::timeout(RELEASE_WITHIN, serving).await;
        }
        tracing::info!(host.id = %runner.host.id, stats = ?runner.stats, "host stopped");
        result.map(|()| runner.stats)
    }
}
